"""One training loop for continual pre-training and fine-tuning: AMP, exact gradient accumulation, DDP, checkpoints.

A step takes `accum` micro-batches, spread over the ranks. The loss is summed over supervised tokens and divided by
the supervised-token count of the whole step (known in advance from the deterministic batch plan), so the update
is the exact per-token mean of the effective batch however it is split (torchtune's rule; loss/accum is wrong for
variable-length masked sequences). Data order is a function of the step number alone, so resuming needs only the
step, and a resumed run equals an uninterrupted one bit for bit on CPU.

Read top to bottom: the loss, then `train` and its phases (accumulate -> clip -> update -> schedule -> log ->
checkpoint/validate); the hardening follows (devices, pre-run checks, run directory and checkpoints, FSDP2 sharding).
"""
from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from common import TEMPORARY_DIR, UserError, atomic_dir, progress, read_json, write_json
from data import IGNORE, Case, Dataset, Encoder, Examples, own_output, target_example
from model import Decoder, hf_to_ours
from schedule import Schedule, scheduler
from schedule import validate as validate_schedule  # noqa: I001 (one name, two meanings)
from tokenizer import Tokenizer


@dataclass
class TrainConfig:
    steps: int  # optimizer steps
    accum: int  # micro-batches per optimizer step, summed over all ranks
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    schedule: Schedule = field(default_factory=Schedule)
    precision: str = "auto"  # auto, fp32, bf16, fp16 (CUDA only, with a GradScaler)
    seed: int = 0
    save_every: int = 0  # steps between resumable checkpoints; 0 = only at the end (and on interrupt)
    eval_every: int = 0  # steps between validations; 0 = only at the end
    select: str | None = None  # keep the checkpoint that maximises this validation metric in best/
    keep: int = 2  # resumable checkpoints kept on disk (>= 2: resume falls back when the latest is unreadable)
    max_skips: int = 3  # stop after this many consecutive steps with a non-finite loss or gradient (skipped)
    progress: bool = True
    shard: str = "auto"  # auto (ddp for several processes, none for one), none, ddp, fsdp
    activation_checkpointing: bool = False  # recompute each decoder layer in backward
    compile: bool = False  # torch.compile the model (inductor): fused kernels, the same math up to rounding


# --------------------------------------------------------------------------------------------------- loss
def cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      chunk: int | None = None) -> torch.Tensor:
    """Sum of token cross-entropies from hidden states of supervised positions, (N, d), and their targets, (N,).

    Up to `chunk` tokens this is the plain projection and cross-entropy. Beyond, the vocabulary projection runs a
    chunk at a time and each chunk's gradients are computed right there (ChunkedCrossEntropy), so a 150k-token
    vocabulary never materialises an N x V logit tensor, and nothing is recomputed in backward.
    """
    chunk = chunk or max(256, 2**25 // weight.shape[0])
    if len(targets) <= chunk:
        return F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else None
    with torch.autocast(hidden.device.type, enabled=False):  # the Function casts by itself, as autocast would
        return ChunkedCrossEntropy.apply(hidden, weight, targets, chunk, dtype or hidden.dtype)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk: d loss / d logits = softmax - one-hot, then
    d hidden = that @ W and d W += that^T @ hidden. The same three matmuls as plain autograd, with one chunk of
    logits alive at a time; backward only scales the stored gradients by the incoming one."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, dtype: torch.dtype):
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, len(targets), chunk):
            h, t = hidden[i:i + chunk].to(dtype), targets[i:i + chunk]
            logits = (h @ w.t()).float()
            loss += F.cross_entropy(logits, t, reduction="sum")
            grad_logits = logits.softmax(-1)
            grad_logits[torch.arange(len(t), device=t.device), t] -= 1
            grad_logits = grad_logits.to(dtype)
            grad_hidden[i:i + chunk] = grad_logits @ w
            grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


