"""The training recipes' options, each declared once, and the command line's policy before a run starts.

A recipe's options are the fields of a dataclass (name, type, default, and through `option` the help and CLI names);
`recipe` turns the dataclasses into the typer command's signature and calls the recipe with one instance of each, so
nothing re-lists them: `train_config` takes TrainConfig's settings from them by name. A field whose type is itself a
dataclass (align's AlignConfig, baseline's BaselineConfig) contributes its fields in its place and is built whole.

--config FILE (every recipe's first option) gives any of them from a file under their CLI names (`from_file`), or
repeats a run from its run_config.json, whose `options` block (`run_config`) records every option as resolved.

Before a run: `check` refuses settings in the words of the command line, `fitting_defaults` fits --lr and --warmup to
the starting checkpoint, and `run_settings` is what run_config.json records of the training (compared on --resume).
"""
from __future__ import annotations

import copy
import functools
import inspect
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, get_args, get_type_hints

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
                  "checkpoint, a fraction of its original peak; with --lora-rank R, 3e-3·sqrt(8/R) for either).")
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
CONFIG = typer.Option(None, help="A JSON file (or YAML, with PyYAML) of this command's options under their names "
                      "(batch-tokens: 4096), or a run's run_config.json to repeat that run; options given here "
                      "override the file's. --out, --resume and --overwrite are never read from it.")
PER_INVOCATION = ("config", "out", "resume", "overwrite")  # where and how this command writes: never from a file
KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path (a string)"}


def lora_lr_factor(rank: int) -> float:
    """LoRA's default peak lr as a multiple of 1e-3 (pretrain, finetune) or of align's own default: 3 at rank 8,
    falling as 1/sqrt(rank) (2.1 at 16, 1.06 at 64): with alpha/rank fixed, B @ A sums `rank` terms that AdamW each
    moves by about lr, so a larger rank moves the model further per step. Chosen on validation NDCG@10
    (docs/results.md#lora-against-full-fine-tuning): over ranks 8, 16, 64 and 7 peaks on the small model, and at rank 8
    on SmolLM2-135M, where 3e-3 also won (1e-3: -0.02, 3e-4: -0.11 against full SFT)."""
    return 3 * math.sqrt(8 / rank) if rank else 1.0


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
    """Make a function of options dataclasses a typer command whose options are their fields, in order, the
    values of a --config file filling those not given on the command line (`with_config`)."""
    def wrap(fn: Callable) -> Callable:
        options = [p for cls in groups for p in parameters(cls)]

        @functools.wraps(fn)
        def command(ctx: typer.Context, **values):
            values = with_config(ctx, options, values)
            return fn(*(build(cls, values) for cls in groups))
        context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        command.__signature__ = inspect.Signature([context, *map(not_required, options)])
        command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
        return command
    return wrap


def not_required(p: inspect.Parameter) -> inspect.Parameter:
    """A required option as click sees it: optional, since a --config file may give it (`with_config` checks it)."""
    if p.default.default is not ...:
        return p
    info = copy.copy(p.default)
    info.default = None
    return p.replace(default=info)


def with_config(ctx: typer.Context, options: list[inspect.Parameter], values: dict) -> dict:
    """The command's values, each one not typed on the command line (click's parameter source) taken from the
    --config file where it gives it; then a required option given nowhere is refused."""
    if values.get("config") is not None:
        given = from_file(values["config"], ctx.info_name, {p.name: p.annotation for p in options})
        values = {**values, **{k: v for k, v in given.items()
                               if ctx.get_parameter_source(k).name in ("DEFAULT", "DEFAULT_MAP")}}
    if missing := [p.name for p in options if p.default.default is ... and values[p.name] is None]:
        raise UserError(f"Missing option '--{missing[0].replace('_', '-')}' (on the command line or in a --config "
                        "file)")
    return values


def read_config(path: Path) -> dict:
    """A --config file's object: JSON, or YAML (.yaml, .yml) when PyYAML is installed."""
    if path.suffix not in (".yaml", ".yml"):
        content = read_json(path)  # its own one-line errors
    else:
        try:
            import yaml
        except ImportError:
            raise UserError(f"--config {path}: a YAML file needs PyYAML (pip install pyyaml); or write it as "
                            "JSON") from None
        try:
            content = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise UserError(f"--config {path}: cannot read it ({e.strerror})") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(content, dict):
        raise UserError(f"--config {path}: expected an object of options (name: value), not "
                        f"{type(content).__name__}")
    return content


