"""config.json <-> ModelConfig: each supported layout round-trips; what would change the math is refused by name.
A recipe's --config file: a run repeated from its run_config.json, the command line over the file, bad files."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import LLAMA, LLAMA3_ROPE, QWEN2, cli, ok, refused
from infra.config import INIT_MARKER, ModelConfig, config_from_hf, config_to_hf
from infra.files import UserError
from infra.runs import open_run


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


# --------------------------------------------------------------------------------------------------- --config files
TINY_CPT = ["--tokens", 512, "--block-len", 32, "--micro-batch", 4, "--batch-tokens", 128, "--val-users", 2,
            "--save-every", 0, "--no-progress"]


@pytest.fixture(scope="module")
def cpt_run(world, tiny_model, tmp_path_factory):
    """A tiny pretrain run, given every option on the command line."""
    run = tmp_path_factory.mktemp("config") / "cpt"
    ok(cli("pretrain", "--data", world, "--model", tiny_model, "--out", run, *TINY_CPT))
    return run


def weights(run: Path) -> dict:
    return load_file(run / "final" / "model.safetensors")


def test_run_config_records_every_option_and_repeats_the_run_bit_for_bit(cpt_run, tmp_path):
    saved = json.loads((cpt_run / "run_config.json").read_text())
    options = saved["options"]
    assert options["tokens"] == 512 and options["epochs"] == 2.0 and options["batch-tokens"] == 128
    assert options["lr"] is None and options["model"] == saved["model"] and saved["train"]["steps"] == 4
    assert not {"out", "resume", "overwrite", "config"} & set(options)
    ok(cli("pretrain", "--config", cpt_run / "run_config.json", "--out", tmp_path / "again"))
    again = json.loads((tmp_path / "again" / "run_config.json").read_text())
    assert again == saved
    first, second = weights(cpt_run), weights(tmp_path / "again")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_the_command_line_overrides_the_file(cpt_run, world, tiny_model, tmp_path):
    """A user's file (both spellings of a name), then one option changed on the command line."""
    (tmp_path / "mine.json").write_text(json.dumps({"command": "pretrain", "data": str(world), "model": str(tiny_model),
                                                    "batch_tokens": 128, "block-len": 32, "micro-batch": 4,
                                                    "tokens": 512, "val-users": 2, "seed": 3, "progress": False}))
    ok(cli("pretrain", "--config", tmp_path / "mine.json", "--out", tmp_path / "run", "--seed", 0,
           "--save-every", 0))
    options = json.loads((tmp_path / "run" / "run_config.json").read_text())["options"]
    assert options == json.loads((cpt_run / "run_config.json").read_text())["options"]  # seed 0 as the command said
    first, second = weights(cpt_run), weights(tmp_path / "run")
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("content, fragments", [
    ({"batch-size": 8}, ["batch-size is not an option of pretrain"]),
    ({"batch-tokens": "2k"}, ["batch-tokens \"2k\": expected an integer"]),
    ({"lr": True}, ["lr true: expected a number or null"]),
    ({"epochs": None}, ["epochs null: expected a number"]),
    ({"command": "finetune", "lr": 1e-3}, ["command \"finetune\": a file of another command", "\"pretrain\""]),
    ({"out": "runs/x"}, ["out is never read from a file", "--out"]),
    ([1, 2], ["expected an object of options"]),
    ("run of finetune", ["the run_config.json of a finetune run, not of pretrain"]),
    ("other data", ["the dataset", "data_fingerprint"]),
    ("old run", ["no \"options\" in it"]),
])
def test_a_bad_config_file_is_refused_in_one_line_and_nothing_is_written(cpt_run, tmp_path, content, fragments):
    saved = json.loads((cpt_run / "run_config.json").read_text())
    if isinstance(content, str):  # a run's run_config.json, changed
        content = {"run of finetune": {**saved, "command": "finetune"},
                   "other data": {**saved, "data_fingerprint": "0"},
                   "old run": {k: v for k, v in saved.items() if k != "options"}}[content]
    (tmp_path / "bad.json").write_text(json.dumps(content))
    refused(cli("pretrain", "--config", tmp_path / "bad.json", "--out", tmp_path / "out"), "bad.json", *fragments,
            alone=False)
    assert not (tmp_path / "out").exists()


def test_yaml_needs_pyyaml_and_the_run_may_not_hold_its_config_file(cpt_run, tmp_path, monkeypatch):
    (tmp_path / "run.yaml").write_text("seed: 1\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML not installed
    refused(cli("pretrain", "--config", tmp_path / "run.yaml", "--out", tmp_path / "out"), "pip install pyyaml")
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.json").write_text(json.dumps(json.loads((cpt_run / "run_config.json").read_text())))
    refused(cli("pretrain", "--config", tmp_path / "out" / "mine.json", "--out", tmp_path / "out"),
            "would replace the input", alone=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.json"]
    refused(cli("finetune", "--out", tmp_path / "out2"), "Missing option '--domain'")


def test_a_resumed_run_records_changed_options_and_old_runs_still_resume(tmp_path):
    """open_run: options are never refused (what they resolve to is compared) but their changes are recorded; a run
    from before options were recorded resumes as before."""
    run = tmp_path / "run"
    old = {"command": "pretrain", "train": {"lr": 1e-3, "seed": 0}}
    open_run(run, old, resume=False, overwrite=False)
    (run / "latest").write_text("step-0000002\n")
    (run / "checkpoints" / "step-0000002").mkdir(parents=True)
    new = {**old, "options": {"lr": None, "seed": 0}}
    open_run(run, new, resume=True, overwrite=False)  # an old run: no options to compare
    assert "resumed_with_changes" not in json.loads((run / "run_config.json").read_text())
    changed = {"command": "pretrain", "train": {"lr": 2e-3, "seed": 0}, "options": {"lr": 2e-3, "seed": 0}}
    open_run(run, changed, resume=True, overwrite=False)
    history = json.loads((run / "run_config.json").read_text())["resumed_with_changes"]
    assert history == [{"from": "step-0000002", "changed": {"options.lr": [None, 2e-3], "train.lr": [1e-3, 2e-3]}}]
    with pytest.raises(UserError, match=r"different settings \(train.seed\)"):
        open_run(run, {**changed, "train": {"lr": 2e-3, "seed": 1}, "options": {"lr": 2e-3, "seed": 1}}, True, False)