def micro_step_loss(model, lm_head: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed loss of one micro-batch: the model returns hidden states only where a target exists."""
    if isinstance(model, SupervisedLoss):  # FSDP: the loss runs inside the root's forward, lm_head gathered
        return model(inputs, targets)
    supervised = targets != IGNORE
    hidden = model(inputs, hidden=True, select=supervised)
    return cross_entropy_sum(hidden, lm_head, targets[supervised])


def accumulate(model, lm_head, batches, n_targets: int, world: int, precision: str, device,
               scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches; gradients end as d(mean token loss of the step).

    DDP and FSDP average gradients over ranks, hence the factor `world`; they sync only on the last micro-batch."""
    total = torch.zeros((), device=device)
    for i, (inputs, targets) in enumerate(batches):
        with gradient_sync(model, i == len(batches) - 1), autocast(precision, device):
            loss = micro_step_loss(model, lm_head, torch.as_tensor(inputs, device=device),
                                   torch.as_tensor(targets, device=device))
        scaled = loss * world / n_targets
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.detach()
    return total


class MicroBatches:
    """The endless, deterministic sequence of micro-batches, epoch after epoch: step s takes [s·accum, (s+1)·accum)."""

    def __init__(self, data):
        self.data, self.epochs, self.offsets = data, [], [0]

    def __getitem__(self, k: int) -> list[int]:
        while k >= self.offsets[-1]:
            self.epochs.append(self.data.micro_batches(len(self.epochs)))
            self.offsets.append(self.offsets[-1] + len(self.epochs[-1]))
        e = bisect.bisect_right(self.offsets, k) - 1
        return self.epochs[e][k - self.offsets[e]]

    def epoch_size(self) -> int:
        self[0]
        return self.offsets[1]


def target_loss(model: Decoder, encoder: Encoder, ds: Dataset, cases: list[Case], key: str,
                tokens: int = 8192) -> float:
    """Mean per-token loss of the held-out items' tokens after their histories (CPT's validation loss)."""
    data = Examples([target_example(ds, encoder, c, key) for c in cases], tokens, encoder.tokenizer.pad_id, seed=0)
    device = model.embed_tokens.weight.device
    total = n = 0
    for batch in data.micro_batches(0):
        inputs, targets = (torch.as_tensor(a, device=device) for a in data.collate(batch))
        total += float(micro_step_loss(model, model.lm_head.weight, inputs, targets))
        n += data.n_targets(batch)
    return total / n


# --------------------------------------------------------------------------------------------------- the loop
@dataclass
class Loop:
    """What the phases of a step read and update, made once by `setup`."""
    cfg: TrainConfig
    raw: Decoder  # the model itself
    model: torch.nn.Module  # `raw`, or `raw` under DDP, or SupervisedLoss(`raw`) under FSDP
    tokenizer: Tokenizer
    optimizer: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    run: Path
    device: torch.device
    precision: str
    rank: int
    world: int
    validate: Callable[[Decoder], dict] | None
    peak: float  # FLOP/s, the MFU denominator
    best: dict | None = None  # the selected checkpoint so far: {"step": .., cfg.select: ..}
    records: list[dict] = field(default_factory=list)  # metrics.jsonl of the whole run (rank 0)
    skipped: int = 0  # consecutive steps whose update was skipped
    shard: str = "none"  # none, ddp or fsdp


def setup(model: Decoder, tokenizer: Tokenizer, cfg: TrainConfig, run: Path, device: torch.device, rank: int,
          world: int, validate: Callable[[Decoder], dict] | None) -> Loop:
    """Model on its device (under DDP or FSDP for several processes), AdamW, the schedule and the loss scaler."""
    check(cfg, device, world)
    precision = resolve_precision(cfg.precision, device)
    shard = resolve_shard(cfg.shard, world)
    if cfg.activation_checkpointing:
        checkpoint_layers(model)
    raw = model if shard == "fsdp" else model.to(device)  # FSDP moves one layer at a time, sharding it
    wrapped = raw
    if shard == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda"
                                                            else None)
    if shard == "fsdp":
        wrapped = shard_fsdp(raw, device, precision)
    if cfg.compile:  # compiles at the first micro-batch, and once more, shape-generic, at the first new shape
        wrapped = torch.compile(wrapped)
    optimizer = torch.optim.AdamW(param_groups(raw, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  fused=device.type == "cuda")
    best = read_json(run / "best.json") if (run / "best.json").exists() else None
    return Loop(cfg, raw, wrapped, tokenizer, optimizer, scheduler(optimizer, cfg.schedule, cfg.steps),
                torch.amp.GradScaler(device.type, enabled=precision == "fp16"), run, device, precision, rank, world,
                validate, peak_flops(device, precision), best, shard=shard)


def restore(loop: Loop, state: dict) -> int:
    """Load a checkpoint's optimizer, schedule, scaler and RNG state and the log up to it; return its step.

    A learning rate changed on --resume replaces the saved one from here on (the schedule's shape is kept)."""
    if loop.shard == "fsdp":  # weights and AdamW state from the shards, into this run's shards
        load_sharded_checkpoint(loop, Path(state["sharded"]))
    else:
        loop.optimizer.load_state_dict(state["optimizer"])
    loop.sched.load_state_dict(state["scheduler"])
    loop.scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"])
    if loop.sched.base_lrs[0] != loop.cfg.lr:
        loop.sched.base_lrs = [loop.cfg.lr for _ in loop.optimizer.param_groups]
        for group, rule in zip(loop.optimizer.param_groups, loop.sched.lr_lambdas):
            group["initial_lr"], group["lr"] = loop.cfg.lr, loop.cfg.lr * rule(loop.sched.last_epoch)
    loop.records = read_log(loop.run / "metrics.jsonl", state["step"])
    if loop.rank == 0:
        write_log(loop.run / "metrics.jsonl", loop.records)  # whatever came after the checkpoint is redone
    return state["step"]


def gather(loop: Loop, loss_sum: torch.Tensor, n_targets: int, stop: bool) -> tuple[float, bool]:
    """The step's mean token loss over all processes, and whether any process was asked to stop."""
    stats = torch.stack([loss_sum, torch.tensor(float(stop), device=loop.device)])
    if loop.world > 1:
        dist.all_reduce(stats)
    return stats[0].item() / n_targets, bool(stats[1] > 0)


def clip(loop: Loop) -> float:
    """Unscale (fp16) and clip the gradients; return their norm before clipping."""
    loop.scaler.unscale_(loop.optimizer)
    return clip_grad_norm(loop.raw, loop.cfg.grad_clip)


def update(loop: Loop, loss: float, grad_norm: float) -> bool:
    """Apply the gradients if the loss and their norm are finite; else skip the update, leaving weights and AdamW's
    state as they were. Returns whether it was applied. (fp16: the GradScaler skips overflowing steps itself.)"""
    applied = math.isfinite(loss) and math.isfinite(grad_norm)
    stepped = applied or loop.scaler.is_enabled() and math.isfinite(loss)
    if stepped:
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
    loop.optimizer.zero_grad(set_to_none=True)
    loop.skipped = 0 if stepped else loop.skipped + 1
    return applied


def schedule_step(loop: Loop) -> float:
    """Advance the schedule by one optimizer step; return the learning rate the step used."""
    lr = loop.optimizer.param_groups[0]["lr"]
    loop.sched.step()
    return lr


def finite(x: float, digits: int) -> float | None:
    return round(x, digits) if math.isfinite(x) else None  # JSON has no NaN: metrics.jsonl stays valid JSON


def log_step(loop: Loop, log, record: dict, began: float, flops: float) -> dict:
    """Complete the step's record with its timing, throughput and memory, and append it to metrics.jsonl."""
    if loop.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    record.update(tokens_per_s=round(record["tokens"] / seconds), mfu=round(flops / seconds / loop.peak, 4),
                  mem_gb=round(peak_memory_gb(loop.device), 3), seconds=round(seconds, 4))
    if record["mfu"] > 1 and loop.device.type == "cpu":  # the cached peak was measured on a busy machine
        loop.peak = peak_flops(loop.device, loop.precision, remeasure=True)
        warn(f"step {record['step']}: MFU {record['mfu']:.0%} exceeds 100%, so the peak matmul probe had "
             f"under-measured; measured again: {loop.peak / 1e9:.1f} GFLOP/s from here on", loop.rank)
    write_record(loop, log, record)
    return record


def write_record(loop: Loop, log, record: dict) -> None:
    if log:
        log.write(json.dumps(record, allow_nan=False) + "\n")
        log.flush()
        loop.records.append(record)


def stop_if_diverged(loop: Loop, step: int) -> None:
    if loop.skipped >= loop.cfg.max_skips:
        raise UserError(f"non-finite loss or gradients in {loop.skipped} consecutive steps "
                        f"({step - loop.skipped + 1}-{step}), none applied; the last intact checkpoint is "
                        f"{latest_name(loop.run)}; lower --lr and continue with the same command plus --resume")


def checkpoint(loop: Loop, step: int) -> None:
    if loop.shard == "fsdp":
        save_sharded_checkpoint(loop, step)
    elif loop.rank == 0:
        save_checkpoint(loop.run, step, loop.raw, loop.tokenizer, loop.optimizer, loop.sched, loop.scaler,
                        loop.cfg.keep)
    if loop.world > 1:
        dist.barrier()


def validation(loop: Loop, log, step: int) -> None:
    """Validate on rank 0, keep the checkpoint that maximises cfg.select in best/, then log the result (so a logged
    validation always has its best/ on disk). Under FSDP rank 0 validates a gathered copy."""
    net = consolidate(loop) if loop.shard == "fsdp" and loop.validate is not None else loop.raw
    if loop.rank == 0 and loop.validate is not None:
        net.to(loop.device).eval()
        with torch.no_grad(), autocast(loop.precision, loop.device):
            result = loop.validate(net)
        net.train()
        select = loop.cfg.select
        if select and (loop.best is None or result[select] > loop.best[select]):
            loop.best = {"step": step, select: result[select]}
            net.save_pretrained(loop.run / "best", loop.tokenizer)
            write_json(loop.run / "best.json", loop.best)
        write_record(loop, log, {"step": step, "validation": result})
    if loop.world > 1:
        dist.barrier()


def due(step: int, every: int, total: int) -> bool:
    return step == total or bool(every) and step % every == 0


def validated(records: list[dict], step: int) -> bool:
    return any(r["step"] == step and "validation" in r for r in records)


def summarize(loop: Loop) -> dict:
    """The whole run's totals from its log, so a resumed run counts the steps before the resume too."""
    steps = [r for r in loop.records if "tokens" in r]
    losses = [r["loss"] for r in steps if r["loss"] is not None]
    checks = [r["validation"] for r in loop.records if "validation" in r]
    tokens, seconds = sum(r["tokens"] for r in steps), sum(r["seconds"] for r in steps)
    return {"steps": loop.cfg.steps, "precision": loop.precision, "world_size": loop.world, "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9), "loss": losses[-1] if losses else None,
            "skipped_steps": sum(r.get("skipped", False) for r in steps), "validation": checks[-1] if checks else None,
            "peak_mem_gb": peak_memory_gb(loop.device), "best": loop.best}


def train(model: Decoder, tokenizer: Tokenizer, data, cfg: TrainConfig, run: Path, *, device: torch.device,
          rank: int = 0, world: int = 1, resume: bool = False,
          validate: Callable[[Decoder], dict] | None = None) -> dict:
    """Train `model` on `data` (data.Blocks or data.Examples) for cfg.steps optimizer steps; return a summary.

    --resume continues from the latest readable checkpoint; if the steps were all done (a run stopped during its
    final validation), it writes what is missing."""
    state = resume_state(run, model, rank) if resume else None
    loop = setup(model, tokenizer, cfg, run, device, rank, world, validate)
    start = restore(loop, state) if resume else 0
    if not resume:
        torch.manual_seed(cfg.seed)
    micro = MicroBatches(data)
    loop.raw.train()
    with (open(run / "metrics.jsonl", "a" if resume else "w") if rank == 0 else contextlib.nullcontext()) as log, \
            StopRequest(announce=rank == 0) as stop, \
            progress_bar(cfg.steps, start, enabled=rank == 0 and cfg.progress) as bar:
        if resume and due(start, cfg.eval_every, cfg.steps) and not validated(loop.records, start):
            validation(loop, log, start)  # stopped between its checkpoint and its validation
        for step in range(start, cfg.steps):
            began = time.perf_counter()
            plan = [micro[step * cfg.accum + j] for j in range(cfg.accum)]
            n_targets = sum(data.n_targets(b) for b in plan)
            batches = [data.collate(b) for b in plan[rank::world]]
            loss_sum = accumulate(loop.model, loop.raw.lm_head.weight, batches, n_targets, world, loop.precision,
                                  device, loop.scaler)
            loss, stopping = gather(loop, loss_sum, n_targets, stop.requested)
            grad_norm = clip(loop)
            applied = update(loop, loss, grad_norm)
            lr = schedule_step(loop)
            record = {"step": step + 1, "loss": finite(loss, 5), "lr": lr, "grad_norm": finite(grad_norm, 4),
                      "tokens": sum(data.n_tokens(b) for b in plan), **({} if applied else {"skipped": True})}
            flops = sum(x.size * loop.raw.config.train_flops_per_token(x.shape[1]) for x, _ in batches)
            bar(log_step(loop, log, record, began, flops))
            stop_if_diverged(loop, step + 1)
            if stopping or due(step + 1, cfg.save_every, cfg.steps):
                checkpoint(loop, step + 1)
            if stopping:
                raise Interrupted(f"interrupted at step {step + 1}/{cfg.steps}; checkpoint saved in {run}; "
                                  "continue with the same command plus --resume")
            if due(step + 1, cfg.eval_every, cfg.steps):
                validation(loop, log, step + 1)
    final = consolidate(loop) if loop.shard == "fsdp" else loop.raw  # every process takes part
    if rank != 0:
        return {"steps": cfg.steps, "precision": loop.precision, "world_size": world}
    final.save_pretrained(run / "final", tokenizer)
    return {**summarize(loop), "curves": plot_curves(run)}


@contextlib.contextmanager
def progress_bar(total: int, start: int, enabled: bool):
    """common.progress with the latest loss, learning rate, throughput and MFU; called once per step."""
    with progress(total, "step", enabled, start) as advance:
        yield lambda r: advance(1, f"loss {'non-finite' if r['loss'] is None else format(r['loss'], '.4f')}  "
                                   f"lr {r['lr']:.2e}  {r['tokens_per_s']:,} tok/s  MFU {r['mfu']:.1%}")


def plot_curves(run: Path) -> str:
    """Loss and learning rate against steps (the WSA shape shows here), when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped curves.png: matplotlib is not installed (optional: pip install matplotlib)"
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    steps = [r for r in records if "tokens" in r and r["loss"] is not None]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="train")
    val = [r for r in records if "val_loss" in r.get("validation", {})]  # CPT validates by loss, SFT by NDCG
    if val:
        ax_loss.plot([r["step"] for r in val], [r["validation"]["val_loss"] for r in val], "o-", label="validation")
        ax_loss.legend()
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_lr.plot([r["step"] for r in steps], [r["lr"] for r in steps], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(run / "curves.png", dpi=120)
    plt.close(fig)
    return str(run / "curves.png")

# --------------------------------------------------------------------------------------------------- devices
def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); under torchrun one process per GPU (NCCL), or per CPU process (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if torch.cpu._is_avx512_bf16_supported() else "fp32"  # emulated bf16 would be slower
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"--precision {precision!r}: expected auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    return precision


def autocast(precision: str, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


MATMUL_N = {"cpu": 2048, "cuda": 8192}  # the peak probe's matmul size per device type
DATASHEET = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}  # dense bf16 FLOP/s


def matmul_flops(device: torch.device, precision: str, n: int | None = None, reps: int = 10) -> float:
    """Best-of-`reps` FLOP/s of one n x n matmul after a warm-up: the practical peak of this device and thread count
    (the best repetition, because a busy machine only ever makes a repetition slower)."""
    n = n or MATMUL_N[device.type]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up: thread pool, kernel selection, weight packing
    best = math.inf
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def peak_flops(device: torch.device, precision: str, remeasure: bool = False) -> float:
    """The device's peak FLOP/s for MFU: datasheet dense numbers on known GPUs; on CPU the best matmul probe ever
    seen on this machine (cached in ~/.cache/cprec), since one probe on a busy machine under-measures the peak."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in DATASHEET.items() if k in name), 312e12) / (2 if precision == "fp32" else 1)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cprec" / "peak_flops.json"
    key = f"{cpu_name()} | {torch.get_num_threads()} threads | {precision} | torch {torch.__version__}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known and not remeasure:
        return known[key]
    known[key] = max(matmul_flops(device, precision, reps=10), known.get(key, 0.0))
    with contextlib.suppress(OSError):  # a read-only home only costs the next run a probe
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, known)
    return known[key]


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown cpu"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups: weight decay on matrices, none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB: process peak RSS