def from_file(path: Path, command: str, hints: dict[str, Any]) -> dict:
    """The options a --config file gives, by parameter name, each of the option's type. A run's run_config.json
    gives its `options` block (derived facts are never options: `run_config` checks those that must still hold);
    any other file is a user's, whose unknown keys, wrong types and other command are refused in one line."""
    content = read_config(path)
    if "options" in content:  # a run's run_config.json
        if content.get("command") != command:
            raise UserError(f"--config {path}: the run_config.json of a {content.get('command')} run, not of "
                            f"{command}; give it to `cprec.py {content.get('command')}`")
        options = content["options"]
        if changes := [f"{k} {a} -> {b}" for entry in content.get("resumed_with_changes", [])
                       for k, (a, b) in entry["changed"].items()]:
            say(f"note: {path}: that run was resumed with changed settings ({', '.join(changes)}); this repeat "
                "runs with the later values from its first step")
    elif "data_fingerprint" in content:
        raise UserError(f"--config {path}: a run_config.json from before runs recorded their options (no "
                        "\"options\" in it); give that run's options on the command line")
    else:
        options = dict(content)
        if (other := options.pop("command", command)) != command:
            raise UserError(f"--config {path}: command {json.dumps(other)}: a file of another command; expected "
                            f"\"{command}\" (or no command key)")
    given = {}
    for key, value in options.items():
        name = str(key).replace("-", "_")
        if name in PER_INVOCATION:
            raise UserError(f"--config {path}: {key} is never read from a file (it says where and how this command "
                            f"writes); give --{name.replace('_', '-')} on the command line")
        if name not in hints:
            raise UserError(f"--config {path}: {key} is not an option of {command} (see `cprec.py {command} --help`)")
        if name in given:
            raise UserError(f"--config {path}: {key} is given twice")
        given[name] = typed(value, hints[name], f"--config {path}: {key}")
    return given


def typed(value: Any, hint: Any, where: str) -> Any:
    """A config file's value as the option's type (an int where a float is expected becomes one), or one line that
    names the option and what it expects."""
    optional = type(None) in get_args(hint)
    base = next(t for t in get_args(hint) or (hint,) if t is not type(None))
    if value is None and optional:
        return None
    accepted = (int, float) if base is float else str if base is Path else base
    if isinstance(value, bool) != (base is bool) or not isinstance(value, accepted):
        raise UserError(f"{where} {json.dumps(value, default=str)}: expected {KINDS[base]}"
                        f"{' or null' if optional else ''}")
    return base(value)


def values_of(options: Any) -> dict:
    """An options dataclass's values by parameter name, a nested dataclass's in its place (the inverse of `build`)."""
    out = {}
    for f in fields(options):
        value = getattr(options, f.name)
        out.update(values_of(value) if is_dataclass(value) else {f.name: value})
    return out


def run_config(options: Any, facts: dict) -> dict:
    """What a run's run_config.json holds: the `facts` the recipe derived (compared on --resume, read by align), and
    `options`, every option as resolved under its CLI name, which --config reads back to repeat the run. Repeating
    a run from its run_config.json, the facts it depends on must still hold: the dataset's and the tokenizer's
    fingerprints."""
    recorded = {k.replace("_", "-"): str(v) if isinstance(v, Path) else v for k, v in values_of(options).items()
                if k not in PER_INVOCATION}
    if options.config is not None and "options" in (run := read_config(options.config)):
        what = {"data_fingerprint": f"the dataset {facts.get('data')}",
                "tokenizer_fingerprint": f"the tokenizer of {facts.get('model')}"}
        for key, name in what.items():
            if key in run and key in facts and run[key] != facts[key]:
                raise UserError(f"--config {options.config}: {name} is not the one that run used ({key} "
                                f"{facts[key]}, not {run[key]}); the run cannot be repeated on it")
    return {**facts, "options": recorded}


@dataclass
class LoRA:
    """LoRA options, shared by pretrain, finetune and align: off (rank 0) unless --lora-rank is given."""
    lora_rank: int = option(0, "LoRA: train rank-R adapters on a frozen base held in the compute dtype (0 = off: "
                            "full training). final/ and best/ hold the merged model, final-adapter/ the adapter.")
    lora_alpha: Optional[float] = option(None, "LoRA scale alpha; the update is (alpha/rank) B A (default: 2 x "
                                         "rank, so the scale and the default --lr hold at any rank).")
    lora_targets: str = option(",".join(LORA_TARGETS), "Projections given adapters, comma-separated.")

    def check(self) -> None:
        """Refuse LoRA settings before a run starts."""
        if not self.lora_rank:
            return
        if self.lora_rank < 0 or self.alpha <= 0 or not self.targets or set(self.targets) - set(LORA_TARGETS):
            raise UserError(f"--lora-rank {self.lora_rank} --lora-alpha {self.alpha:g} --lora-targets "
                            f"{self.lora_targets}: expected a rank >= 1, alpha > 0 and targets among "
                            f"{','.join(LORA_TARGETS)}")

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

    def load(self, start: Path, precision: str, seed: int, device: torch.device | str = "cpu",
             shard: str = "none") -> Decoder:
        """The starting model: as stored, in fp32; with LoRA, the frozen base in the compute dtype (bf16 under bf16,
        else fp32) with fp32 adapters (A drawn from `seed`, B = 0: exactly the base). Under FSDP on the meta device:
        no weight is read yet, each layer is as it is sharded (infra.distributed.shard_fsdp), so no process holds the
        whole model."""
        device = "meta" if shard == "fsdp" else device
        if not self.lora_rank:
            return Decoder.from_pretrained(start, device=device)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return apply_lora(Decoder.from_pretrained(start, dtype, device), self.lora_rank, self.alpha, self.targets,
                          seed)


