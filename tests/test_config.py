"""config.json <-> ModelConfig: each supported layout round-trips; what would change the math is refused by name."""
import pytest

from helpers import LLAMA, LLAMA3_ROPE, QWEN2
from infra.config import INIT_MARKER, ModelConfig, config_from_hf, config_to_hf
from infra.files import UserError


@pytest.mark.parametrize("config", [
    ModelConfig(),
    ModelConfig(architecture="Qwen2ForCausalLM", qkv_bias=True, tie_embeddings=False, bos_token_id=1, eos_token_id=2),
    ModelConfig(architecture="MistralForCausalLM", n_kv_heads=2, extra={"sliding_window": 64}),
    ModelConfig(rope_scaling=LLAMA3_ROPE, qkv_bias=True, o_bias=True, mlp_bias=True, rope_theta=500000.0),
])
def test_our_config_round_trips(config):
    assert config_from_hf(config_to_hf(config)) == config


def test_transformers_v5_layout_and_list_token_ids():
    """v5 drops `architectures` from bare configs and nests rope_theta in rope_parameters; Llama 3 lists eos ids."""
    hf = dict(LLAMA, model_type="llama", rope_parameters=LLAMA3_ROPE, eos_token_id=[7, 9], bos_token_id=1)
    c = config_from_hf(hf)
    assert (c.architecture, c.rope_theta, c.rope_scaling["factor"]) == ("LlamaForCausalLM", 500000.0, 8.0)
    assert (c.eos_token_id, c.bos_token_id, c.head_dim, c.n_kv_heads) == (7, 1, 16, 2)
    assert (c.qkv_bias, c.o_bias) == (False, False) and config_from_hf(dict(QWEN2, model_type="qwen2")).qkv_bias


def test_only_init_itself_writes_the_fresh_marker():
    """A saved model keeps init's lineage ({"seed"}), never its "fresh" flag: only init's own folder is replaceable."""
    saved = config_to_hf(ModelConfig(extra={INIT_MARKER: {"seed": 3, "fresh": True}, "custom": [1, 2]}))
    assert saved[INIT_MARKER] == {"seed": 3} and saved["custom"] == [1, 2]


@pytest.mark.parametrize("overrides, message", [
    (dict(architectures=["GPT2LMHeadModel"]), "architectures='GPT2LMHeadModel' is not supported"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
])
def test_unsupported_configs_are_refused_by_name(overrides, message):
    with pytest.raises(UserError, match=message):
        config_from_hf({**LLAMA, "architectures": ["LlamaForCausalLM"], **overrides})


def test_qwen2_sliding_window_refused_and_mistral_window_caps_context():
    with pytest.raises(UserError, match="use_sliding_window"):
        config_from_hf(dict(QWEN2, architectures=["Qwen2ForCausalLM"], use_sliding_window=True))
    hf = dict(LLAMA, architectures=["MistralForCausalLM"], max_position_embeddings=4096, sliding_window=64)
    cfg = config_from_hf(hf)
    assert cfg.context == 64 and cfg.max_positions == 4096
    saved = config_to_hf(cfg)
    assert saved["max_position_embeddings"] == 4096 and saved["sliding_window"] == 64  # written back unchanged
    assert config_from_hf(dict(hf, sliding_window=None)).context == 4096


def test_config_from_hf_names_its_source():
    with pytest.raises(UserError, match="^x/config.json: no hidden_size, intermediate_size; expected"):
        config_from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "num_hidden_layers": 1,
                        "num_attention_heads": 2}, "x/config.json")
    assert config_from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 4,
                           "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8}).head_dim == 2