# --------------------------------------------------------------------------------------------------- checks
def check(cfg: TrainConfig, device: torch.device, world: int, context: int | None = None, longest: int = 0,
          option: str = "", model: str = "the model") -> None:
    """Every check of a run's settings, made before a run directory is created for them: schedule, precision, the
    split of each step's micro-batches over the processes and, given the model's context, the longest sequence."""
    if not cfg.lr > 0:
        raise UserError(f"--lr {cfg.lr}: expected a learning rate > 0")
    for name, every in (("--save-every", cfg.save_every), ("--eval-every", cfg.eval_every)):
        if every < 0:
            raise UserError(f"{name} {every}: expected a step count >= 0 (0 = at the end)")
    if cfg.steps < 1 or cfg.accum < 1 or cfg.keep < 1 or cfg.max_skips < 1:
        raise ValueError(f"TrainConfig: steps, accum, keep and max_skips must be >= 1 ({cfg})")
    validate_schedule(cfg.schedule, cfg.steps)
    precision = resolve_precision(cfg.precision, device)  # refuses a precision this device cannot run
    if resolve_shard(cfg.shard, world) == "fsdp" and precision == "fp16":
        raise UserError("--shard fsdp trains in bf16 or fp32; use --precision bf16 (fp16 loss scaling is not sharded)")
    if cfg.compile and resolve_shard(cfg.shard, world) == "fsdp":
        raise UserError("--compile with --shard fsdp: not supported; use --shard ddp or drop --compile")
    if cfg.compile and device.type == "cpu" and not any(map(shutil.which, (os.environ.get("CXX", "g++"), "c++"))):
        raise UserError("--compile on CPU needs a C++ compiler for inductor (g++, c++ or $CXX); install one or drop "
                        "--compile")
    if cfg.accum % world:  # each process takes an equal share of a step, so the batch plan is the same on any count
        raise UserError(f"--batch-tokens: {cfg.accum} micro-batches per step do not split evenly over {world} "
                        f"processes; use a multiple of {world} micro-batches")
    if context is not None and longest > context:
        raise UserError(f"{option}: {longest}-token sequences exceed the context of {model} ({context} tokens)")


