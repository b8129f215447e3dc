"""One training loop for continual pre-training, fine-tuning and the ID baseline: AMP, exact gradient accumulation,
DDP or FSDP2, resumable checkpoints.

A step takes `accum` micro-batches, spread over the processes. The loss is summed over supervised tokens and divided
by the supervised-token count of the whole step (known in advance from the deterministic batch plan), so the update
is the exact per-token mean of the effective batch however it is split (torchtune's rule; loss/accum is wrong for
variable-length masked sequences). Data order is a function of the step number alone, so resuming needs only the
step, and a resumed run equals an uninterrupted one bit for bit on CPU.

Read top to bottom: the loss, the batch plan, `step` (one optimizer step: every AMP and accumulation mechanic in one
place), `train` (setup, then the loop: step, log, skip count, checkpoint, interrupt, validation, early stop). The run
directory and checkpoint files, the checkpoint, validation and timing components the loop calls (infra/loop.py),
DDP/FSDP wrapping and the device helpers are infra/'s; the checks made before a run starts are the command line's
(extras/options.py).
"""
from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data import IGNORE, Case, Dataset, Encoder, Examples, target_example
from infra.chunked import ChunkedCrossEntropy
from infra.device import autocast, peak_flops, peak_memory_gb, resolve_precision
from infra.distributed import agreed, all_reduce_sum, clip_grad_norm, consolidate, gradient_sync, resolve_shard, wrap
from infra.files import UserError
from infra.loop import Checkpoints, StepTimer, Validator, recovery
from infra.runs import Interrupted, Log, StopRequest, plot_curves, resume_state
from model import LoRALinear, merge_lora, save_adapter
from schedule import Schedule, scheduler


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

    def __post_init__(self):  # a caller's bug, not a user's: the command line checks its options before this
        if min(self.steps, self.accum, self.keep, self.max_skips) < 1 or self.patience < 0:
            raise ValueError(f"TrainConfig: steps, accum, keep and max_skips must be >= 1, patience >= 0 ({self})")


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


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss of one micro-batch, over the hidden states of the positions that have a target."""
    supervised = targets != IGNORE
    hidden = model(inputs, hidden=True)[supervised]  # selected outside: inside, a torch.compile'd model broke its graph
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
class BatchSource(Protocol):
    """What `train` draws its steps from (data.Blocks, data.Examples, extras' Sequences and Preferences): each epoch's
    deterministic list of micro-batches, a function of the epoch alone, so that a resumed run repeats it."""

    def micro_batches(self, epoch: int) -> list[list[int]]: ...
    def collate(self, batch: list[int]) -> tuple[np.ndarray, ...]: ...  # the arrays `loss` takes after the model
    def n_targets(self, batch: list[int]) -> int: ...  # the supervised targets: what the loss is a mean over
    def n_tokens(self, batch: list[int]) -> int: ...  # the input tokens, for throughput


def train(model: nn.Module, data: BatchSource, cfg: TrainConfig, run: Path, *, loss: Callable = lm_loss,
          tokenizer=None, device: torch.device, rank: int = 0, world: int = 1, resume: bool = False,
          validate: Callable[[nn.Module], dict] | None = None, base: str = "") -> dict:
    """Train `model` on `data` for cfg.steps optimizer steps, `loss(model, *collated)` being a micro-batch's summed
    loss; return a summary. `validate(model)` (rank 0) gives the validation figures; the best cfg.select is kept in
    best/. --resume continues from the latest checkpoint. Only parameters that require gradients train: a LoRA
    model's adapters, its final/ and best/ merged (save_model; `base`, the start, is named in the adapter)."""
    state = resume_state(run, model, rank) if resume else None  # the checkpoint's weights, into `model` on CPU
    precision, shard = resolve_precision(cfg.precision, device), resolve_shard(cfg.shard, world)
    net = wrap(model, loss, device, precision, shard, cfg.activation_checkpointing, cfg.compile)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  fused=device.type == "cuda")
    sched = scheduler(optimizer, cfg.schedule, cfg.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # otherwise its calls do nothing
    save = functools.partial(save_model, tokenizer=tokenizer, base=base)
    validation = Validator(run, model, validate, save, cfg.select, cfg.patience, shard, rank, device, precision)
    timer = StepTimer(model, device, precision, peak_flops, rank)  # probes the peak FLOP/s (MFU), before any seeding
    ckpt = Checkpoints(run, model, net, optimizer, sched, scaler, tokenizer, shard, rank, device, cfg.keep, cfg.diverge)
    start = ckpt.restore(state, cfg.lr) if resume else 0
    if not resume:
        torch.manual_seed(cfg.seed)
    micro, skipped = MicroBatches(data), 0
    model.train()
    with Log(run, rank, start if resume else None, cfg.tracker) as log, StopRequest(announce=rank == 0) as stop, \
            timer.shown(cfg.steps, start, enabled=rank == 0 and cfg.progress):
        if resume and due(start, cfg.eval_every, cfg.steps) and not log.validated(start):
            validation(start, log)  # stopped between its checkpoint and its validation
        for s in range(start, start if validation.patience_spent(log) else cfg.steps):  # none: it had stopped early
            timer.start()
            plan = [micro[s * cfg.accum + j] for j in range(cfg.accum)]  # the same plan on any number of processes
            batches = [data.collate(b) for b in plan[rank::world]]  # this process's share
            out = step(net, model, batches, sum(data.n_targets(b) for b in plan), optimizer, sched, scaler,
                       precision=precision, device=device, world=world, grad_clip=cfg.grad_clip, stop=stop.requested)
            record = {"step": s + 1, "loss": finite(out.loss, 5), "lr": out.lr, "grad_norm": finite(out.grad_norm, 4),
                      "tokens": sum(data.n_tokens(b) for b in plan), **({} if out.applied else {"skipped": True}),
                      **({"scale": scaler.get_scale()} if scaler.is_enabled() else {})}  # fp16's loss scale
            log.write(timer(record, batches))  # with its throughput, MFU and memory, shown on the progress bar
            skipped = 0 if out.stepped else skipped + 1
            if skipped >= cfg.max_skips:
                raise UserError(f"non-finite loss or gradients in {skipped} consecutive steps ({s + 2 - skipped}-"
                                f"{s + 1}), none applied; {recovery(run, 'intact')}")
            if out.stopping or due(s + 1, cfg.save_every, cfg.steps):
                ckpt.save(s + 1, log.records)
            if out.stopping:
                raise Interrupted(f"interrupted at step {s + 1}/{cfg.steps}; checkpoint saved in {run}; "
                                  "continue with the same command plus --resume")
            if due(s + 1, cfg.eval_every, cfg.steps):
                validation(s + 1, log)
                if validation.patience_spent(log):
                    break
        if agreed(stop.requested, device):  # Ctrl-C or SIGTERM during the last validation: the last checkpoint is saved
            raise Interrupted(f"interrupted after the last step; checkpoint saved in {run}; continue with the same "
                              "command plus --resume")
    final = consolidate(model, rank) if shard == "fsdp" else model  # every process takes part
    if rank != 0:
        return {"steps": cfg.steps, "precision": precision, "world_size": world}
    save(final, run / "final")
    return {"steps": cfg.steps, "precision": precision, "world_size": world, **log.summary(),
            "seconds_to_best": log.seconds_until(validation.best["step"]) if validation.best else None,
            "peak_mem_gb": peak_memory_gb(device), "best": validation.best, "curves": plot_curves(run)}


def due(step: int, every: int, total: int) -> bool:
    return step == total or bool(every) and step % every == 0


def finite(x: float, digits: int) -> float | None:
    return round(x, digits) if math.isfinite(x) else None  # JSON has no NaN: metrics.jsonl stays valid JSON


def save_model(model: nn.Module, path: Path, tokenizer=None, base: str = "") -> None:
    """A model folder in HF layout (final/, best/). A LoRA model's is the merged model, and its adapter alone goes
    beside it in PEFT's layout, PATH-adapter/: never inside, where transformers 5 would apply it a second time."""
    if not any(isinstance(m, LoRALinear) for m in model.modules()):
        return model.save_pretrained(path, tokenizer)
    merge_lora(model).save_pretrained(path, tokenizer)
    save_adapter(model, path.with_name(f"{path.name}-adapter"), base)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups: weight decay on matrices, none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


