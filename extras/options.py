"""The training recipes' options, each declared once, and the command line's policy before a run starts.

A recipe's options are the fields of a dataclass (name, type, default, and through `option` the help and CLI names);
`recipe` turns the dataclasses into the typer command's signature and calls the recipe with one instance of each, so
nothing re-lists them: `train_config` takes TrainConfig's settings from them by name. A field whose type is itself a
dataclass (align's AlignConfig, baseline's BaselineConfig) contributes its fields in its place and is built whole.

Before a run: `check` refuses settings in the words of the command line, `fitting_defaults` fits --lr and --warmup to
the starting checkpoint, and `run_settings` is what run_config.json records of the training (compared on --resume).
"""
from __future__ import annotations

import functools
import inspect
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, get_type_hints

import torch
import typer

from infra.cli import OVERWRITE, PRECISION, PROGRESS, RESUME, TRACKER, split_list
from infra.config import DEFAULT_CPT, DEFAULT_DATA, INIT_MARKER, config_from_hf
from infra.console import say
from infra.device import resolve_precision
from infra.distributed import resolve_shard
from infra.files import UserError, read_json
from infra.trackers import check_tracker
from infra.weights import model_fingerprint
from model import LORA_TARGETS, Decoder, apply_lora
from schedule import Schedule
from schedule import steps as schedule_steps
from schedule import validate as validate_schedule
from train import TrainConfig

SCHEDULE = typer.Option("wsa", help="wsa (Warmup-Stable-Annealing), cosine, linear or constant.")
WARMUP = typer.Option(None, help="Warmup steps: a count, or a fraction of all steps if < 1 (default: 0.02; for a "
                      "pretrained LLM checkpoint max(2%, 100 steps), at most half the steps before annealing).")
LR = typer.Option(None, help="Peak learning rate (default: 1e-3 for a model `init` made; 1e-4 for a pretrained LLM "
                  "checkpoint, a fraction of its original peak).")
ANNEAL = typer.Option(0.2, help="WSA annealing steps: a count, or a fraction if < 1; 0 = warmup-stable only.")
SHAPE = typer.Option("1-sqrt", help="WSA annealing shape: 1-sqrt, cosine, linear or exp.")
FLOOR = typer.Option(0.1, help="Learning-rate factor reached at the last step.")
SHARD = typer.Option("auto", help="Several processes: ddp (a whole model per GPU), fsdp (parameters, gradients and "
                     "AdamW state sharded over GPUs) or none; auto = ddp for several processes, none for one.")
ACTIVATION_CHECKPOINTING = typer.Option(False, help="Recompute each decoder layer in backward: less activation "
                                        "memory for long blocks, about a third more compute.")
COMPILE = typer.Option(False, "--compile", help="torch.compile the model for training (inductor): the first step "
                       "compiles it; faster steps after (docs/benchmarks.md).")
SAVE_EVERY = "Steps between resumable checkpoints (0 = at the end)."
LORA_LR = 10  # LoRA's default peak lr: this many times full training's (Hu et al. 2021; PEFT's recipes); not tuned


# --------------------------------------------------------------------------------------------------- declaring them
def option(default: Any, help: str | None = None, *names: str) -> Any:
    """A recipe's option as a dataclass field: its default, and the typer.Option `recipe` gives the command (help,
    CLI names). `default` may be a typer.Option several commands share."""
    shared = default if isinstance(default, typer.models.OptionInfo) else typer.Option(default, *names, help=help)
    return field(default=shared.default, metadata={"option": shared})


def parameters(cls: type) -> list[inspect.Parameter]:
    """The command-line parameters of an options dataclass, a nested dataclass's in its place."""
    hints, out = get_type_hints(cls), []
    for f in fields(cls):
        out += parameters(hints[f.name]) if is_dataclass(hints[f.name]) else [inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.metadata["option"], annotation=hints[f.name])]
    return out