# --------------------------------------------------------------------------------------------------- run directory
# What a crashed save leaves behind: atomic_dir's `.NAME.tmpPID` / `.NAME.oldPID` siblings, write_json's
# `FILE.tmpPID`, `latest.tmp` and the log's rewrite. Only these names are ever removed.
CHECKPOINT_NAME = re.compile(r"step-\d{7}|best|final")  # the directories a run writes through atomic_dir
LEFTOVER_FILE = re.compile(r"latest\.tmp|(run_config|best|results)\.json\.tmp\d+|metrics\.jsonl\.tmp\d+")
RUN_FILES = {"run_config.json", "metrics.jsonl", "checkpoints", "latest", "final", "best", "best.json", "results.json",
             "results-per_user.jsonl", "curves.png"}
REUSABLE = {"run_config.json", "metrics.jsonl", "checkpoints", "curves.png"}  # a start that got to no checkpoint
RESUMABLE = ("train.lr", "train.save_every", "train.eval_every", "train.keep", "train.compile")  # same batch plan


def warn(message: str, rank: int = 0) -> None:
    if rank == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def clean_leftovers(run: Path) -> list[str]:
    """Remove what interrupted saves left in this run directory; put back a directory that was renamed aside just
    before its replacement could be renamed in. Returns what was done, for a note."""
    done = []
    for folder in (run, run / "checkpoints"):
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            match = TEMPORARY_DIR.fullmatch(path.name)
            match = match if match and CHECKPOINT_NAME.fullmatch(match["name"]) else None
            if match and match["kind"] == "old" and not (folder / match["name"]).exists():
                os.replace(path, folder / match["name"])
                done.append(f"restored {folder / match['name']} from {path.name}")
            elif match and path.is_dir():
                shutil.rmtree(path)
                done.append(f"removed {path}")
            elif LEFTOVER_FILE.fullmatch(path.name) and path.is_file():
                path.unlink()
                done.append(f"removed {path}")
    return done


