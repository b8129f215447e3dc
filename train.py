"""One training loop for continual pre-training and fine-tuning: AMP, exact gradient accumulation, DDP, checkpoints.

A step takes `accum` micro-batches, spread over the ranks. The loss is summed over supervised tokens and divided by
the supervised-token count of the whole step (known in advance from the deterministic batch plan), so the update
is the exact per-token mean of the effective batch however it is split (torchtune's rule; loss/accum is wrong for
variable-length masked sequences). Data order is a function of the step number alone, so resuming needs only the
step, and a resumed run equals an uninterrupted one bit for bit on CPU.
"""
from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import resource
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from common import UserError, atomic_dir, read_json, write_json
from data import IGNORE, Case, Dataset, Encoder, Examples, target_example
from model import Decoder
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
    keep: int = 2  # resumable checkpoints kept on disk
    progress: bool = True
    shard: str = "auto"  # auto (ddp for several processes, none for one), none, ddp, fsdp
    activation_checkpointing: bool = False  # recompute each decoder layer in backward


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


def peak_flops(device: torch.device, precision: str) -> float:
    """The device's peak FLOP/s for MFU: datasheet dense numbers on known GPUs, a measured matmul on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in DATASHEET.items() if k in name), 312e12) / (2 if precision == "fp32" else 1)
    return matmul_flops(device, precision)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups: weight decay on matrices, none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB: process peak RSS


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


# --------------------------------------------------------------------------------------------------- run directory
def open_run(out_dir: str | Path, config: dict, resume: bool, overwrite: bool, rank: int = 0) -> Path:
    """Create the run directory and record its resolved configuration; refuse to mix two runs in one directory.

    On --resume the saved configuration must equal the new one, or the resumed run could not equal the original.
    """
    out = Path(out_dir)
    saved = out / "run_config.json"
    config = json.loads(json.dumps(config))  # as it reads back from disk (tuples become lists)
    if resume:
        if not (out / "latest").exists():
            raise UserError(f"{out}: nothing to resume (no checkpoint); run without --resume")
        differ = sorted(k for k in set(config) | set(read_json(saved)) if read_json(saved).get(k) != config.get(k))
        if differ:
            raise UserError(f"{out}: --resume with different settings ({', '.join(differ)}); use the original ones")
        return out
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: already holds a run; pass --resume to continue it or --overwrite to replace it")
        if rank == 0:
            shutil.rmtree(out)
    if dist.is_initialized():
        dist.barrier()  # no rank may create files before rank 0 has cleared the directory
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(saved, config)
    return out


def save_checkpoint(run: Path, step: int, model: Decoder, tokenizer: Tokenizer, optimizer, sched, scaler,
                    keep: int) -> None:
    """A resumable checkpoint: HF-layout weights (fp32, as trained) plus optimizer, schedule, step and RNG state.

    Written to a temporary directory then renamed; `latest` is switched only once the checkpoint is complete."""
    name = f"step-{step:07d}"
    with atomic_dir(run / "checkpoints" / name) as tmp:
        model.write_checkpoint(tmp, tokenizer)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(), "rng": rng_state()}, tmp / "state.pt")
    point_latest(run, name, keep)


def point_latest(run: Path, name: str, keep: int) -> None:
    """Switch `latest` to a complete checkpoint, then drop all but the newest `keep`."""
    latest = run / "latest.tmp"
    latest.write_text(name + "\n")
    os.replace(latest, run / "latest")
    for old in sorted((run / "checkpoints").glob("step-*"))[:-keep]:
        shutil.rmtree(old)


def latest_checkpoint(run: Path) -> Path:
    return run / "checkpoints" / (run / "latest").read_text().strip()


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

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Interrupted(Exception):
    """Raised after Ctrl-C/SIGTERM once a resumable checkpoint is on disk."""


# --------------------------------------------------------------------------------------------------- checks
def check(cfg: TrainConfig, device: torch.device, world: int, context: int | None = None, longest: int = 0,
          option: str = "", model: str = "the model") -> None:
    """Every check of a run's settings, made before a run directory is created for them: schedule, precision, the
    split of each step's micro-batches over the processes and, given the model's context, the longest sequence."""
    validate_schedule(cfg.schedule, cfg.steps)
    if resolve_shard(cfg.shard, world) == "fsdp" and resolve_precision(cfg.precision, device) == "fp16":
        raise UserError("--shard fsdp trains in bf16 or fp32; use --precision bf16 (fp16 loss scaling is not sharded)")
    resolve_precision(cfg.precision, device)
    if cfg.accum % world:  # each process takes an equal share of a step, so the batch plan is the same on any count
        raise UserError(f"--batch-tokens: {cfg.accum} micro-batches per step do not split evenly over {world} "
                        f"processes; use a multiple of {world} micro-batches")
    if context is not None and longest > context:
        raise UserError(f"{option}: {longest}-token sequences exceed the context of {model} ({context} tokens)")


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
        point_latest(loop.run, name, loop.cfg.keep)


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


def resume_weights(run: Path, start: Path) -> Path:
    """The checkpoint a resumed run builds its model from: the latest one, or, when that is sharded (FSDP, no HF-layout
    weights), the run's starting weights, which restore() then replaces with the shards."""
    latest = latest_checkpoint(run)
    return start if (latest / ".metadata").exists() else latest


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
    best: dict | None = None  # the selected checkpoint so far: {"step": .., cfg.select: ..}
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
    optimizer = torch.optim.AdamW(param_groups(raw, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  fused=device.type == "cuda")
    best = read_json(run / "best.json") if (run / "best.json").exists() else None
    return Loop(cfg, raw, wrapped, tokenizer, optimizer, scheduler(optimizer, cfg.schedule, cfg.steps),
                torch.amp.GradScaler(device.type, enabled=precision == "fp16"), run, device, precision, rank, world,
                validate, best, shard)


def restore(loop: Loop) -> int:
    """Load the latest checkpoint's optimizer, schedule, scaler and RNG state; return its step."""
    path = latest_checkpoint(loop.run)
    state = torch.load(path / "state.pt", map_location=loop.device, weights_only=True)
    if loop.shard == "fsdp":
        load_sharded_checkpoint(loop, path)
    else:
        loop.optimizer.load_state_dict(state["optimizer"])
    loop.sched.load_state_dict(state["scheduler"])
    loop.scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"])
    if state["step"] >= loop.cfg.steps:
        raise UserError(f"{loop.run}: the run already finished its {loop.cfg.steps} steps; nothing to resume")
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


def update(loop: Loop, step: int, loss: float) -> None:
    """Apply the gradients, unless the loss is not finite: then stop with the last checkpoint intact."""
    if not math.isfinite(loss):
        latest = (loop.run / "latest").read_text().strip() if (loop.run / "latest").exists() else "none"
        raise UserError(f"non-finite loss at step {step}; nothing was updated and the last checkpoint ({latest}) "
                        "is intact; lower --lr or use --precision fp32")
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    loop.optimizer.zero_grad(set_to_none=True)


def schedule_step(loop: Loop) -> float:
    """Advance the schedule by one optimizer step; return the learning rate the step used."""
    lr = loop.optimizer.param_groups[0]["lr"]
    loop.sched.step()
    return lr


def log_step(loop: Loop, log, record: dict, began: float, flops: float, peak: float) -> dict:
    """Complete the step's record with its timing, throughput and memory, and append it to metrics.jsonl."""
    if loop.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    record.update(tokens_per_s=round(record["tokens"] / seconds), mfu=round(flops / seconds / peak, 4),
                  mem_gb=round(peak_memory_gb(loop.device), 3), seconds=round(seconds, 4))
    if log:
        log.write(json.dumps(record) + "\n")
        log.flush()
    return record


def checkpoint(loop: Loop, step: int) -> None:
    if loop.shard == "fsdp":
        save_sharded_checkpoint(loop, step)
    elif loop.rank == 0:
        save_checkpoint(loop.run, step, loop.raw, loop.tokenizer, loop.optimizer, loop.sched, loop.scaler,
                        loop.cfg.keep)
    if loop.world > 1:
        dist.barrier()


def validation(loop: Loop, log, step: int) -> dict | None:
    """Validate on rank 0, log the result, and keep the checkpoint that maximises cfg.select in best/."""
    result = None
    net = consolidate(loop) if loop.shard == "fsdp" and loop.validate is not None else loop.raw
    if loop.rank == 0 and loop.validate is not None:
        net.to(loop.device).eval()
        with torch.no_grad(), autocast(loop.precision, loop.device):
            result = loop.validate(net)
        net.train()
        log.write(json.dumps({"step": step, "validation": result}) + "\n")
        log.flush()
        select = loop.cfg.select
        if select and (loop.best is None or result[select] > loop.best[select]):
            loop.best = {"step": step, select: result[select]}
            net.save_pretrained(loop.run / "best", loop.tokenizer)
            write_json(loop.run / "best.json", loop.best)
    if loop.world > 1:
        dist.barrier()
    return result


def due(step: int, every: int, total: int) -> bool:
    return step == total or bool(every) and step % every == 0


def train(model: Decoder, tokenizer: Tokenizer, data, cfg: TrainConfig, run: Path, *, device: torch.device,
          rank: int = 0, world: int = 1, resume: bool = False,
          validate: Callable[[Decoder], dict] | None = None) -> dict:
    """Train `model` on `data` (data.Blocks or data.Examples) for cfg.steps optimizer steps; return a summary."""
    loop = setup(model, tokenizer, cfg, run, device, rank, world, validate)
    start = restore(loop) if resume else 0
    if not resume:
        torch.manual_seed(cfg.seed)
    micro, peak = MicroBatches(data), peak_flops(device, loop.precision)
    summary = {"steps": cfg.steps, "precision": loop.precision, "world_size": world, "tokens": 0, "seconds": 0.0}
    loop.raw.train()
    with (open(run / "metrics.jsonl", "a") if rank == 0 else contextlib.nullcontext()) as log, StopRequest() as stop, \
            progress_bar(cfg.steps, start, enabled=rank == 0 and cfg.progress) as bar:
        for step in range(start, cfg.steps):
            began = time.perf_counter()
            plan = [micro[step * cfg.accum + j] for j in range(cfg.accum)]
            n_targets = sum(data.n_targets(b) for b in plan)
            batches = [data.collate(b) for b in plan[rank::world]]
            loss_sum = accumulate(loop.model, loop.raw.lm_head.weight, batches, n_targets, world, loop.precision,
                                  device, loop.scaler)
            loss, stopping = gather(loop, loss_sum, n_targets, stop.requested)
            grad_norm = clip(loop)
            update(loop, step + 1, loss)
            lr = schedule_step(loop)
            record = {"step": step + 1, "loss": round(loss, 5), "lr": lr, "grad_norm": round(grad_norm, 4),
                      "tokens": sum(data.n_tokens(b) for b in plan)}
            flops = sum(x.size * loop.raw.config.train_flops_per_token(x.shape[1]) for x, _ in batches)
            log_step(loop, log, record, began, flops, peak)
            summary["tokens"] += record["tokens"]
            summary["seconds"] += record["seconds"]
            bar(step + 1, record)
            if stopping or due(step + 1, cfg.save_every, cfg.steps):
                checkpoint(loop, step + 1)
            if stopping:
                raise Interrupted(f"interrupted at step {step + 1}/{cfg.steps}; checkpoint saved in {run}; "
                                  "continue with the same command plus --resume")
            if due(step + 1, cfg.eval_every, cfg.steps):
                summary["validation"] = validation(loop, log, step + 1)
    final = consolidate(loop) if loop.shard == "fsdp" else loop.raw
    if rank == 0:
        final.save_pretrained(run / "final", tokenizer)
        summary.update(loss=loss, tokens_per_s=summary["tokens"] / max(summary["seconds"], 1e-9),
                       peak_mem_gb=peak_memory_gb(device), best=loop.best)
        summary["curves"] = plot_curves(run)
    return summary


@contextlib.contextmanager
def progress_bar(total: int, start: int, enabled: bool):
    """A rich progress bar with ETA and the latest loss, learning rate, throughput and MFU."""
    if not enabled:
        yield lambda step, record: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    with Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[info]}")) as progress:
        task = progress.add_task("train", total=total, completed=start, info="")
        yield lambda step, r: progress.update(task, completed=step, info=(
            f"loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['tokens_per_s']:,} tok/s  MFU {r['mfu']:.1%}"))


def plot_curves(run: Path) -> str:
    """Loss and learning rate against steps (the WSA shape shows here), when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped curves.png: matplotlib is not installed (optional: pip install matplotlib)"
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
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
