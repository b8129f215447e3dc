"""Training sections: optimizer steps as `cprec.py pretrain` runs them (train.step: the loop's own step), the chunked
loss against full logits, FSDP2 steps on 1 and 2 processes (CUDA: every GPU), and the memory model of DDP and FSDP
(infra.device.memory_estimate: computed, not measured)."""
from __future__ import annotations

import gc
import math
import multiprocessing as mp
import os
import queue
import shutil
import socket
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from bench.harness import Options, Step, add_memory, peak_memory, throughput, time_interleaved, timed
from data import IGNORE, Blocks
from extras.init import init_weights
from infra.config import SMALL, ModelConfig, config_to_hf
from infra.device import autocast, memory_estimate
from infra.distributed import DTENSOR, Supervised, checkpoint_layers, instance, setup_distributed, shard_fsdp
from infra.files import write_json
from model import Decoder, ours_to_hf
from train import cross_entropy_sum, lm_loss, param_groups, step

# --------------------------------------------------------------------------------------------------- train
QWEN_05B = ModelConfig(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64,
                       intermediate_size=4864, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, tie_embeddings=True,
                       max_positions=32768, architecture="Qwen2ForCausalLM")


def train_step(config: ModelConfig, batch: tuple[int, int, int], precision: str, o: Options,
               supervised: int = 0, compiled: bool = False) -> Step:
    """One optimizer step of `cprec.py pretrain` on packed random blocks (block, micro-batch, accumulation): collate,
    then train.step (the loop's own: accumulation, autocast, clip, AdamW, schedule). `supervised` > 0: a `finetune`
    step, whose loss is only on the last `supervised` tokens of each row (the next item's title after a prompt).
    `compiled`: the model through torch.compile (the step's first run, untimed, compiles it)."""
    (block, micro, accum), device = batch, torch.device(o.device)
    model = Decoder(config)
    init_weights(model, o.seed)
    model.to(device).train()
    net = Supervised(torch.compile(model) if compiled else model, lm_loss)
    optimizer, sched, scaler = optimizer_of(model, device)
    blocks, plan = random_blocks(config, batch, o.seed)

    def run():
        batches = [blocks.collate(b) for b in plan]
        if supervised:  # targets are a view of the inputs (shifted by one): mask a copy
            batches = [(inputs, np.where(np.arange(block) < block - supervised, IGNORE, targets))
                       for inputs, targets in batches]
        step(net, model, batches, (supervised or block) * micro * accum, optimizer, sched, scaler,
             precision=precision, device=device)
    return (lambda: None), run


def optimizer_of(model: Decoder, device: torch.device):
    """AdamW as `pretrain` builds it, a constant schedule and a disabled scaler: what train.step takes."""
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), \
        torch.amp.GradScaler(device.type, enabled=False)


def random_blocks(config: ModelConfig, batch: tuple[int, int, int], seed: int) -> tuple[Blocks, list[list[int]]]:
    """Packed blocks of random tokens and one step's plan of (block, micro-batch, accumulation)."""
    block, micro, accum = batch
    stream = np.random.default_rng(seed).integers(0, config.vocab_size, micro * accum * block + 1, dtype=np.uint32)
    blocks = Blocks(stream, block, micro, seed)
    return blocks, blocks.micro_batches(0)[:accum]


def bench_train(o: Options) -> list[dict]:
    runs = [("small", SMALL, (64, 4, 1) if o.quick else (256, 16, 4), o.precisions)]
    if o.device.startswith("cuda"):
        runs.append(("qwen2.5-0.5b", QWEN_05B, (2048, 4, 2), ["bf16"]))
    rows, probes = [], []
    for name, config, batch, precisions in runs:
        variants = [(p, compiled) for p in precisions for compiled in ([False, True] if o.compile else [False])]
        steps = {v: train_step(config, batch, v[0], o, compiled=v[1]) for v in variants}
        times, slots = time_interleaved(steps, max(o.warmup, int(o.compile)), o.reps, o.device)  # compiling: untimed
        del steps
        gc.collect()
        flops_per_token = config.train_flops_per_token(batch[0])
        for p, compiled in variants:
            rows.append(dict(section="train", model=name + " compiled" * compiled, params=config.n_params,
                             precision=p, batch="×".join(map(str, batch)), config=asdict(config),
                             **throughput(times[p, compiled], math.prod(batch), flops_per_token,
                                             slots[p, compiled])))
            if not compiled:  # memory of the eager step; a fresh process would spend the probe compiling
                probes.append((rows[-1], train_step, (config, batch, p, o)))
    add_memory(o, probes)
    return rows