def has_checkpoint(run: Path) -> bool:
    return (run / "latest").exists() or any((run / "checkpoints").glob("step-*"))


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def open_run(out_dir: str | Path, config: dict, resume: bool, overwrite: bool, rank: int = 0) -> Path:
    """Create (or reuse) the run directory and record its resolved configuration; refuse to mix two runs in one.

    On --resume the saved configuration must equal the new one, or the resumed run could not equal the original;
    only settings that leave the batch plan alone (RESUMABLE: the learning rate, intervals, --compile) may change,
    with a warning recorded in run_config.json. A directory that holds no checkpoint (a start that failed or was
    stopped early) is reused by a plain rerun.
    """
    out = Path(out_dir)
    saved = out / "run_config.json"
    config = json.loads(json.dumps(config))  # as it reads back from disk (tuples become lists)
    if rank == 0 and saved.exists():  # a run directory of ours: never touch another kind of folder
        for note in clean_leftovers(out):
            warn(f"{note} (left by an interrupted save)")
    if resume:
        if (out / "results.json").exists():
            raise UserError(f"{out}: the run already finished (results.json is written); nothing to resume")
        if not has_checkpoint(out):
            raise UserError(f"{out}: nothing to resume (no checkpoint); run without --resume")
        old = read_json(saved)
        history = old.pop("resumed_with_changes", [])
        new, before = flatten(config), flatten(old)
        differ = sorted(k for k in set(new) | set(before) if before.get(k) != new.get(k))
        if refused := [k for k in differ if k not in RESUMABLE]:
            raise UserError(f"{out}: --resume with different settings ({', '.join(refused)}); use the original ones "
                            f"(only {', '.join(o.removeprefix('train.') for o in RESUMABLE)} may change)")
        if differ and rank == 0:
            changes = {k: [before.get(k), new.get(k)] for k in differ}
            warn(f"{out}: resuming with changed settings " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in
                                                                       changes.items()))
            latest = latest_text(out)
            write_json(saved, {**config, "resumed_with_changes": [*history, {"from": latest, "changed": changes}]})
        return out
    if out.exists() and any(out.iterdir()):
        reusable = not has_checkpoint(out) and {p.name for p in out.iterdir()} <= REUSABLE
        if overwrite:  # only a run directory of ours, holding nothing else, is ever replaced
            leftovers = {p.name for p in out.iterdir() if TEMPORARY_DIR.fullmatch(p.name)}
            own_output(out, "run_config.json", overwrite=True, what="run", names=RUN_FILES | leftovers)
        if not (overwrite or reusable):
            raise UserError(f"{out}: already holds a run; pass --resume to continue it or --overwrite to replace it")
        if rank == 0 and overwrite:
            shutil.rmtree(out)
        elif rank == 0:
            warn(f"{out}: reusing the directory of a start that saved no checkpoint")
            for name in ("metrics.jsonl", "curves.png"):
                (out / name).unlink(missing_ok=True)
    if dist.is_initialized():
        dist.barrier()  # no rank may create files before rank 0 has cleared the directory
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(saved, config)
    return out


