"""The components train.train's loop calls, so that the loop itself stays in sight: resumable checkpoints
(`Checkpoints`, with the health and write-error guards), validation with best/ and early stopping (`Validator`),
and each step's throughput, MFU and memory (`StepTimer`). Each holds what the loop hands it (infra imports nothing of
the top level); the loop alone decides when each is called."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from infra.console import progress, warn
from infra.device import DTYPES, autocast, peak_memory_gb
from infra.distributed import (
    agreed,
    barrier,
    consolidate,
    largest_weight,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
)
from infra.files import UserError, read_json, write_error, write_json
from infra.runs import Log, latest_name, latest_text, restore_rng, rng_state, save_checkpoint


# --------------------------------------------------------------------------------------------------- checkpoints
@dataclass
class Checkpoints:
    """A run's resumable checkpoints: the weights and the training state (AdamW, schedule, loss scaler, RNG), written
    by rank 0, or by every process under FSDP (its shards). Never of a diverged run; a write that fails stops the run
    in one line naming the last intact checkpoint."""
    run: Path
    model: nn.Module
    net: nn.Module  # `model` with its loss, wrapped (infra.distributed.wrap): FSDP's shards are saved through it
    optimizer: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    tokenizer: object
    shard: str
    rank: int
    device: torch.device
    keep: int  # checkpoints kept on disk
    diverge: float  # `diverged`'s factor

    def restore(self, state: dict, lr: float) -> int:
        """Load a checkpoint's optimizer, schedule, scaler and RNG state; return its step. A learning rate changed on
        --resume replaces the saved one from here on (the schedule's shape is kept)."""
        optimizer, sched = self.optimizer, self.sched
        if "sharded" in state:  # FSDP: weights and AdamW's state from the shards, into this run's shards
            load_sharded_checkpoint(self.net, optimizer, Path(state["sharded"]))
        else:
            optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        if why := unhealthy(self.model):  # written before checkpoints were checked: resuming it cannot train
            raise UserError(f"{latest_name(self.run)}: {why}, saved before checkpoints were checked; lower --lr "
                            "and start again with the same command plus --overwrite")
        if sched.base_lrs[0] != lr:
            sched.base_lrs = [lr for _ in optimizer.param_groups]
            for group, rule in zip(optimizer.param_groups, sched.lr_lambdas):
                group["initial_lr"], group["lr"] = lr, lr * rule(sched.last_epoch)
        return state["step"]

    def save(self, at: int, records: list[dict]) -> None:
        """The checkpoint of step `at`, unless it is unhealthy (`unhealthy`: weights beyond WEIGHT_BOUND, or the loss
        in `records`, rank 0's log, diverged): a healthy checkpoint is never replaced by a blown-up one."""
        run = self.run
        why = unhealthy(self.model) or diverged(records, self.diverge)
        if agreed(bool(why), self.device):  # rank 0 decides the loss's part, every process follows
            raise UserError(f"{why or 'the loss diverged'}; step {at} was not saved; {recovery(run, 'healthy')}")
        training = {"scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state()}
        try:
            if self.shard == "fsdp":
                save_sharded_checkpoint(run, at, self.net, self.optimizer, training, self.keep, self.rank)
            elif self.rank == 0:
                save_checkpoint(run, at, self.model, self.tokenizer, {"optimizer": self.optimizer.state_dict(),
                                                                      **training}, self.keep)
        except Exception as e:  # OSError, or safetensors' own error for the same
            if (failed := write_error(e)) is None:
                raise
            raise UserError(f"{getattr(e, 'filename', None) or run}: cannot be written ({failed[1]}); the checkpoint "
                            f"of step {at} was not saved; the last intact one is {latest_name(run)}; free space and "
                            "continue with the same command plus --resume") from None
        barrier()


WEIGHT_BOUND = 1e4  # a weight beyond it is a blow-up, never training: docs/design.md#healthy-checkpoints


def unhealthy(model: nn.Module) -> str:
    """Why `model`'s weights are unhealthy ("" while they are not): one beyond ±WEIGHT_BOUND or not finite (every
    process takes part under FSDP)."""
    largest, name = largest_weight(model)
    if largest <= WEIGHT_BOUND:
        return ""
    return (f"non-finite weights ({name})" if largest == float("inf") else
            f"the weights blew up: |{name}| reaches {largest:.3g}, beyond {WEIGHT_BOUND:g}")


def recovery(run: Path, kind: str) -> str:
    """What to do after a step that may not be saved: continue from the last checkpoint (every one is healthy: no
    other is written) with a lower --lr; with none, start again, since a --resume would only finish on skipped steps."""
    if latest_text(run):
        return (f"the last {kind} checkpoint is {latest_name(run)}; lower --lr and continue with the same command "
                "plus --resume")
    return f"this run has no {kind} checkpoint; lower --lr and start again with the same command plus --overwrite"


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


# --------------------------------------------------------------------------------------------------- validation
@dataclass
class Validator:
    """Validation on every process (an evaluation spreads its users over them; under FSDP each validates a whole
    copy gathered in the compute dtype), best/ and best.json for the best `select` so far, decided and written by
    rank 0, and early stopping once `patience` validations in a row brought no better one (0: never)."""
    run: Path
    model: nn.Module
    validate: Callable[[nn.Module], dict] | None  # the model's validation figures; None: no validation
    save: Callable[[nn.Module, Path], None]  # writes a model folder (best/): train.save_model
    select: str | None  # the figure to maximise
    patience: int
    shard: str
    rank: int
    device: torch.device
    precision: str

    def __post_init__(self):
        self.best = read_json(self.run / "best.json") if (self.run / "best.json").exists() else None  # on --resume

    def __call__(self, at: int, log: Log) -> None:
        """Validate after step `at`, keep best/, then log; every process takes part (the evaluation, FSDP's gathers,
        the barrier). A process that fails ends, and torchrun ends the others: none waits for it forever."""
        model, select = self.model, self.select
        if self.validate is not None:
            began = time.perf_counter()
            fsdp = self.shard == "fsdp"  # beam search's data-dependent forwards cannot run in FSDP's lockstep
            copy = consolidate(model, self.rank, DTYPES[self.precision]) if fsdp else model
            copy.eval()
            with torch.no_grad(), autocast(self.precision, self.device):
                result = self.validate(copy)
            model.train()
            del copy
            better = select and (self.best is None or result[select] > self.best[select])
            if agreed(self.rank == 0 and bool(better), self.device):  # rank 0 decides, every process follows
                full = consolidate(model, self.rank) if fsdp else model  # best/ from the fp32 weights, as final/
                if self.rank == 0:
                    self.best = {"step": at, select: result[select]}
                    self.save(full, self.run / "best")
                    write_json(self.run / "best.json", self.best)
            # Logged after best/ is written: a logged validation has its best/ on disk.
            if self.rank == 0:
                log.write({"step": at, "validation": result, "seconds": round(time.perf_counter() - began, 4)})
        barrier()

    def patience_spent(self, log: Log) -> bool:
        """Early stopping: `patience` validations since the best one. Rank 0 decides from its log, every process
        follows (the others hold none)."""
        waited = sum("validation" in r and r["step"] > self.best["step"] for r in log.records) if self.best else 0
        return agreed(0 < self.patience <= waited, self.device)


# --------------------------------------------------------------------------------------------------- timing
@dataclass
class StepTimer:
    """Each step's throughput, MFU and peak memory, added to its record and shown on the progress bar.
    `peak_flops(device, precision, remeasure=False)` is MFU's denominator (infra.device.peak_flops): on CPU a probe,
    measured again, once, when an MFU above 100% shows it had under-measured on a busy machine (where the probe's
    precision runs slower than the model's mix of kernels, MFU may stay above 100%: a second probe would not help)."""
    model: nn.Module
    device: torch.device
    precision: str
    peak_flops: Callable[..., float]
    rank: int

    def __post_init__(self):
        self.peak, self.remeasured = self.peak_flops(self.device, self.precision), False
        params = list(self.model.parameters())  # FSDP's DTensors count whole
        lora = any(not p.requires_grad for p in params)  # a frozen base: LoRA's FLOPs (ModelConfig)
        self.adapters = sum(p.numel() for p in params if p.requires_grad) if lora else 0
        self.began, self.advance = 0.0, lambda n=1, info="": None

    @contextlib.contextmanager
    def shown(self, total: int, start: int, enabled: bool):
        """A progress bar of the steps, with the latest loss, learning rate, throughput and MFU."""
        with progress(total, "step", enabled, start) as advance:
            self.advance = advance
            yield self

    def start(self) -> None:
        self.began = time.perf_counter()

    def __call__(self, record: dict, batches: list[tuple]) -> dict:
        """Add the timing of the step started last to its `record`, whose `batches` are this process's share."""
        flops = sum(x.size * self.model.config.train_flops_per_token(x.shape[1], self.adapters) for x, *_ in batches)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.began
        record.update(tokens_per_s=round(record["tokens"] / seconds), mfu=round(flops / seconds / self.peak, 4),
                      mem_gb=round(peak_memory_gb(self.device), 3), seconds=round(seconds, 4))
        if record["mfu"] > 1 and self.device.type == "cpu" and not self.remeasured:  # probed on a busy machine
            self.peak, self.remeasured = self.peak_flops(self.device, self.precision, remeasure=True), True
            warn(f"step {record['step']}: MFU {record['mfu']:.0%} exceeds 100%, so the peak matmul probe had "
                 f"under-measured; measured again: {self.peak / 1e9:.1f} GFLOP/s from here on", self.rank)
        self.advance(1, f"loss {'non-finite' if record['loss'] is None else format(record['loss'], '.4f')}  "
                        f"lr {record['lr']:.2e}  {record['tokens_per_s']:,} tok/s  MFU {record['mfu']:.1%}")
        return record