def build(cls: type, values: dict) -> Any:
    """An options dataclass from the command's flat values (the inverse of `parameters`)."""
    hints = get_type_hints(cls)
    return cls(**{f.name: build(hints[f.name], values) if is_dataclass(hints[f.name]) else values[f.name]
                  for f in fields(cls)})


def recipe(*groups: type) -> Callable:
    """Make a function of options dataclasses a typer command whose options are their fields, in order."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def command(**values):
            return fn(*(build(cls, values) for cls in groups))
        command.__signature__ = inspect.Signature([p for cls in groups for p in parameters(cls)])
        command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
        return command
    return wrap


@dataclass
class LoRA:
    """LoRA options, shared by pretrain, finetune and align: off (rank 0) unless --lora-rank is given."""
    lora_rank: int = option(0, "LoRA: train rank-R adapters on a frozen base held in the compute dtype (0 = off: "
                            "full training). final/ and best/ hold the merged model, final-adapter/ the adapter.")
    lora_alpha: Optional[float] = option(None, "LoRA scale alpha; the update is (alpha/rank) B A (default: 2 x "
                                         "rank, so the scale and the default --lr hold at any rank).")
    lora_targets: str = option(",".join(LORA_TARGETS), "Projections given adapters, comma-separated.")

    def check(self, cfg: TrainConfig, world: int) -> None:
        """Refuse LoRA settings, and what LoRA does not go with, before a run starts."""
        if not self.lora_rank:
            return
        if self.lora_rank < 0 or self.alpha <= 0 or not self.targets or set(self.targets) - set(LORA_TARGETS):
            raise UserError(f"--lora-rank {self.lora_rank} --lora-alpha {self.alpha:g} --lora-targets "
                            f"{self.lora_targets}: expected a rank >= 1, alpha > 0 and targets among "
                            f"{','.join(LORA_TARGETS)}")
        if resolve_shard(cfg.shard, world) == "fsdp":
            raise UserError("--lora-rank with --shard fsdp: not supported yet; use --shard ddp (LoRA's adapters and "
                            "their AdamW state are small: each process holds the frozen base once, in bf16 on GPU)")

    @property
    def alpha(self) -> float:
        return 2.0 * self.lora_rank if self.lora_alpha is None else self.lora_alpha

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(split_list(self.lora_targets))

    def record(self, start: Path) -> dict:
        """What run_config.json records (nothing without LoRA: such runs record what they always did). The base
        is named by its fingerprint: checkpoints hold the adapters only, so --resume must find the same base."""
        if not self.lora_rank:
            return {}
        return {"lora": {"rank": self.lora_rank, "alpha": self.alpha, "targets": list(self.targets),
                         "base_fingerprint": model_fingerprint(start)}}

    def load(self, start: Path, precision: str, seed: int, device: torch.device | str = "cpu") -> Decoder:
        """The starting model: as stored, in fp32; with LoRA, the frozen base in the compute dtype (bf16 under bf16,
        else fp32) with fp32 adapters (A drawn from `seed`, B = 0: exactly the base)."""
        if not self.lora_rank:
            return Decoder.from_pretrained(start, device=device)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return apply_lora(Decoder.from_pretrained(start, dtype, device), self.lora_rank, self.alpha, self.targets,
                          seed)


@dataclass
class Pretrain:
    data: Path = option(DEFAULT_DATA, "Dataset; the built-in world is created if missing.")
    model: Optional[Path] = option(None, "HF checkpoint to start from (default: models/small, created if missing).")
    out: Path = option(DEFAULT_CPT, "Run directory.")
    kinds: str = option("domain,mixed", "CPT sequence kinds: domain, mixed or both.")
    epochs: float = option(2.0, "Passes over the CPT text (ignored if --tokens is given).")
    tokens: Optional[int] = option(None, "Training budget in tokens.")
    lr: Optional[float] = option(LR)
    schedule: str = option(SCHEDULE)
    warmup: Optional[float] = option(WARMUP)
    anneal: float = option(ANNEAL)
    anneal_shape: str = option(SHAPE)
    lr_floor: float = option(FLOOR)
    batch_tokens: int = option(2048, "Tokens per optimizer step over all processes (small batches learn the most "
                               "per token here; raise it with the model).")
    block_len: int = option(256, "Tokens per packed block.")
    micro_batch: int = option(8, "Blocks per micro-batch and process.")
    precision: str = option(PRECISION)
    seed: int = option(0, "Seed for data order and initialisation.")
    shard: str = option(SHARD)
    activation_checkpointing: bool = option(ACTIVATION_CHECKPOINTING)
    compile: bool = option(COMPILE)
    lora: LoRA = field(default_factory=LoRA)
    save_every: int = option(200, SAVE_EVERY)
    eval_every: int = option(0, "Steps between validation losses (0 = at the end).")
    val_users: int = option(100, "Validation users per pre-training domain.")
    resume: bool = option(RESUME)
    overwrite: bool = option(OVERWRITE)
    progress: bool = option(PROGRESS)
    tracker: str = option(TRACKER)


@dataclass
class Finetune:
    domain: str = option(..., "Target domain, e.g. games.")
    data: Path = option(DEFAULT_DATA, "Dataset.")
    model: Optional[Path] = option(None, "Checkpoint to fine-tune (default: the latest pretrain, "
                                   "runs/pretrain/final; models/small = no-CPT ablation).")
    out: Optional[Path] = option(None, "Run directory (default: runs/finetune-DOMAIN).")
    users_fraction: float = option(1.0, "Fraction of training users (limited-SFT setting).")
    epochs: float = option(8.0, "Passes over the training examples.")
    lr: Optional[float] = option(LR)
    schedule: str = option("cosine", "wsa, cosine, linear or constant.")
    warmup: Optional[float] = option(WARMUP)
    anneal: float = option(ANNEAL)
    anneal_shape: str = option(SHAPE)
    lr_floor: float = option(FLOOR)
    batch_tokens: int = option(2048, "Padded tokens per optimizer step over all processes.")
    micro_tokens: int = option(2048, "Padded tokens per micro-batch and process.")
    window: int = option(20, "History items in a prompt.")
    eval_every: int = option(0, "Steps between validations (0 = once per epoch).")
    val_users: int = option(500, "Validation users (0 = all).")
    test_users: int = option(0, "Test users, a seeded random subset (0 = all).")
    beams: int = option(20, "Beam width of the evaluation (>= 20).")
    mask_history: bool = option(False, "Exclude items already in the history from rankings.")
    precision: str = option(PRECISION)
    seed: int = option(0, "Seed for data order and user sampling.")
    shard: str = option(SHARD)
    activation_checkpointing: bool = option(ACTIVATION_CHECKPOINTING)
    compile: bool = option(COMPILE)
    lora: LoRA = field(default_factory=LoRA)
    save_every: int = option(0, SAVE_EVERY)
    resume: bool = option(RESUME)
    overwrite: bool = option(OVERWRITE)
    progress: bool = option(PROGRESS)
    tracker: str = option(TRACKER)


def train_config(options: Any, steps: int, accum: int, start: Path | None = None, **fixed) -> TrainConfig:
    """The TrainConfig of a recipe's options: each of TrainConfig's settings the options name (the schedule from
    --schedule, --warmup, --anneal, --anneal-shape and --lr-floor), then the recipe's `fixed` ones. Given the
    starting checkpoint, --lr and --warmup not given are fitted to it (`fitting_defaults`)."""
    settings = {f.name for f in fields(TrainConfig)}
    given = {f.name: getattr(options, f.name) for f in fields(options) if f.name in settings}
    if start is not None:
        o = options
        given["lr"], warmup = fitting_defaults(start, o.lr, o.warmup, steps, o.schedule, o.anneal,
                                               lora=bool(getattr(o, "lora", LoRA()).lora_rank))
        given["schedule"] = Schedule(o.schedule, warmup, o.anneal, o.anneal_shape, o.lr_floor)
    return TrainConfig(steps, accum, **{**given, **fixed})


# --------------------------------------------------------------------------------------------------- before a run
def multiple(total: int, part: int, option: str, of: str) -> int:
    """How many `part`s make `total` (the micro-batches of a step), refusing a `total` they do not divide."""
    if total < part or total % part:
        raise UserError(f"{option} {total} must be a multiple of {of} ({part})")
    return total // part


def check(cfg: TrainConfig, device: torch.device, world: int, batch: str = "--batch-tokens", start: Path | None = None,
          longest: int = 0, option: str = "", lora: LoRA | None = None) -> None:
    """Every check of a run's settings, made before a run directory is created for them: schedule, precision, the
    split of each step's micro-batches (set by the option `batch`) over the processes, given the starting
    checkpoint the longest sequence (set by `option`) against its context, and the LoRA options."""
    if not cfg.lr > 0:
        raise UserError(f"--lr {cfg.lr}: expected a learning rate > 0")
    for name, every in (("--save-every", cfg.save_every), ("--eval-every", cfg.eval_every)):
        if every < 0:
            raise UserError(f"{name} {every}: expected a step count >= 0 (0 = at the end)")
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
        raise UserError(f"{batch}: {cfg.accum} micro-batches per step do not split evenly over {world} "
                        f"processes; use a multiple of {world} micro-batches")
    if start is not None and longest > (context := context_of(start)):
        raise UserError(f"{option}: {longest}-token sequences exceed the context of {start} ({context} tokens)")
    if lora is not None:
        lora.check(cfg, world)


def context_of(start: Path) -> int:
    """The longest sequence the checkpoint at `start` computes exactly."""
    return config_from_hf(read_json(start / "config.json"), str(start / "config.json")).context


def run_settings(cfg: TrainConfig) -> dict:
    """The training settings recorded in run_config.json (and compared on --resume)."""
    settings = asdict(cfg)
    settings.pop("progress")  # presentation, not part of the run
    settings.pop("tracker")  # where the run is watched: a resumed run may switch it
    settings.pop("activation_checkpointing")  # memory, not math: a resumed run may switch it
    return settings


def fitting_defaults(start: Path, lr: float | None, warmup: float | None, steps: int, schedule: str,
                     anneal: float, lora: bool = False) -> tuple[float, float]:
    """--lr and --warmup where not given, fitted to the checkpoint at `start`.

    A model `cprec init` made (config.json carries infra.config.INIT_MARKER, kept through training) starts from random
    weights: peak 1e-3 and 2% warmup, tuned on the small model. Any other checkpoint is a pretrained LLM, whose
    knowledge a large step would wash out: continual pre-training re-warms it to a fraction of its original peak
    (Gupta et al. 2023, "Continual Pre-Training of Large Language Models: How to (re)warm your model?"; Ibrahim et al.
    2024) with a WSD-style warmup (MiniCPM): peak 1e-4 and warmup max(2% of steps, 100 steps), at most half the
    steps before annealing. With LoRA the peak is LORA_LR times that (1e-2, 1e-3): adapters starting at B = 0 with
    a fixed alpha/rank = 2 move the model far less per step than full training. Explicit values always win."""
    factor = LORA_LR if lora else 1
    if INIT_MARKER in read_json(start / "config.json"):
        return (1e-3 * factor if lr is None else lr), (0.02 if warmup is None else warmup)
    decay = schedule_steps(anneal, steps) if schedule == "wsa" and anneal >= 0 else 0
    fitted_lr = 1e-4 * factor if lr is None else lr
    fitted_warmup = min(max(math.ceil(0.02 * steps), 100), (steps - decay) // 2) if warmup is None else warmup
    if lr is None or warmup is None:
        say(f"{start} is a pretrained checkpoint (no {INIT_MARKER} in its config.json): peak --lr {fitted_lr:g}, "
            f"--warmup {fitted_warmup:g} steps (continual pre-training defaults; pass either to override)")
    return fitted_lr, fitted_warmup
