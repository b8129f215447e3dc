"""LoRA (model.py's adapters): exact at initialisation, adapters alone trained, merged and PEFT exports that
transformers and peft load with the same logits; and the streaming loader's bounded host memory."""
import json
import os
import shutil
import subprocess
import sys
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

from extras.init import init_weights
from helpers import LLAMA, QWEN2, ROOT, cli, launch, ok, refused
from infra.config import ModelConfig
from infra.device import autocast
from infra.files import UserError
from infra.loop import Checkpoints, StepTimer
from model import LORA_TARGETS, Decoder, LoRALinear, apply_lora, lora_state, merge_lora, save_adapter

transformers = pytest.importorskip("transformers")


def base(tmp_path, kwargs=LLAMA, cls=transformers.LlamaForCausalLM, config=transformers.LlamaConfig):
    torch.manual_seed(0)
    cls(config(**kwargs)).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def trained(model, seed=1):
    """Random adapters, as after training (B = 0 would hide a wrong merge or a wrong key)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_state(model).values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))


def test_lora_at_initialisation_is_the_base_exactly(tmp_path):
    path = base(tmp_path)
    plain = Decoder.from_pretrained(path).eval()
    lora = apply_lora(Decoder.from_pretrained(path), rank=4, alpha=8).eval()
    with torch.no_grad():
        assert torch.equal(lora(IDS), plain(IDS))
    assert sum(isinstance(m, LoRALinear) for m in lora.modules()) == 2 * len(LORA_TARGETS)
    assert set(plain.state_dict()) <= set(lora.state_dict())  # the base's names are kept


def test_only_the_adapters_are_trained(tmp_path):
    model = apply_lora(Decoder.from_pretrained(base(tmp_path)), rank=4, alpha=8, targets=("q_proj", "down_proj"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert sorted(trainable) == sorted(lora_state(model))
    assert {n.split(".")[3] for n in trainable} == {"q_proj", "down_proj"}
    model(IDS).float().logsumexp(-1).mean().backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    assert graded == set(trainable)
    with pytest.raises(UserError, match="targets among q_proj"):
        apply_lora(model, rank=4, alpha=8, targets=("qproj",))


def test_mfu_counts_no_weight_gradients_for_the_frozen_base(tmp_path):
    """LoRA's step FLOPs: the frozen base's forward and input gradients (4N), the adapters' 6 per parameter. Before,
    6N for all: a LoRA run on SmolLM2 logged MFU 102%."""
    full = Decoder.from_pretrained(base(tmp_path))
    lora = apply_lora(Decoder.from_pretrained(base(tmp_path)), rank=4, alpha=8)
    timers = [StepTimer(m, torch.device("cpu"), "fp32", lambda device, precision, remeasure=False: 1e12, 0)
              for m in (full, lora)]
    assert timers[0].adapters == 0 and timers[1].adapters == full.config.lora_params(4) > 0
    attention = 12 * full.config.n_layers * full.config.n_heads * full.config.head_dim * 16
    n = (full.config.train_flops_per_token(16) - attention) / 6  # matmul weights
    assert full.config.train_flops_per_token(16, timers[1].adapters) == 4 * n + 6 * timers[1].adapters + attention


@pytest.mark.parametrize("case", ["llama", "qwen2-tied"])
def test_merged_export_loads_in_transformers_with_the_adapter_logits(case, tmp_path):
    kwargs, cls, config = (LLAMA, transformers.LlamaForCausalLM, transformers.LlamaConfig) if case == "llama" else \
        (dict(QWEN2, tie_word_embeddings=True), transformers.Qwen2ForCausalLM, transformers.Qwen2Config)
    model = trained(apply_lora(Decoder.from_pretrained(base(tmp_path, kwargs, cls, config)), rank=4, alpha=16)).eval()
    merged = merge_lora(model).eval()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    merged.save_pretrained(tmp_path / "merged")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        expected = model(IDS)
        torch.testing.assert_close(merged(IDS), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back(input_ids=IDS).logits, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(expected, Decoder.from_pretrained(tmp_path / "base")(IDS), atol=1e-3)
    assert any(isinstance(m, LoRALinear) for m in model.modules())  # the LoRA model is left as it was


def test_merge_under_activation_checkpointing_merges_every_projection(tmp_path):
    from infra.distributed import checkpoint_layers
    model = trained(apply_lora(Decoder.from_pretrained(base(tmp_path)), rank=4, alpha=8))
    plain = merge_lora(model).state_dict()
    checkpoint_layers(model)  # what train's wrap does: the layers' module names gain the wrapper's prefix
    wrapped = merge_lora(model).state_dict()
    assert plain.keys() == wrapped.keys() and all(torch.equal(plain[k], wrapped[k]) for k in plain)


def test_peft_loads_the_adapter_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    path = base(tmp_path)
    model = trained(apply_lora(Decoder.from_pretrained(path), rank=4, alpha=16, targets=LORA_TARGETS[:5])).eval()
    save_adapter(model, tmp_path / "final-adapter", base_model=str(path))
    config = json.loads((tmp_path / "final-adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 16)
    ref = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path),
                                         tmp_path / "final-adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=IDS).logits, model(IDS), atol=1e-5, rtol=1e-5)


def test_bf16_base_with_fp32_adapters(tmp_path):
    """On CPU `auto` precision is fp32, so the bf16-base / fp32-adapter split is forced here."""
    path = base(tmp_path)
    model = apply_lora(Decoder.from_pretrained(path, dtype=torch.bfloat16), rank=4, alpha=8)
    assert {p.dtype for p in lora_state(model).values()} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    with autocast("bf16", torch.device("cpu")):
        logits = model(IDS)
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    trained(model)
    with torch.no_grad():
        outside = model(IDS)  # no autocast: the adapters run in fp32 beside the bf16 base
        with autocast("bf16", torch.device("cpu")):
            inside = model(IDS)
        reference = trained(apply_lora(Decoder.from_pretrained(path), rank=4, alpha=8))(IDS)
    assert outside.dtype == inside.dtype == torch.bfloat16
    for out in (outside, inside):
        torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)


# --------------------------------------------------------------------------------------------------- loading
PEAK = """
import sys, torch
from infra.config import ModelConfig
from model import Decoder
torch.aminmax(torch.ones(4)); torch.ones(4).numpy()  # lazy imports outside the measurement
with torch.device("meta"):
    Decoder(ModelConfig(vocab_size=8, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, intermediate_size=8))
