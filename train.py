"""One training loop for continual pre-training, fine-tuning and the ID baseline: AMP, exact gradient accumulation,
DDP or FSDP2, resumable checkpoints.

A step takes `accum` micro-batches, spread over the processes. The loss is summed over supervised tokens and divided
by the supervised-token count of the whole step (known in advance from the deterministic batch plan), so the update
is the exact per-token mean of the effective batch however it is split (torchtune's rule; loss/accum is wrong for
variable-length masked sequences). Data order is a function of the step number alone, so resuming needs only the
step, and a resumed run equals an uninterrupted one bit for bit on CPU.

Read top to bottom: the loss, the batch plan, `step` (one optimizer step: every AMP and accumulation mechanic in one
place), `train` (steps, log, checkpoints, validation) and the checks made before a run starts. The run directory and
checkpoint files, DDP/FSDP wrapping and the device helpers are infra/'s.
"""
from __future__ import annotations

import bisect
import contextlib
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data import IGNORE, Case, Dataset, Encoder, Examples, target_example
from infra.config import INIT_MARKER
from infra.console import progress, say, warn
from infra.device import autocast, peak_flops, peak_memory_gb, resolve_precision
from infra.distributed import (
    all_reduce_sum,
    barrier,
    clip_grad_norm,
    consolidate,
    gradient_sync,
    load_sharded_checkpoint,
    resolve_shard,
    save_sharded_checkpoint,
    wrap,
)
from infra.files import UserError, read_json, write_error, write_json
from infra.runs import (
    Interrupted,
    Log,
    StopRequest,
    latest_name,
    plot_curves,
    restore_rng,
    resume_state,
    rng_state,
    save_checkpoint,
)
from infra.trackers import check_tracker
from schedule import Schedule, scheduler
from schedule import steps as schedule_steps
from schedule import validate as validate_schedule  # noqa: I001 (one name, two meanings)


