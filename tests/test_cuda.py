"""On a CUDA GPU (skipped without one): our decoder equals CPU fp32, a bf16 step tracks fp32, fp16's loss scaler
skips an overflow and resumes exactly, fused AdamW equals the unfused one, beam search returns CPU's items, FSDP2 on
one GPU equals the unsharded run, --compile follows eager, and peak memory matches infra.device.memory_estimate.
`python -m bench.check` runs this file first on a GPU machine."""
import contextlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from eval import beam_search, build_trie
from extras.init import init_weights
from extras.options import LoRA
from helpers import BadGradients, StopAt, config, cpt_setup, read_records
from infra.config import ModelConfig
from infra.device import memory_estimate
from infra.distributed import Supervised, wrap
from infra.runs import Interrupted, open_run
from model import Decoder, apply_lora
from train import lm_loss, param_groups, step, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def one_process_group():
    """FSDP on one GPU makes a one-member process group; the next test starts without it."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
QWEN_05B = ModelConfig(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64,
                       intermediate_size=4864, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, tie_embeddings=True,
                       max_positions=32768, architecture="Qwen2ForCausalLM")


def run_on(device, world, tiny_model, out, cfg, data=None):
    blocks, tokenizer = cpt_setup(world, tiny_model)
    return train(Decoder.from_pretrained(tiny_model), data or blocks, cfg, open_run(out, {"t": 1}, False, False),
                 tokenizer=tokenizer, device=device)


def final(run):
    return load_file(run / "final" / "model.safetensors")


def close(a: dict, b: dict, **tolerance) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tolerance, msg=k)


def test_decoder_on_cuda_equals_cpu_fp32(tiny_model):
    ids = torch.randint(3, 500, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = Decoder.from_pretrained(tiny_model).eval()(ids)
        gpu = Decoder.from_pretrained(tiny_model, device=CUDA).eval()(ids.to(CUDA)).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


def test_a_bf16_run_tracks_the_fp32_one(world, tiny_model, tmp_path):
    run_on(CUDA, world, tiny_model, tmp_path / "fp32", config(precision="fp32"))
    run_on(CUDA, world, tiny_model, tmp_path / "bf16", config(precision="bf16"))
    losses = [[r["loss"] for r in read_records(tmp_path / d) if "loss" in r] for d in ("fp32", "bf16")]
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-2)


def test_fp16_skips_an_overflow_lowers_the_scale_and_resumes_exactly(world, tiny_model, tmp_path):
    blocks, tokenizer = cpt_setup(world, tiny_model)
    cfg = config(precision="fp16", save_every=2)
    for name, stop in (("whole", None), ("cut", 5)):
        model = Decoder.from_pretrained(tiny_model)
        data = BadGradients(blocks, model, [3], cfg.accum)
        with pytest.raises(Interrupted) if stop else contextlib.nullcontext():
            train(model, StopAt(data, stop, cfg.accum) if stop else data, cfg,
                  open_run(tmp_path / name, {"t": 1}, False, False), tokenizer=tokenizer, device=CUDA)
    train(Decoder.from_pretrained(tiny_model), blocks, cfg, open_run(tmp_path / "cut", {"t": 1}, True, False),
          tokenizer=tokenizer, device=CUDA, resume=True)
    records = read_records(tmp_path / "whole")
    assert records[2]["skipped"] is True and records[2]["scale"] == records[1]["scale"] / 2
    np.testing.assert_allclose([r["loss"] for r in read_records(tmp_path / "cut")], [r["loss"] for r in records],
                               rtol=1e-6)
    close(final(tmp_path / "cut"), final(tmp_path / "whole"), atol=1e-6, rtol=1e-5)


def test_fused_adamw_equals_the_unfused_one(world, tiny_model):
    blocks, _ = cpt_setup(world, tiny_model)
    batches = [blocks.collate(b) for b in blocks.micro_batches(0)[:4]]
    weights = []
    for fused in (False, True):
        model = Decoder.from_pretrained(tiny_model, device=CUDA)
        optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        for batch in batches:
            step(Supervised(model, lm_loss), model, [batch], batch[1].size, optimizer, sched,
                 torch.amp.GradScaler("cuda", enabled=False), precision="fp32", device=CUDA)
        weights.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
    close(weights[1], weights[0], atol=1e-6, rtol=1e-5)


def test_beam_search_on_cuda_returns_cpus_items():
    config_ = ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=64)
    model = Decoder(config_)
    init_weights(model, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    rng = np.random.default_rng(0)
    items = [list(i) for i in {tuple(rng.integers(2, 40, n - 1).tolist()) + (1,): None for n in rng.integers(2, 9, 80)}]
    prompts = [rng.integers(2, 40, n).tolist() for n in rng.integers(1, 30, 12)]
    cpu, _ = beam_search(model.eval(), prompts, build_trie(items), 10, 0)
    gpu, _ = beam_search(model.to(CUDA), prompts, build_trie(items, CUDA), 10, 0)
    assert gpu.cpu().tolist() == cpu.tolist()


def test_fsdp_on_one_gpu_equals_the_unsharded_run(world, tiny_model, tmp_path):
    run_on(CUDA, world, tiny_model, tmp_path / "plain", config(precision="fp32"))
    run_on(CUDA, world, tiny_model, tmp_path / "fsdp", config(precision="fp32", shard="fsdp"))
    close(final(tmp_path / "fsdp"), final(tmp_path / "plain"), atol=1e-5, rtol=1e-4)


def test_compile_on_cuda_follows_eager(world, tiny_model, tmp_path):
    run_on(CUDA, world, tiny_model, tmp_path / "eager", config(precision="bf16"))
    run_on(CUDA, world, tiny_model, tmp_path / "compiled", config(precision="bf16", compile=True))
    losses = [[r["loss"] for r in read_records(tmp_path / d) if "loss" in r] for d in ("eager", "compiled")]
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-2)


def test_peak_memory_of_a_05b_step_is_within_15_percent_of_the_estimate(record_property):
    """FSDP2 on one GPU (what memory_estimate models, with 1 GPU), bf16, one micro-batch of 4 x 2048 tokens."""
    torch.cuda.empty_cache()
    model = Decoder(QWEN_05B)
    init_weights(model, 0)
    net = wrap(model, lm_loss, CUDA, "bf16", "fsdp")
    measured = peak_step_gib(model, net)
    embedding = QWEN_05B.vocab_size * QWEN_05B.dim
    estimate = memory_estimate(QWEN_05B.n_params, QWEN_05B.n_layers, QWEN_05B.dim, embedding, 4 * 2048, gpus=1)
    record_property("peak_gib", measured)  # into the GPU check's report (bench/check.py)
    record_property("estimate_gib", estimate["total_gib"])
    assert abs(measured / estimate["total_gib"] - 1) <= 0.15, (measured, estimate)


def lora_on(device, world, tiny_model, out, cfg):
    """A LoRA run as the commands start one: the base in the compute dtype, on the meta device under FSDP."""
    blocks, tokenizer = cpt_setup(world, tiny_model)
    net = LoRA(lora_rank=4).load(tiny_model, cfg.precision, seed=0, shard=cfg.shard)
    return train(net, blocks, cfg, open_run(out, {"t": 1}, False, False), tokenizer=tokenizer, device=device)


def test_fsdp_with_lora_on_one_gpu_follows_the_unsharded_run(world, tiny_model, tmp_path):
    """bf16 base beside fp32 adapters under FSDP2's MixedPrecisionPolicy (bf16 gathers, fp32 reduction)."""
    lora_on(CUDA, world, tiny_model, tmp_path / "plain", config(precision="bf16"))
    lora_on(CUDA, world, tiny_model, tmp_path / "fsdp", config(precision="bf16", shard="fsdp"))
    adapters = [load_file(tmp_path / d / "final-adapter" / "adapter_model.safetensors") for d in ("fsdp", "plain")]
    close(*adapters, atol=1e-3, rtol=2e-2)


