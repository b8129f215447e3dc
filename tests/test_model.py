"""Our decoder against transformers on the same safetensors (litgpt-style parity), the KV cache, and error paths."""
import json
import os
from pathlib import Path

import pytest
import torch

from eval import BeamCache, PromptCache
from extras.init import create_model
from helpers import LLAMA, LLAMA3_ROPE, QWEN2
from infra.config import ModelConfig
from infra.device import autocast
from infra.files import UserError
from infra.tokenizer import Tokenizer
from model import Decoder, KVCache

transformers = pytest.importorskip("transformers")

CASES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(LLAMA)),
    "llama-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(LLAMA, tie_word_embeddings=True)),
    "llama-bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                   dict(LLAMA, attention_bias=True, mlp_bias=True)),
    "llama3-rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(LLAMA, rope_parameters=LLAMA3_ROPE)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(LLAMA, sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(QWEN2)),
    "qwen2-tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(QWEN2, tie_word_embeddings=True)),
}


def hf_model(name, tmp_path):
    config_cls, model_cls, kwargs = CASES[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():  # random biases, so a dropped bias cannot hide behind transformers' zero init
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    return model


def batch(padded: bool):
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (3, 11))
    mask = torch.ones_like(ids)
    if padded:  # left padding of different lengths, the layout beam search uses
        mask[1, :4] = 0
        mask[2, :7] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("padded", [False, True])
def test_logits_and_hidden_match_transformers(name, padded, tmp_path):
    ref = hf_model(name, tmp_path)
    ours = Decoder.from_pretrained(tmp_path / "hf").eval()
    ids, mask, positions = batch(padded)
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        args = dict(position_ids=positions, attention_mask=mask if padded else None)
        logits, hidden = ours(ids, **args), ours(ids, **args, hidden=True)
    real = mask.bool()
    torch.testing.assert_close(logits[real], out.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden[real], out.hidden_states[-1][real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen2-tied"])
def test_our_checkpoint_loads_in_transformers(name, tmp_path):
    hf_model(name, tmp_path)
    ours = Decoder.from_pretrained(tmp_path / "hf").eval()
    ours.save_pretrained(tmp_path / "ours")
    assert not list(tmp_path.glob(".ours*")), "temporary directories left behind"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids, _, _ = batch(False)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), back(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_and_selected_positions(tmp_path):
    ref = hf_model("llama", tmp_path)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours = Decoder.from_pretrained(tmp_path / "sharded").eval()
    ids, _, _ = batch(False)
    select = torch.zeros_like(ids, dtype=torch.bool)
    select[0, 3] = select[2, -1] = True
    with torch.no_grad():
        full, some = ours(ids), ours(ids, select=select)
    assert some.shape == (2, 96)
    torch.testing.assert_close(some, full[select])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("rows", [3, 1])  # a batch of left-padded prompts; one prompt (exact scoring, recommend)
def test_the_prompt_cache_finishes_the_full_pass_at_its_last_position(precision, rows, tmp_path):
    """A prompt pass that finishes only the last position (eval's PromptCache) gives the full pass's last hidden
    state and the same cache. Bit for bit in bf16 on CPUs with AVX-512 BF16, where oneDNN's products do not depend
    on the row count, so beam search's rankings do not move by a rounding; fp32 products of 1-3 rows may differ in the
    last bit (MKL picks another kernel), and other machines are not measured."""
    hf_model("qwen2", tmp_path)
    model = Decoder.from_pretrained(tmp_path / "hf").eval()
    ids, mask, positions = (x[-rows:] for x in batch(True))
    caches, outputs = [], []
    with torch.no_grad(), autocast(precision, torch.device("cpu")):
        for kind in (KVCache, PromptCache):
            caches.append(kind(model.config, batch=rows, max_len=11, dtype=torch.float32, device="cpu"))
            outputs.append(model(ids, positions, mask, caches[-1], hidden=True))
    full, last = outputs
    assert last.shape == (rows, 1, full.shape[-1])
    if precision == "bf16" and torch.cpu._is_avx512_bf16_supported():
        assert torch.equal(last, full[:, -1:])
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-6)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)