@dataclass
class Pretrain:
    config: Optional[Path] = option(CONFIG)
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
    config: Optional[Path] = option(CONFIG)
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


@dataclass
class Evaluate:
    config: Optional[Path] = option(CONFIG)
    domain: str = option(..., "Domain whose whole catalogue is ranked.")
    model: Path = option(..., "Checkpoint (CPT for zero-shot, or fine-tuned).")
    data: Path = option(DEFAULT_DATA, "Dataset.")
    split: str = option("test", "test or valid.")
    beams: int = option(20, "Beam width (>= the largest K, 20).")
    exact: bool = option(False, "Score every item exactly instead of beam search.")
    unconstrained: bool = option(False, "Beam search without the item trie: how many generated titles are no item.")
    users: int = option(0, "Evaluate a seeded random subset of users (0 = all).")
    mask_history: bool = option(False, "Exclude items already in the history.")
    window: int = option(20, "History items in a prompt.")
    precision: str = option(PRECISION)
    seed: int = option(0, "Seed of the user subset.")
    out: Optional[Path] = option(None, "Results JSON (default: runs/eval/MODEL-PATH-DOMAIN-SPLIT.json).")
    overwrite: bool = option(False, "Replace an earlier result of evaluate in --out.")
    progress: bool = option(PROGRESS)


def train_config(options: Any, steps: int, accum: int, start: Path | None = None, **fixed) -> TrainConfig:
    """The TrainConfig of a recipe's options: each of TrainConfig's settings the options name (the schedule from
    --schedule, --warmup, --anneal, --anneal-shape and --lr-floor), then the recipe's `fixed` ones. Given the
    starting checkpoint, --lr and --warmup not given are fitted to it (`fitting_defaults`)."""
    settings = {f.name for f in fields(TrainConfig)}
    given = {f.name: getattr(options, f.name) for f in fields(options) if f.name in settings}
    if start is not None:
        o = options
        given["lr"], warmup = fitting_defaults(start, o.lr, o.warmup, steps, o.schedule, o.anneal,
                                               lora_rank=getattr(o, "lora", LoRA()).lora_rank)
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
        lora.check()



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
                     anneal: float, lora_rank: int = 0) -> tuple[float, float]:
    """--lr and --warmup where not given, fitted to the checkpoint at `start`.

    A model `cprec init` made (config.json carries infra.config.INIT_MARKER, kept through training) starts from random
    weights: peak 1e-3 and 2% warmup, tuned on the small model. Any other checkpoint is a pretrained LLM, whose
    knowledge a large step would wash out: continual pre-training re-warms it to a fraction of its original peak
    (Gupta et al. 2023, "Continual Pre-Training of Large Language Models: How to (re)warm your model?"; Ibrahim et al.
    2024) with a WSD-style warmup (MiniCPM): peak 1e-4 and warmup max(2% of steps, 100 steps), at most half the
    steps before annealing. With LoRA the peak is 1e-3 x `lora_lr_factor(rank)` whatever the checkpoint: the
    adapters start at B = 0, so the knowledge they could wash out is only what the low rank lets through; a pretrained
    LLM's full-training peak (1e-4) times the factor left LoRA 0.11 NDCG@10 behind. Explicit values always win."""
    peak = 1e-3 * lora_lr_factor(lora_rank) if lora_rank else None
    if INIT_MARKER in read_json(start / "config.json"):
        return (lr if lr is not None else peak or 1e-3), (0.02 if warmup is None else warmup)
    decay = schedule_steps(anneal, steps) if schedule == "wsa" and anneal >= 0 else 0
    fitted_lr = lr if lr is not None else peak or 1e-4
    fitted_warmup = min(max(math.ceil(0.02 * steps), 100), (steps - decay) // 2) if warmup is None else warmup
    if lr is None or warmup is None:
        whose = "LoRA's peak, continual pre-training's warmup" if lora_rank else "continual pre-training defaults"
        say(f"{start} is a pretrained checkpoint (no {INIT_MARKER} in its config.json): peak --lr {fitted_lr:g}, "
            f"--warmup {fitted_warmup:g} steps ({whose}; pass either to override)")
    return fitted_lr, fitted_warmup
