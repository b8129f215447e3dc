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
import torch.nn.functional as F

from common import UserError, atomic_dir, progress, read_json, write_json
from data import IGNORE, Case, Dataset, Encoder, Examples, target_example
from model import Decoder
from schedule import Schedule, scheduler
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


def peak_flops(device: torch.device, precision: str) -> float:
    """The device's peak FLOP/s for MFU: datasheet dense numbers on known GPUs, a measured matmul on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}
        return next((v for k, v in table.items() if k in name), 312e12) / (2 if precision == "fp32" else 1)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


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
    supervised = targets != IGNORE
    hidden = model(inputs, hidden=True, select=supervised)
    return cross_entropy_sum(hidden, lm_head, targets[supervised])


def accumulate(model, lm_head, batches, n_targets: int, world: int, precision: str, device,
               scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches; gradients end as d(mean token loss of the step).

    DDP averages gradients over ranks, hence the factor `world`; it syncs only on the last micro-batch."""
    total = torch.zeros((), device=device)
    for i, (inputs, targets) in enumerate(batches):
        sync = i == len(batches) - 1 or not hasattr(model, "no_sync")
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast(precision, device):
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


# --------------------------------------------------------------------------------------------------- the loop
def check_split(accum: int, world: int) -> None:
    """Each process takes an equal share of a step's micro-batches, so the batch plan is the same on any count."""
    if accum % world:
        raise UserError(f"--batch-tokens: {accum} micro-batches per step do not split evenly over {world} processes; "
                        f"use a multiple of {world} micro-batches")


def train(model: Decoder, tokenizer: Tokenizer, data, cfg: TrainConfig, run: Path, *, device: torch.device,
          rank: int = 0, world: int = 1, resume: bool = False,
          validate: Callable[[Decoder], dict] | None = None) -> dict:
    """Train `model` on `data` (data.Blocks or data.Examples) for cfg.steps optimizer steps; return a summary."""
    check_split(cfg.accum, world)
    precision = resolve_precision(cfg.precision, device)
    raw = model.to(device)
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=device_ids)
    params = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(  # no weight decay on norms and biases
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda")
    sched = scheduler(optimizer, cfg.schedule, cfg.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    start, best = 0, read_json(run / "best.json") if (run / "best.json").exists() else None
    if resume:
        state = torch.load(latest_checkpoint(run) / "state.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        start = state["step"]
        if start >= cfg.steps:
            raise UserError(f"{run}: the run already finished its {cfg.steps} steps; nothing to resume")
    else:
        torch.manual_seed(cfg.seed)
    micro, peak = MicroBatches(data), peak_flops(device, precision)
    log = open(run / "metrics.jsonl", "a") if rank == 0 else None
    summary = {"steps": cfg.steps, "precision": precision, "world_size": world, "tokens": 0, "seconds": 0.0}

    def checkpoint_now(step):
        if rank == 0:
            save_checkpoint(run, step, raw, tokenizer, optimizer, sched, scaler, cfg.keep)
        if world > 1:
            dist.barrier()

    def validation(step):
        result = None
        if rank == 0 and validate is not None:
            raw.eval()
            with torch.no_grad(), autocast(precision, device):
                result = validate(raw)
            raw.train()
            log.write(json.dumps({"step": step, "validation": result}) + "\n")
            log.flush()
            nonlocal best
            if cfg.select and (best is None or result[cfg.select] > best[cfg.select]):
                best = {"step": step, cfg.select: result[cfg.select]}
                raw.save_pretrained(run / "best", tokenizer)
                write_json(run / "best.json", best)
        if world > 1:
            dist.barrier()
        return result

    raw.train()
    with StopRequest() as stop, progress_bar(cfg.steps, start, enabled=rank == 0 and cfg.progress) as bar:
        for step in range(start, cfg.steps):
            began = time.perf_counter()
            plan = [micro[step * cfg.accum + j] for j in range(cfg.accum)]
            n_targets = sum(data.n_targets(b) for b in plan)
            batches = [data.collate(b) for b in plan[rank::world]]
            loss_sum = accumulate(model, raw.lm_head.weight, batches, n_targets, world, precision, device, scaler)
            stats = torch.stack([loss_sum, torch.tensor(float(stop.requested), device=device)])
            if world > 1:
                dist.all_reduce(stats)  # the step's loss for the log, and whether any rank was asked to stop
            loss = stats[0].item() / n_targets
            if not math.isfinite(loss):
                raise UserError(f"non-finite loss at step {step + 1}; nothing was updated and the last checkpoint "
                                f"({(run / 'latest').read_text().strip() if (run / 'latest').exists() else 'none'}) "
                                "is intact; lower --lr or use --precision fp32")
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            sched.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - began
            tokens = sum(data.n_tokens(b) for b in plan)
            flops = sum(x.size * raw.config.train_flops_per_token(x.shape[1]) for x, _ in batches)
            record = {"step": step + 1, "loss": round(loss, 5), "lr": lr, "grad_norm": round(grad_norm, 4),
                      "tokens": tokens, "tokens_per_s": round(tokens / seconds),
                      "mfu": round(flops / seconds / peak, 4),
                      "mem_gb": round(peak_memory_gb(device), 3), "seconds": round(seconds, 4)}
            summary["tokens"] += tokens
            summary["seconds"] += seconds
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar(step + 1, record)
            done = step + 1 == cfg.steps
            if stats[1] > 0 or done or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                checkpoint_now(step + 1)
            if stats[1] > 0:
                raise Interrupted(f"interrupted at step {step + 1}/{cfg.steps}; checkpoint saved in {run}; "
                                  "continue with the same command plus --resume")
            if done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
                summary["validation"] = validation(step + 1)
    if rank == 0:
        raw.save_pretrained(run / "final", tokenizer)
        summary.update(loss=loss, tokens_per_s=summary["tokens"] / max(summary["seconds"], 1e-9),
                       peak_mem_gb=peak_memory_gb(device), best=best)
        summary["curves"] = plot_curves(run)
    return summary


@contextlib.contextmanager
def progress_bar(total: int, start: int, enabled: bool):
    """common.progress with the latest loss, learning rate, throughput and MFU; called once per step."""
    with progress(total, "step", enabled, start) as advance:
        yield lambda step, r: advance(1, f"loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['tokens_per_s']:,} tok/s  "
                                         f"MFU {r['mfu']:.1%}")


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