# --------------------------------------------------------------------------------------------------- loss
LOSSES = ("chunked (train.py)", "full logits")
QUICK_HEAD = ModelConfig(vocab_size=8192, dim=128)  # --quick: a small vocabulary and width for the loss section


def loss_shape(o: Options) -> ModelConfig:
    return QUICK_HEAD if o.quick else QWEN_05B


def loss_step(impl: str, tokens: int, precision: str, o: Options) -> Step:
    """Forward+backward of the training loss from N supervised hidden states at Qwen2.5-0.5B's vocabulary and width:
    ours (train.cross_entropy_sum) or the usual N x V logits, upcast to fp32 for the cross-entropy."""
    gen = torch.Generator().manual_seed(o.seed)
    config, device = loss_shape(o), o.device
    hidden = torch.randn(tokens, config.dim, generator=gen).to(device).requires_grad_()
    weight = (torch.randn(config.vocab_size, config.dim, generator=gen) * 0.02).to(device).requires_grad_()
    targets = torch.randint(0, config.vocab_size, (tokens,), generator=gen).to(device)

    def reset():
        hidden.grad = weight.grad = None

    def run():
        with autocast(precision, torch.device(device)):
            loss = (cross_entropy_sum(hidden, weight, targets) if impl == LOSSES[0] else
                    F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum"))
        loss.backward()  # outside autocast, as its documentation asks
    return reset, run


def bench_loss(o: Options) -> list[dict]:
    tokens = 256 if o.quick else 2048
    config = loss_shape(o)
    flops = 6 * config.dim * config.vocab_size  # the projection's forward and backward, per token
    rows, probes = [], []
    for precision in o.precisions:
        steps = {impl: loss_step(impl, tokens, precision, o) for impl in LOSSES}
        times, slots = time_interleaved(steps, o.warmup, o.reps, o.device)
        for impl in LOSSES:
            rows.append(dict(section="loss", impl=impl, precision=precision, tokens=tokens, vocab=config.vocab_size,
                             **throughput(times[impl], tokens, flops, slots[impl])))
            probes.append((rows[-1], loss_step, (impl, tokens, precision, o)))
    add_memory(o, probes)
    return rows


# --------------------------------------------------------------------------------------------------- fsdp
QWEN_15B = replace(QWEN_05B, dim=1536, n_layers=28, n_heads=12, head_dim=128, intermediate_size=8960)
QWEN_7B = replace(QWEN_05B, vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128,
                  intermediate_size=18944, tie_embeddings=False)


def fsdp_rank(results, rank: int, world: int, port: int, config: ModelConfig, batch: tuple[int, int, int],
              precision: str, checkpointing: bool, o: Options) -> None:
    """One process of an FSDP run as `cprec.py pretrain --shard fsdp` trains (infra.distributed.shard_fsdp, then
    train.step): warm-up steps, then timed steps; puts its times and memory on `results`."""
    device = join(rank, world, port, o)
    model = Decoder(config)
    init_weights(model, o.seed)
    if checkpointing:
        checkpoint_layers(model)
    root = shard_fsdp(model, Supervised(model, lm_loss), device, precision)
    optimizer, sched, scaler = optimizer_of(model, device)
    blocks, plan = random_blocks(config, batch, o.seed)
    mine = [blocks.collate(b) for b in plan[rank::world]]  # this process's share
    block, micro, accum = batch

    def one_step():
        step(root, model, mine, block * micro * accum, optimizer, sched, scaler, precision=precision, device=device,
             world=world)

    for _ in range(max(1, o.warmup)):  # the first step allocates AdamW's state
        one_step()
    state = [*model.parameters(), *(t for s in optimizer.state.values() for t in s.values() if t.dim())]
    state_bytes = sum((t.to_local() if instance(t, *DTENSOR) else t).nbytes for t in state)  # this process's shards
    times = []

    def timed_steps():
        for _ in range(o.reps):
            torch.distributed.barrier()
            times.append(timed(one_step, o.device))
    gc.collect()
    _, memory = peak_memory(timed_steps, o.device)
    results.put(dict(rank=rank, step_s_all=times, state_mib=state_bytes / 2**20, **memory))
    torch.distributed.destroy_process_group()


def join(rank: int, world: int, port: int, o: Options) -> torch.device:
    """Join the benchmark's process group as torchrun's rank `rank` would; this process's device."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    # CPU: every process gets half the threads, so 2 processes use them all and 1 shows the cost per process alone.
    torch.set_num_threads(max(1, o.threads // 2) if o.device == "cpu" else o.threads)
    return setup_distributed()[2]


def fsdp_run(world: int, *args, target=fsdp_rank) -> list[dict]:
    """Each rank of an FSDP run (`target`) in a fresh spawned process (no inherited threads or CUDA state); their
    results."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # Spawned children copy os.environ when they start; glibc returns freed tensors to the OS (see fresh_processes).
    with mock.patch.dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072"):
        procs = [ctx.Process(target=target, args=(results, rank, world, port, *args)) for rank in range(world)]
        for p in procs:
            p.start()
    ranks = []
    while len(ranks) < world:
        try:
            ranks.append(results.get(timeout=5))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                codes = [p.exitcode for p in procs]
                raise RuntimeError(f"an FSDP benchmark process failed: exit codes {codes}") from None
    for p in procs:
        p.join()
    return sorted(ranks, key=lambda r: r["rank"])


def bench_fsdp(o: Options) -> list[dict]:
    cuda = o.device.startswith("cuda")
    if cuda:
        gpus = torch.cuda.device_count()
        runs = [(name, config, (2048, 4, gpus), gpus, "bf16", ac) for name, config in
                (("qwen2.5-0.5b", QWEN_05B), ("qwen2.5-1.5b", QWEN_15B)) for ac in (False, True)]
    else:
        runs = [("small", SMALL, (64, 4, 2) if o.quick else (256, 8, 2), world, "fp32", False) for world in (1, 2)]
    rows = []
    for name, config, batch, world, precision, checkpointing in runs:
        ranks = fsdp_run(world, config, batch, precision, checkpointing, o)
        tokens, flops = math.prod(batch), config.train_flops_per_token(batch[0])
        speed = throughput(ranks[0]["step_s_all"], tokens, flops)
        speed["flops_per_s"] /= world if cuda else 1  # per device: GPUs each have their own, CPU processes share one
        rows.append(dict(section="fsdp", model=name, params=config.n_params, processes=world, precision=precision,
                         checkpointing=checkpointing, batch="×".join(map(str, batch)), **speed,
                         state_mib=max(r["state_mib"] for r in ranks),
                         peak_total_mib=max(r.get("peak_total_mib", math.nan) for r in ranks)))
    if not cuda:
        rows += [dict(section="fsdp", model=name, params=config.n_params, note="needs a GPU")
                 for name, config in (("qwen2.5-0.5b", QWEN_05B), ("qwen2.5-1.5b", QWEN_15B))]
    return rows


# --------------------------------------------------------------------------------------------------- load
def load_rank(results, rank: int, world: int, port: int, path: str, streamed: bool, o: Options) -> None:
    """One process loading a checkpoint for FSDP as `cprec.py pretrain --shard fsdp` does: `streamed`, built on the
    meta device and read one layer at a time as it is sharded; else as before (a7c4e62): the whole model read in fp32,
    then sharded. Puts its peak resident memory on `results`."""
    device = join(rank, world, port, o)

    def load():
        model = Decoder.from_pretrained(path, device="meta" if streamed else "cpu")
        return shard_fsdp(model, Supervised(model, lm_loss), device, "fp32")

    gc.collect()
    _, memory = peak_memory(load, "cpu")
    results.put(dict(rank=rank, **memory))
    torch.distributed.destroy_process_group()


def bench_load(o: Options) -> list[dict]:
    """Peak host memory per process loading a Qwen2.5-0.5B-shape checkpoint (random bf16 weights) for FSDP on 1 and 2
    processes, before (whole model in fp32 per process) and after (each layer read as it is sharded)."""
    config = SMALL if o.quick else QWEN_05B
    path = Path(tempfile.mkdtemp(prefix="cprec-load-"))
    try:
        with torch.device("meta"):
            model = Decoder(config)
        generator = torch.Generator().manual_seed(o.seed)
        state = {ours_to_hf(k): (torch.randn(v.shape, generator=generator) * 0.02).to(torch.bfloat16)
                 for k, v in model.state_dict().items() if not (config.tie_embeddings and k == "lm_head.weight")}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        write_json(path / "config.json", config_to_hf(config, torch.bfloat16))
        stored = sum(v.nbytes for v in state.values())
        del state
        rows = []
        for streamed in (False, True):
            for world in (1, 2):
                ranks = fsdp_run(world, str(path), streamed, o, target=load_rank)
                peak = max(r.get("peak_mem_mib", math.nan) for r in ranks)
                rows.append(dict(section="load", model="small" if o.quick else "qwen2.5-0.5b", params=config.n_params,
                                 stored_mib=stored / 2**20, processes=world, peak_mib=peak, ratio=peak * 2**20 / stored,
                                 loader="streamed" if streamed else "before"))
        return rows
    finally:
        shutil.rmtree(path)


# --------------------------------------------------------------------------------------------------- memory
def bench_memory(o: Options) -> list[dict]:
    """infra.device.memory_estimate's GiB per GPU: full training on 8 x 80 GB, then LoRA on one GPU (24 or 80 GB) with
    the settings that decide whether it fits (rank, activation checkpointing, tokens per micro-batch, base dtype)."""
    rows = []
    models = {"qwen2.5-0.5b": QWEN_05B, "qwen2.5-1.5b": QWEN_15B, "qwen2.5-7b": QWEN_7B}
    for name, config in models.items():
        for shard in ("ddp", "fsdp"):
            for checkpointing in (False, True):
                rows.append(memory_row(name, config, 8, 80, shard, checkpointing, MEMORY_TOKENS))
    for name, gb in (("qwen2.5-0.5b", 24), ("qwen2.5-1.5b", 24), ("qwen2.5-7b", 24), ("qwen2.5-7b", 80)):
        rows.append(memory_row(name, models[name], 1, gb, "none", True, MEMORY_TOKENS))  # full training, for contrast
        for rank, checkpointing, tokens, base in LORA_SETTINGS:
            rows.append(memory_row(name, models[name], 1, gb, "none", checkpointing, tokens, rank, base))
    return rows


# (rank, activation checkpointing, tokens per micro-batch, bytes per base weight): LoRA's rows on one GPU
LORA_SETTINGS = [(16, False, 8192, 2), (16, False, 2048, 2), (16, True, 8192, 2), (64, True, 8192, 2),
                 (16, True, 8192, 4)]


def memory_row(name: str, config: ModelConfig, gpus: int, gb: int, shard: str, checkpointing: bool, tokens: int,
               rank: int = 0, base: int = 2) -> dict:
    """One row of the memory table: the estimate, and whether it fits in 90% of the GPU (slack for the CUDA context
    and the allocator)."""
    embedding = config.vocab_size * config.dim * (1 if config.tie_embeddings else 2)
    estimate = memory_estimate(config.n_params, config.n_layers, config.dim, embedding, tokens, gpus, shard,
                               checkpointing, adapters=config.lora_params(rank) if rank else 0, base_bytes=base)
    return dict(section="memory", model=name, params=config.n_params, gpus=f"{gpus} x {gb} GB", shard=shard,
                training=f"LoRA r{rank}, {'bf16' if base == 2 else 'fp32'} base" if rank else "full", tokens=tokens,
                checkpointing=checkpointing, **estimate, fits=estimate["total_gib"] < 0.9 * gb * 1e9 / 2**30)


MEMORY_TOKENS = 2048 * 4  # docs/scaling.md's pretrain micro-batch: --block-len 2048 --micro-batch 4