def test_peak_memory_of_a_05b_lora_step_against_the_estimate(record_property):
    """LoRA rank 16 on one GPU, bf16 base, activation checkpointing, one micro-batch of 4 x 2048 tokens: the row of
    `python -m bench --only memory` that docs/scaling.md's one-GPU recipe relies on."""
    torch.cuda.empty_cache()
    model = Decoder(QWEN_05B)
    init_weights(model, 0)
    model = apply_lora(model.to(torch.bfloat16), rank=16, alpha=32)
    net = wrap(model, lm_loss, CUDA, "bf16", "none", activation_checkpointing=True)
    measured = peak_step_gib(model, net)
    embedding = QWEN_05B.vocab_size * QWEN_05B.dim
    estimate = memory_estimate(QWEN_05B.n_params, QWEN_05B.n_layers, QWEN_05B.dim, embedding, 4 * 2048, gpus=1,
                               shard="none", checkpointing=True, adapters=QWEN_05B.lora_params(16))
    record_property("lora_peak_gib", measured)  # into the GPU check's report (bench/check.py)
    record_property("lora_estimate_gib", estimate["total_gib"])
    assert measured <= 1.3 * estimate["total_gib"], (measured, estimate)


def peak_step_gib(model, net) -> float:
    """Peak GiB allocated by the second bf16 step of one 4 x 2048-token micro-batch (the first allocates AdamW's
    state)."""
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    ids = torch.randint(0, QWEN_05B.vocab_size, (4, 2049), generator=torch.Generator().manual_seed(0)).numpy()
    batch = [(ids[:, :-1], ids[:, 1:])]
    step(net, model, batch, ids[:, 1:].size, optimizer, sched, scaler, precision="bf16", device=CUDA)  # AdamW state
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step(net, model, batch, ids[:, 1:].size, optimizer, sched, scaler, precision="bf16", device=CUDA)
    return torch.cuda.max_memory_allocated() / 2**30