def save_checkpoint(run: Path, step: int, model: Decoder, tokenizer: Tokenizer, optimizer, sched, scaler,
                    keep: int) -> None:
    """A resumable checkpoint: HF-layout weights (fp32, as trained) plus optimizer, schedule, step and RNG state.

    Never of non-finite weights. Written to a temporary directory then renamed; `latest` is switched only once the
    checkpoint is complete, and the older ones are removed only after that."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise UserError(f"non-finite weights at step {step} ({bad[0]}{' and more' if len(bad) > 1 else ''}); not "
                        f"saved; the last intact checkpoint is {latest_name(run)}; lower --lr and use --resume")
    name = f"step-{step:07d}"
    with atomic_dir(run / "checkpoints" / name) as tmp:
        model.write_checkpoint(tmp, tokenizer)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(), "rng": rng_state()}, tmp / "state.pt")
    point_latest(run, name)
    for old in sorted((run / "checkpoints").glob("step-*"))[:-keep]:
        shutil.rmtree(old)


def point_latest(run: Path, name: str) -> None:
    latest = run / "latest.tmp"
    latest.write_text(name + "\n")
    os.replace(latest, run / "latest")


def latest_text(run: Path) -> str | None:
    """What `latest` says, or None when it is missing or unreadable (for messages and records, never for loading)."""
    try:
        return (run / "latest").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def latest_name(run: Path) -> str:
    name = latest_text(run)
    return f"{run / 'checkpoints' / name}" if name else "none"


class Corrupt(Exception):
    """A checkpoint file that cannot be read back; the message names it."""


def load_checkpoint(path: Path, model: Decoder) -> dict:
    """Copy a checkpoint's weights into `model` (on CPU, before it moves) and return its training state."""
    weights, state_file = path / "model.safetensors", path / "state.pt"
    if (path / ".metadata").exists():  # FSDP's sharded checkpoint: restore() loads the shards once the model is sharded
        try:
            return {**torch.load(state_file, map_location="cpu", weights_only=True), "sharded": str(path)}
        except Exception as e:
            raise Corrupt(f"{state_file} is unreadable ({type(e).__name__}: {e})") from None
    try:
        tensors = load_file(weights)
    except Exception as e:  # truncated, missing or foreign: whatever safetensors says, name the file
        raise Corrupt(f"{weights} is unreadable ({type(e).__name__}: {e})") from None
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise Corrupt(f"{state_file} is unreadable ({type(e).__name__}: {e})") from None
    try:
        missing, unexpected = model.load_state_dict({hf_to_ours(k): v for k, v in tensors.items()}, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise Corrupt(f"{weights} does not match the model ({e})") from None
    if model.config.tie_embeddings and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")
    if missing or unexpected:
        raise Corrupt(f"{weights} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return state


def read_latest(run: Path, rank: int) -> str:
    """The checkpoint `latest` names; if it is missing or names none that exists, every checkpoint is a candidate
    (`latest` is switched last, so it only lags behind a complete save or was damaged)."""
    try:
        name = (run / "latest").read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return "step-9999999"
    except IsADirectoryError:  # not ours to replace
        raise UserError(f"{run / 'latest'}: is a directory; expected the file naming the latest checkpoint") from None
    except (OSError, UnicodeDecodeError) as e:
        name = f"unreadable ({type(e).__name__})"
    if not name.startswith("step-") or not (run / "checkpoints" / name).is_dir():
        warn(f"{run / 'latest'}: names no checkpoint ({name[:40]!r}); resuming from the newest complete one", rank)
        return "step-9999999"
    return name


def resume_state(run: Path, model: Decoder, rank: int) -> dict:
    """Load the latest checkpoint into `model`; if it is unreadable, the newest earlier one, with a warning (the
    unreadable ones are set aside as corrupt-step-N, `latest` is pointed at the one used)."""
    latest = read_latest(run, rank)
    problems = []
    for path in sorted((run / "checkpoints").glob("step-*"), reverse=True):
        if path.name > latest:
            continue  # renamed in, but `latest` never switched to it: a save that did not finish
        try:
            state = load_checkpoint(path, model)
        except Corrupt as e:
            problems.append((path, str(e)))
            continue
        if problems:
            warn(f"{'; '.join(p for _, p in problems)}; resuming from the previous complete checkpoint {path}", rank)
            if dist.is_initialized():
                dist.barrier()  # every rank has read its checkpoint before rank 0 moves anything
            if rank == 0:
                for bad, _ in problems:
                    os.replace(bad, bad.with_name(f"corrupt-{bad.name}"))
                point_latest(run, path.name)
        return state
    raise UserError(f"{run}: no readable checkpoint to resume from"
                    f"{' (' + '; '.join(p for _, p in problems) + ')' if problems else ''}")


def read_log(path: Path, upto: int) -> list[dict]:
    """The records of metrics.jsonl up to step `upto`: what a resumed run keeps (it repeats whatever came after)."""
    records = []
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):  # a line cut by a kill
                record = json.loads(line)
                if record["step"] <= upto:
                    records.append(record)
    return records


def write_log(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
    os.replace(tmp, path)


def rng_state() -> dict:
    """Data order and initialisation use explicit seeds; the global torch RNGs are saved for anything else."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopRequest:
    """Ctrl-C / SIGTERM set a flag; the loop checks it between steps and saves a resumable checkpoint first."""

    def __init__(self, announce: bool = True):
        self.requested, self.announce = False, announce

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\nstopping after this step, with a checkpoint to --resume from (Ctrl-C again to stop now)",
                  file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Interrupted(Exception):
    """Raised after Ctrl-C/SIGTERM once a resumable checkpoint is on disk."""


# --------------------------------------------------------------------------------------------------- sharding (FSDP2)
def resolve_shard(shard: str, world: int) -> str:
    """none, ddp or fsdp: auto is DDP on several processes, and DDP over one process is plain training."""
    if shard not in ("auto", "none", "ddp", "fsdp"):
        raise UserError(f"--shard {shard!r}: expected auto, none, ddp or fsdp")
    if shard in ("auto", "ddp"):
        return "ddp" if world > 1 else "none"
    if shard == "none" and world > 1:
        raise UserError(f"--shard none with {world} processes would train {world} separate models; use ddp or fsdp")
    return shard


class SupervisedLoss(nn.Module):
    """A micro-batch's summed token loss as one forward: the FSDP root. FSDP gathers a module's parameters only inside
    its forward, so the chunked loss runs here to see the whole lm_head (tied to the embedding or not)."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return micro_step_loss(self.decoder, self.decoder.lm_head.weight, inputs, targets)


def checkpoint_layers(model: Decoder) -> None:
    """Activation checkpointing: each decoder layer keeps only its input for backward and recomputes the rest there
    (non-reentrant autograd, so gradients are exact); parameter names and state dicts are unchanged."""
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block)


def shard_fsdp(model: Decoder, device: torch.device, precision: str) -> SupervisedLoss:
    """FSDP2 over all processes: each decoder layer, then the root (embedding, final norm, lm_head, which stay tied).

    Master weights, AdamW's state and gradients stay fp32 and sharded; under bf16 on CUDA each layer computes with a
    gathered bf16 copy and gradients are reduced in fp32. One process gets a one-member process group, so a sharded
    run resumes on any count (torch.distributed.checkpoint reshards on load)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    bf16 = device.type == "cuda" and precision == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    return fully_shard(SupervisedLoss(model), mesh=mesh, mp_policy=policy)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, last: bool):
    """Reduce gradients over the processes only on a step's last micro-batch: DDP's no_sync, FSDP's
    set_requires_gradient_sync (the others accumulate unreduced gradients locally)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last)
    with (model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext()):
        yield