@dataclass
class TrainConfig:
    steps: int  # optimizer steps
    accum: int  # micro-batches per optimizer step, summed over all ranks
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    schedule: Schedule = field(default_factory=Schedule)
    precision: str = "auto"  # auto, fp32, bf16, fp16 (with a GradScaler; on CPU slow, but the same logic)
    seed: int = 0
    save_every: int = 0  # steps between resumable checkpoints; 0 = only at the end (and on interrupt)
    eval_every: int = 0  # steps between validations; 0 = only at the end
    select: str | None = None  # keep the checkpoint that maximises this validation metric in best/
    patience: int = 0  # stop after this many validations without a better `select` (0 = never: early stopping off)
    keep: int = 2  # resumable checkpoints kept on disk (>= 2: resume falls back when the latest is unreadable)
    max_skips: int = 3  # stop after this many consecutive steps with a non-finite loss or gradient (skipped)
    diverge: float = 2.0  # never checkpoint while the loss of the last 10 steps exceeds this many times its best
    progress: bool = True
    shard: str = "auto"  # auto (ddp for several processes, none for one), none, ddp, fsdp
    activation_checkpointing: bool = False  # recompute each decoder layer in backward
    compile: bool = False  # torch.compile the model (inductor): fused kernels, the same math up to rounding
    tracker: str = "none"  # also log to an experiment tracker: none, tensorboard, wandb (infra.trackers)


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


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss of one micro-batch: the model returns hidden states only where a target exists."""
    supervised = targets != IGNORE
    hidden = model(inputs, hidden=True, select=supervised)
    return cross_entropy_sum(hidden, model.lm_head.weight, targets[supervised])


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


@torch.no_grad()
def target_loss(model: nn.Module, encoder: Encoder, ds: Dataset, cases: list[Case], key: str,
                tokens: int = 8192) -> float:
    """Mean per-token loss of the held-out items' tokens after their histories (CPT's validation loss)."""
    data = Examples([target_example(ds, encoder, c, key) for c in cases], tokens, encoder.tokenizer.pad_id, seed=0)
    device = model.embed_tokens.weight.device
    total = n = 0
    for batch in data.micro_batches(0):
        inputs, targets = (torch.as_tensor(a, device=device) for a in data.collate(batch))
        total += float(lm_loss(model, inputs, targets))
        n += data.n_targets(batch)
    return total / n


# --------------------------------------------------------------------------------------------------- one step
class Stepped(NamedTuple):
    loss: float  # the step's mean loss per target, over every process
    grad_norm: float  # before clipping
    lr: float  # the learning rate the step used
    applied: bool  # False: the update was skipped (a non-finite loss or gradient)
    stepped: bool  # False: skipped outside the fp16 scaler's own overflow handling (counts towards max_skips)
    stopping: bool  # some process was asked to stop (Ctrl-C, SIGTERM)


def step(net: nn.Module, model: nn.Module, batches: list[tuple], n_targets: int, optimizer, sched, scaler, *,
         precision: str, device: torch.device, world: int = 1, grad_clip: float = 1.0, stop: bool = False) -> Stepped:
    """One optimizer step over this process's micro-batches `batches` of a step with `n_targets` supervised targets
    on all processes; `net(*batch)` is `model` with its loss, under DDP or FSDP on several processes
    (infra.distributed.wrap). The one place where accumulation, autocast, sync, scaling, clipping and the schedule
    meet: the training loop, the baseline and the benchmarks all step through it."""
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        # DDP and FSDP reduce gradients over the processes after the step's last micro-batch only
        with gradient_sync(net, last=i == len(batches) - 1), autocast(precision, device):
            loss = net(*(torch.as_tensor(a, device=device) for a in batch))  # a SUM over the batch's targets
        # / the whole step's targets: the exact per-target mean however the step is split; x world, because DDP and
        # FSDP average gradients over the processes; the scaler (fp16 only) multiplies so small ones do not underflow
        scaler.scale(loss * world / n_targets).backward()
        loss_sum += loss.detach()
    totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(stop), device=device)]))
    loss = totals[0].item() / n_targets
    scaler.unscale_(optimizer)  # fp16: clip (and test) the true gradients, not the scaled ones
    grad_norm = clip_grad_norm(model, grad_clip)
    applied = math.isfinite(loss) and math.isfinite(grad_norm)
    stepped = applied or scaler.is_enabled() and math.isfinite(loss)  # fp16 overflow: the scaler skips, lowers scale
    if stepped:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)  # a skipped step leaves the weights and AdamW's moments as they were
    lr = optimizer.param_groups[0]["lr"]
    sched.step()  # the schedule (WSA) advances once per optimizer step, never per micro-batch
    return Stepped(loss, grad_norm, lr, applied, stepped, bool(totals[1] > 0))


# --------------------------------------------------------------------------------------------------- the loop
def train(model: nn.Module, data, cfg: TrainConfig, run: Path, *, loss: Callable = lm_loss, tokenizer=None,
          device: torch.device, rank: int = 0, world: int = 1, resume: bool = False,
          validate: Callable[[nn.Module], dict] | None = None) -> dict:
    """Train `model` on `data` (data.Blocks, data.Examples, ...: micro_batches, collate, n_targets, n_tokens) for
    cfg.steps optimizer steps, `loss(model, *collated)` being a micro-batch's summed loss; return a summary.
    `validate(model)` (rank 0) returns the validation figures; the best cfg.select is kept in best/.

    --resume continues from the latest readable checkpoint; if the steps were all done (a run stopped during its
    final validation), it writes what is missing."""
    check(cfg, device, world)
    state = resume_state(run, model, rank) if resume else None  # the checkpoint's weights, into `model` on CPU
    precision, shard = resolve_precision(cfg.precision, device), resolve_shard(cfg.shard, world)
    net = wrap(model, loss, device, precision, shard, cfg.activation_checkpointing, cfg.compile)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  fused=device.type == "cuda")
    sched = scheduler(optimizer, cfg.schedule, cfg.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # otherwise its calls do nothing
    best = read_json(run / "best.json") if (run / "best.json").exists() else None
    peak = peak_flops(device, precision)  # the MFU denominator
    start = restore(state, net, optimizer, sched, scaler, cfg.lr) if resume else 0
    if not resume:
        torch.manual_seed(cfg.seed)
    micro, skipped = MicroBatches(data), 0

    def checkpoint(at: int) -> None:  # a resumable checkpoint; under FSDP every process writes its shards
        if agreed(bool(why := diverged(log.records, cfg.diverge))):  # a healthy checkpoint is never replaced by this
            raise UserError(f"{why or 'the loss diverged'}; step {at} was not saved; the last healthy checkpoint is "
                            f"{latest_name(run)}; lower --lr and continue with the same command plus --resume")
        training = {"scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state()}
        try:
            if shard == "fsdp":
                save_sharded_checkpoint(run, at, net, optimizer, training, cfg.keep, rank)
            elif rank == 0:
                save_checkpoint(run, at, model, tokenizer, {"optimizer": optimizer.state_dict(), **training}, cfg.keep)
        except Exception as e:  # OSError, or safetensors' own error for the same
            if (failed := write_error(e)) is None:
                raise
            raise UserError(f"{getattr(e, 'filename', None) or run}: cannot be written ({failed[1]}); the checkpoint "
                            f"of step {at} was not saved; the last intact one is {latest_name(run)}; free space and "
                            "continue with the same command plus --resume") from None
        barrier()

    def validation(at: int) -> None:  # rank 0 validates (a gathered copy under FSDP), keeps best/, then logs
        nonlocal best
        copy = consolidate(model, rank) if shard == "fsdp" and validate is not None else model
        if rank == 0 and validate is not None:
            began = time.perf_counter()
            copy.to(device).eval()
            with torch.no_grad(), autocast(precision, device):
                result = validate(copy)
            copy.train()
            if cfg.select and (best is None or result[cfg.select] > best[cfg.select]):
                best = {"step": at, cfg.select: result[cfg.select]}
                copy.save_pretrained(run / "best", tokenizer)
                write_json(run / "best.json", best)
            # Logged after best/ is written: a logged validation has its best/ on disk.
            log.write({"step": at, "validation": result, "seconds": round(time.perf_counter() - began, 4)})
        barrier()

    def agreed(flag: bool) -> bool:  # rank 0 decides from the log (the others hold none): every process follows
        return bool(all_reduce_sum(torch.tensor(float(flag), device=device)) > 0)

    def patience_spent() -> bool:  # early stopping: cfg.patience validations in a row without a better cfg.select
        waited = sum("validation" in r and r["step"] > best["step"] for r in log.records) if best else 0
        return agreed(0 < cfg.patience <= waited)

    def timing(record: dict, began: float, flops: float) -> dict:  # throughput, MFU and memory of the step
        nonlocal peak
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        record.update(tokens_per_s=round(record["tokens"] / seconds), mfu=round(flops / seconds / peak, 4),
                      mem_gb=round(peak_memory_gb(device), 3), seconds=round(seconds, 4))
        if record["mfu"] > 1 and device.type == "cpu":  # the cached peak was measured on a busy machine
            peak = peak_flops(device, precision, remeasure=True)
            warn(f"step {record['step']}: MFU {record['mfu']:.0%} exceeds 100%, so the peak matmul probe had "
                 f"under-measured; measured again: {peak / 1e9:.1f} GFLOP/s from here on", rank)
        return record

    model.train()
    with Log(run, rank, start if resume else None, cfg.tracker) as log, StopRequest(announce=rank == 0) as stop, \
            progress_bar(cfg.steps, start, enabled=rank == 0 and cfg.progress) as bar:
        if resume and due(start, cfg.eval_every, cfg.steps) and not log.validated(start):
            validation(start)  # stopped between its checkpoint and its validation
        steps = range(start, start if patience_spent() else cfg.steps)  # none when resumed after it stopped early
        for s in steps:
            began = time.perf_counter()
            plan = [micro[s * cfg.accum + j] for j in range(cfg.accum)]  # the same plan on any number of processes
            batches = [data.collate(b) for b in plan[rank::world]]  # this process's share
            out = step(net, model, batches, sum(data.n_targets(b) for b in plan), optimizer, sched, scaler,
                       precision=precision, device=device, world=world, grad_clip=cfg.grad_clip, stop=stop.requested)
            record = {"step": s + 1, "loss": finite(out.loss, 5), "lr": out.lr, "grad_norm": finite(out.grad_norm, 4),
                      "tokens": sum(data.n_tokens(b) for b in plan), **({} if out.applied else {"skipped": True}),
                      **({"scale": scaler.get_scale()} if scaler.is_enabled() else {})}  # fp16's loss scale
            flops = sum(x.size * model.config.train_flops_per_token(x.shape[1]) for x, *_ in batches)
            bar(timing(record, began, flops))
            log.write(record)
            skipped = 0 if out.stepped else skipped + 1
            if skipped >= cfg.max_skips:
                raise UserError(f"non-finite loss or gradients in {skipped} consecutive steps ({s + 2 - skipped}-"
                                f"{s + 1}), none applied; the last intact checkpoint is {latest_name(run)}; lower "
                                "--lr and continue with the same command plus --resume")
            if out.stopping or due(s + 1, cfg.save_every, cfg.steps):
                checkpoint(s + 1)
            if out.stopping:
                raise Interrupted(f"interrupted at step {s + 1}/{cfg.steps}; checkpoint saved in {run}; "
                                  "continue with the same command plus --resume")
            if due(s + 1, cfg.eval_every, cfg.steps):
                validation(s + 1)
                if patience_spent():
                    break
        if agreed(stop.requested):  # Ctrl-C or SIGTERM during the last validation: the last checkpoint is saved
            raise Interrupted(f"interrupted after the last step; checkpoint saved in {run}; continue with the same "
                              "command plus --resume")
    final = consolidate(model, rank) if shard == "fsdp" else model  # every process takes part
    if rank != 0:
        return {"steps": cfg.steps, "precision": precision, "world_size": world}
    final.save_pretrained(run / "final", tokenizer)
    return {"steps": cfg.steps, "precision": precision, "world_size": world, **log.summary(),
            "seconds_to_best": log.seconds_until(best["step"]) if best else None,
            "peak_mem_gb": peak_memory_gb(device), "best": best, "curves": plot_curves(run)}


def restore(state: dict, net: nn.Module, optimizer, sched, scaler, lr: float) -> int:
    """Load a checkpoint's optimizer, schedule, scaler and RNG state; return its step. A learning rate changed on
    --resume replaces the saved one from here on (the schedule's shape is kept)."""
    if "sharded" in state:  # FSDP: weights and AdamW's state from the shards, into this run's shards
        load_sharded_checkpoint(net, optimizer, Path(state["sharded"]))
    else:
        optimizer.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"])
    if sched.base_lrs[0] != lr:
        sched.base_lrs = [lr for _ in optimizer.param_groups]
        for group, rule in zip(optimizer.param_groups, sched.lr_lambdas):
            group["initial_lr"], group["lr"] = lr, lr * rule(sched.last_epoch)
    return state["step"]


def diverged(records: list[dict], factor: float, window: int = 10) -> str:
    """Why the run's loss has diverged ("" while it has not): the mean loss of its last `window` steps exceeds `factor`
    times the lowest such mean so far (a blow-up that stays finite, such as weights grown to 1e6)."""
    losses = [r["loss"] for r in records if "tokens" in r and r["loss"] is not None]
    if not factor or len(losses) < window:
        return ""
    means = np.convolve(losses, np.ones(window) / window, mode="valid")
    if means[-1] <= factor * means.min():
        return ""
    return (f"the loss diverged: {means[-1]:.4g} over the last {window} steps, more than {factor:g} times the run's "
            f"best {means.min():.4g}")


def due(step: int, every: int, total: int) -> bool:
    return step == total or bool(every) and step % every == 0


def finite(x: float, digits: int) -> float | None:
    return round(x, digits) if math.isfinite(x) else None  # JSON has no NaN: metrics.jsonl stays valid JSON


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups: weight decay on matrices, none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


@contextlib.contextmanager
def progress_bar(total: int, start: int, enabled: bool):
    """infra.console.progress with the latest loss, learning rate, throughput and MFU; called once per step."""
    with progress(total, "step", enabled, start) as advance:
        yield lambda r: advance(1, f"loss {'non-finite' if r['loss'] is None else format(r['loss'], '.4f')}  "
                                   f"lr {r['lr']:.2e}  {r['tokens_per_s']:,} tok/s  MFU {r['mfu']:.1%}")


# --------------------------------------------------------------------------------------------------- before a run
def check(cfg: TrainConfig, device: torch.device, world: int, context: int | None = None, longest: int = 0,
          option: str = "", model: str = "the model") -> None:
    """Every check of a run's settings, made before a run directory is created for them: schedule, precision, the
    split of each step's micro-batches over the processes and, given the model's context, the longest sequence."""
    if not cfg.lr > 0:
        raise UserError(f"--lr {cfg.lr}: expected a learning rate > 0")
    for name, every in (("--save-every", cfg.save_every), ("--eval-every", cfg.eval_every)):
        if every < 0:
            raise UserError(f"{name} {every}: expected a step count >= 0 (0 = at the end)")
    if cfg.steps < 1 or cfg.accum < 1 or cfg.keep < 1 or cfg.max_skips < 1 or cfg.patience < 0:
        raise ValueError(f"TrainConfig: steps, accum, keep and max_skips must be >= 1, patience >= 0 ({cfg})")
    validate_schedule(cfg.schedule, cfg.steps)
    check_tracker(cfg.tracker)  # an optional package that is missing
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


def run_settings(cfg: TrainConfig) -> dict:
    """The training settings recorded in run_config.json (and compared on --resume)."""
    settings = asdict(cfg)
    settings.pop("progress")  # presentation, not part of the run
    settings.pop("tracker")  # where the run is watched: a resumed run may switch it
    settings.pop("activation_checkpointing")  # memory, not math: a resumed run may switch it
    return settings


def fitting_defaults(start: Path, lr: float | None, warmup: float | None, steps: int, schedule: str,
                     anneal: float) -> tuple[float, float]:
    """--lr and --warmup where not given, fitted to the checkpoint at `start`.

    A model `cprec init` made (config.json carries infra.config.INIT_MARKER, kept through training) starts from random
    weights: peak 1e-3 and 2% warmup, tuned on the small model. Any other checkpoint is a pretrained LLM, whose
    knowledge a large step would wash out: continual pre-training re-warms it to a fraction of its original peak
    (Gupta et al. 2023, "Continual Pre-Training of Large Language Models: How to (re)warm your model?"; Ibrahim et al.
    2024) with a WSD-style warmup (MiniCPM): peak 1e-4 and warmup max(2% of steps, 100 steps), at most half the
    steps before annealing. Explicit values always win."""
    if INIT_MARKER in read_json(start / "config.json"):
        return (1e-3 if lr is None else lr), (0.02 if warmup is None else warmup)
    decay = schedule_steps(anneal, steps) if schedule == "wsa" and anneal >= 0 else 0
    fitted_lr = 1e-4 if lr is None else lr
    fitted_warmup = min(max(math.ceil(0.02 * steps), 100), (steps - decay) // 2) if warmup is None else warmup
    if lr is None or warmup is None:
        say(f"{start} is a pretrained checkpoint (no {INIT_MARKER} in its config.json): peak --lr {fitted_lr:g}, "
            f"--warmup {fitted_warmup:g} steps (continual pre-training defaults; pass either to override)")
    return fitted_lr, fitted_warmup