def test_kv_cache_incremental_decoding_equals_full_forward(tmp_path):
    hf_model("qwen2", tmp_path)
    model = Decoder.from_pretrained(tmp_path / "hf").eval()
    ids, mask, positions = batch(True)
    with torch.no_grad():
        full = model(ids, position_ids=positions, attention_mask=mask)
        cache = KVCache(model.config, batch=3, max_len=16, dtype=torch.float32, device="cpu")
        steps = [model(ids[:, :6], position_ids=positions[:, :6], attention_mask=mask[:, :6], kv_cache=cache)]
        for t in range(6, 11):  # positions continue per row from the cache; row 2 is still padding at t=6
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], kv_cache=cache))
    incremental = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(incremental[real], full[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen2"])  # 2 and 7 query heads per key head
def test_beam_cache_continuations_equal_full_forward(name, tmp_path):
    """Three beams per left-padded prompt: fed tokens, reordered (with repeats), fed more, then several at once."""
    hf_model(name, tmp_path)
    model = Decoder.from_pretrained(tmp_path / "hf").eval()
    ids, mask, positions = batch(True)
    width = 3
    with torch.no_grad():
        prompt = KVCache(model.config, batch=3, max_len=11, dtype=torch.float32, device="cpu")
        model(ids, position_ids=positions, attention_mask=mask, kv_cache=prompt)
        beams = BeamCache(prompt, width, steps=5)
        first = torch.randint(3, 96, (9, 1))
        model(first, kv_cache=beams)
        rows = torch.tensor([2, 2, 0, 3, 5, 4, 6, 6, 6])  # parents, always under the same prompt
        beams = beams.select(rows)
        then = torch.randint(3, 96, (9, 3))
        out = model(then, kv_cache=beams)
    for row in range(9):
        user = row // width
        seq = torch.cat([ids[user], first[rows[row], :], then[row]])[None]
        seq_mask = torch.cat([mask[user], torch.ones(4, dtype=torch.long)])[None]
        with torch.no_grad():
            ref = model(seq, position_ids=(seq_mask.cumsum(-1) - 1).clamp(min=0), attention_mask=seq_mask)
        torch.testing.assert_close(out[row], ref[0, -3:], atol=1e-5, rtol=1e-5)


def write_config(path, **overrides):
    path.mkdir(parents=True, exist_ok=True)
    cfg = {**LLAMA, "architectures": ["LlamaForCausalLM"], "model_type": "llama", **overrides}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_missing_files_and_mismatched_weights_are_named(tmp_path):
    with pytest.raises(UserError, match="config.json: file not found"):
        Decoder.from_pretrained(tmp_path / "nothing")
    with pytest.raises(UserError, match="no model.safetensors"):
        Decoder.from_pretrained(write_config(tmp_path / "noweights"))
    hf_model("llama", tmp_path)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    shape_error = r"model.layers.0.mlp.gate_proj.weight has shape \(96, 64\), expected \(128, 64\)"
    with pytest.raises(UserError, match=shape_error):
        Decoder.from_pretrained(tmp_path / "hf")
    cfg.update(intermediate_size=96, num_hidden_layers=3)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="missing model.layers.2"):
        Decoder.from_pretrained(tmp_path / "hf")


def test_created_model_round_trips_with_its_tokenizer(tmp_path):
    texts = [f"Purchase history in Games:\nCrimson Dragon Saga {i}\nBlue Ocean Tales\n" for i in range(200)]
    config = ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                         intermediate_size=64)
    created = create_model(texts, tmp_path / "m", config, seed=0)
    loaded = Decoder.from_pretrained(tmp_path / "m")
    tok = Tokenizer.from_pretrained(tmp_path / "m")
    assert tok.decode(tok.encode("Crimson Dragon Saga 7\n")) == "Crimson Dragon Saga 7\n"
    assert loaded.config.vocab_size == tok.vocab_size and tok.eos_id == loaded.config.eos_token_id
    for (name, a), b in zip(created.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    again = create_model(texts, tmp_path / "m2", config, seed=0)  # same texts and seed: same files
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == (tmp_path / "m2" / "tokenizer.model").read_bytes()
    assert all(torch.equal(a, b) for a, b in zip(created.state_dict().values(), again.state_dict().values()))


def test_tokenizer_json_through_the_optional_tokenizers_package(tmp_path, monkeypatch):
    """Qwen2.5-style checkpoints ship only tokenizer.json (byte-level BPE, no BOS)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["User history in Video Games:\nRed Dragon Quest\nBlue Ocean Racer\n"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": None}))
    ours = Tokenizer.from_pretrained(tmp_path)
    assert ours.bos_id is None and ours.eos_id == tok.token_to_id("<|endoftext|>") == ours.pad_id
    assert ours.decode(ours.encode("Red Dragon Quest\n")) == "Red Dragon Quest\n"
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # as if it were not installed
    with pytest.raises(UserError, match="only tokenizer.json found; it needs the optional package 'tokenizers'"):
        Tokenizer.from_pretrained(tmp_path)


SMOLLM2 = Path(os.environ.get("CPREC_SMOLLM2", "/tmp/smollm2-135m-hf"))


@pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").exists(),
                    reason="SmolLM2-135M not built (../shared/tools/smollm2/make_smollm2_hf.sh /tmp/smollm2-135m-hf)")
def test_smollm2_matches_transformers():
    """A real pretrained LLM (tied embeddings, GQA 9:3, 49k vocabulary, tokenizer.json): same tokens, same logits."""
    pytest.importorskip("tokenizers")
    text = "User history in Video Games, oldest first:\nEmber Wyrm Tactics 2\nRune Viking Chronicles\n"
    ours_tok = Tokenizer.from_pretrained(SMOLLM2)
    theirs_tok = transformers.AutoTokenizer.from_pretrained(SMOLLM2)
    ids = ours_tok.encode(text)
    assert ids == theirs_tok(text, add_special_tokens=False)["input_ids"]
    assert ours_tok.eos_id == theirs_tok.eos_token_id and ours_tok.vocab_size == 49152
    ours = Decoder.from_pretrained(SMOLLM2).eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(SMOLLM2, torch_dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        expected = theirs(x).logits
        got = ours(x)
    assert ours.config.tie_embeddings and ours.config.n_kv_heads == 3
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got.argmax(-1) == expected.argmax(-1)).all()