def kib(field):  # VmHWM is this process's own peak: getrusage's maxrss carries the parent's over fork and exec
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
fsdp = sys.argv[3:] == ["fsdp"]  # on the meta device, then each layer read as FSDP (one process) shards it
if fsdp:  # FSDP's own first-use imports and allocations outside the measurement too
    from infra.distributed import shard_fsdp
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    tiny = Decoder(ModelConfig(vocab_size=8, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8,
                               intermediate_size=8))
    shard_fsdp(tiny, tiny, torch.device("cpu"), "fp32")
before = kib("VmRSS:")
model = Decoder.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]), device="meta" if fsdp else "cpu")
if fsdp:
    shard_fsdp(model, model, torch.device("cpu"), "fp32")
print((kib("VmHWM:") - before) * 1024, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


def peak_growth(runs: list[tuple[str, ...]]) -> list[float]:
    """Peak resident memory gained loading each (checkpoint, dtype[, "fsdp"]), in its own process (run side by side),
    over the model's size in that dtype."""
    # glibc's dynamic mmap threshold would keep freed layers resident on the heap (bench.harness.fresh_processes)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    procs = [subprocess.Popen([sys.executable, "-c", PEAK, *run], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)
             for run in runs]
    outs = [p.communicate()[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    return [int(grown) / int(size) for grown, size in outs]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_holds_about_one_model_in_the_target_dtype(tmp_path):
    """Weights stream into their final dtype: converting never holds the stored copy too (it did: 3.0x from fp32 to
    bf16, 1.5x from bf16 to fp32, in docs/scaling.md)."""
    config = ModelConfig(vocab_size=8192, dim=512, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=64,
                         intermediate_size=1536)  # 17M parameters: 64 MiB in fp32
    model = Decoder(config)
    init_weights(model, seed=0)
    for stored in (torch.float32, torch.bfloat16):
        model.save_pretrained(tmp_path / str(stored), dtype=stored)
    runs = [(str(tmp_path / "torch.float32"), "bfloat16"), (str(tmp_path / "torch.bfloat16"), "float32"),
            (str(tmp_path / "torch.bfloat16"), "float32", "fsdp")]  # FSDP: never the whole model and its shards
    assert max(peak_growth(runs)) <= 1.3


# --------------------------------------------------------------------------------------------------- the commands
def finetune_args(world, model, out, *extra):
    return ["finetune", "--domain", "games", "--data", world, "--model", model, "--out", out, "--epochs", 1,
            "--users-fraction", 0.2, "--batch-tokens", 1024, "--micro-tokens", 512, "--val-users", 3,
            "--test-users", 3, "--beams", 20, "--save-every", 2, "--eval-every", 2, "--precision", "fp32",
            "--no-progress", "--lora-rank", 4, *extra]


@pytest.fixture(scope="module")
def lora_run(world, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    ok(cli(*finetune_args(world, tiny_model, out)))
    return out


def test_finetune_with_lora_writes_a_merged_model_and_a_peft_adapter_beside_it(lora_run, tiny_model):
    config = json.loads((lora_run / "run_config.json").read_text())
    assert config["lora"]["rank"] == 4 and config["lora"]["alpha"] == 8 and len(config["lora"]["targets"]) == 7
    assert config["train"]["lr"] == pytest.approx(1e-3 * 3 * 2 ** 0.5)  # rank 4: 3 sqrt(8 / 4) x the init'd 1e-3
    for folder in ("final", "best"):
        assert not (lora_run / folder / "adapter_config.json").exists()  # never inside: it would apply twice
        assert (lora_run / f"{folder}-adapter" / "adapter_model.safetensors").exists()
    merged = Decoder.from_pretrained(lora_run / "final").eval()
    back = transformers.AutoModelForCausalLM.from_pretrained(lora_run / "final").eval()
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = merged(ids)
        torch.testing.assert_close(back(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(expected, Decoder.from_pretrained(tiny_model)(ids), atol=1e-4)  # it trained
    peft = pytest.importorskip("peft")
    ref = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny_model),
                                         lora_run / "final-adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_lora_checkpoints_hold_the_adapters_only(lora_run, tiny_model):
    step = sorted((lora_run / "checkpoints").glob("step-*"))[-1]
    assert sorted(p.name for p in step.iterdir()) == ["state.pt", "trainable.safetensors"]
    size = sum(p.stat().st_size for p in step.iterdir())
    assert size < (tiny_model / "model.safetensors").stat().st_size / 2
    assert all(k.endswith((".lora_A", ".lora_B")) for k in load_file(step / "trainable.safetensors"))
    data = json.loads((lora_run / "run_config.json").read_text())["data"]
    ok(cli("evaluate", "--domain", "games", "--data", data, "--model", lora_run / "best", "--users", 3, "--out",
           lora_run.parent / "eval.json"))  # best/ is the merged model: evaluate loads it unchanged


def test_lora_resume_equals_the_uninterrupted_run_and_refuses_another_base(lora_run, world, tiny_model, tmp_path):
    out = tmp_path / "cut"
    real = Checkpoints.save

    def save_then_crash(self, at, records):
        real(self, at, records)
        raise RuntimeError("cut")

    with mock.patch.object(Checkpoints, "save", save_then_crash):
        assert cli(*finetune_args(world, tiny_model, out))[0] == "crash"
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] += 1  # another base of the same shape
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    refused(cli(*finetune_args(world, other, out), "--resume"), "lora.base_fingerprint")
    ok(cli(*finetune_args(world, tiny_model, out), "--resume"))
    for folder, name in (("final", "model.safetensors"), ("final-adapter", "adapter_model.safetensors")):
        want, got = load_file(lora_run / folder / name), load_file(out / folder / name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    refused(cli(*finetune_args(world, tiny_model, tmp_path / "x", "--lora-targets", "qproj")), "--lora-targets qproj")


def test_lora_with_two_processes_equals_one(lora_run, world, tiny_model, tmp_path):
    args = [str(a) for a in finetune_args(world, tiny_model, tmp_path / "two")]
    launch(ROOT / "cprec.py", *args, processes=2)
    one, two = (load_file(run / "final-adapter" / "adapter_model.safetensors") for run in (lora_run, tmp_path / "two"))
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-5, rtol=1e-4)


def test_the_base_is_loaded_in_the_compute_dtype_and_only_adapters_train(tiny_model):
    from extras.options import LoRA
    from train import param_groups
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32), ("fp16", torch.float32)):
        model = LoRA(lora_rank=2, lora_targets="q_proj,v_proj").load(tiny_model, precision, seed=0)
        assert {p.dtype for p in model.parameters() if not p.requires_grad} == {dtype}
        assert {p.dtype for p in lora_state(model).values()} == {torch.float32}
        assert sum(len(g["params"]) for g in param_groups(model, 0.1)) == len(lora_state(model)) == 2 * 2 * 2
    assert LoRA().record(tiny_model) == {} and isinstance(LoRA().load(tiny_model, "bf16", 0), Decoder)