def consolidate(loop: Loop) -> Decoder | None:
    """The whole sharded model as a plain fp32 Decoder on rank 0's CPU (None on the others). Every process takes part;
    the tensors are gathered one at a time, so rank 0 holds about one copy of the weights besides its shards."""
    full = {}
    for name, tensor in loop.raw.state_dict().items():
        if loop.raw.config.tie_embeddings and name == "lm_head.weight":
            continue  # the embedding, again
        whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if loop.rank == 0:
            full[name] = whole.detach().to("cpu", torch.float32)
        del whole
    if loop.rank != 0:
        return None
    with torch.device("meta"):
        model = Decoder(loop.raw.config)
    model.load_state_dict(full, strict=not loop.raw.config.tie_embeddings, assign=True)
    if loop.raw.config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def save_sharded_checkpoint(loop: Loop, step: int) -> None:
    """FSDP's resumable checkpoint: each process writes its shards of the model and AdamW's state with
    torch.distributed.checkpoint, rank 0 the schedule, scaler and RNG state; all into rank 0's temporary directory,
    renamed once complete, and only then `latest` is switched."""
    name = f"step-{step:07d}"
    with (atomic_dir(loop.run / "checkpoints" / name) if loop.rank == 0 else contextlib.nullcontext()) as tmp:
        where = [tmp]
        dist.broadcast_object_list(where, src=0)
        model_state, optimizer_state = get_state_dict(loop.model, loop.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=where[0])
        if loop.rank == 0:  # dcp.save returns once every process's shards and the metadata are written
            torch.save({"step": step, "scheduler": loop.sched.state_dict(), "scaler": loop.scaler.state_dict(),
                        "rng": rng_state()}, tmp / "state.pt")
    if loop.rank == 0:
        point_latest(loop.run, name)
        for old in sorted((loop.run / "checkpoints").glob("step-*"))[:-loop.cfg.keep]:
            shutil.rmtree(old)


def load_sharded_checkpoint(loop: Loop, path: Path) -> None:
    """Load a sharded checkpoint's model and AdamW state into this run's shards, whatever the process count."""
    model_state, optimizer_state = get_state_dict(loop.model, loop.optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(loop.model, loop.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ that also takes FSDP's sharded gradients; returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):  # FSDP: each process holds its shards' part of the norm
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.item()

