"""A training run's directory: its recorded settings and the rules for reusing it, resumable checkpoints (atomic,
never of non-finite weights, falling back to an earlier one when the latest is unreadable), metrics.jsonl, the RNG
state, Ctrl-C and the result files. Used by every training loop (train.train: CPT, SFT, the ID baseline)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from infra.console import say, warn
from infra.files import (
    TEMPORARY_DIR,
    UserError,
    atomic_dir,
    lock,
    marked,
    own_output,
    read_json,
    temporary_file,
    write_json,
)
from infra.trackers import FOLDERS as TRACKER_FOLDERS
from infra.trackers import open_tracker

# What a crashed save leaves behind: atomic_dir's `.NAME.tmpPID-HEX` / `.NAME.oldPID-HEX` siblings, write_json's
# `FILE.tmpPID`, `latest.tmp` and the log's rewrite. Only these names are ever removed.
CHECKPOINT_NAME = re.compile(r"step-\d{7}|(best|final)(-adapter)?")  # the directories a run writes through atomic_dir
LEFTOVER_FILE = re.compile(r"latest\.tmp|(run_config|best|results)\.json\.tmp\d+|metrics\.jsonl\.tmp\d+|"
                           r"reference\.tmp\.npz")
LOGS = ("metrics.jsonl", "curves.png", *TRACKER_FOLDERS)  # rewritten by a rerun of a start that got to no checkpoint
RUN_FILES = {"run_config.json", "checkpoints", "latest", "final", "best", "best.json", "results.json",
             "results-per_user.jsonl", "reference.npz", "final-adapter", "best-adapter", *LOGS}
# reference.npz: align's cached reference; final-adapter/, best-adapter/: a LoRA run's adapter beside its merged model
TRAINABLE = "trainable.safetensors"  # a partly frozen model's checkpoint (LoRA): its trainable parameters alone
REUSABLE = {"run_config.json", "checkpoints", "reference.npz", *LOGS}  # got to no checkpoint
RESUMABLE = ("train.lr", "train.save_every", "train.eval_every", "train.keep", "train.compile")  # same batch plan
PATHS = ("data", "model")  # where the dataset and the start are: their fingerprints, recorded too, are what counts
OPTIONS = "options."  # the options as given: what they resolve to (the keys above) is compared; their changes recorded


# --------------------------------------------------------------------------------------------------- the directory
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


def flatten(config: dict, prefix: str = "", sep: str = ".") -> dict:
    out = {}
    for k, v in config.items():
        out.update(flatten(v, f"{prefix}{k}{sep}", sep) if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def open_run(out_dir: str | Path, config: dict, resume: bool, overwrite: bool, rank: int = 0,
             inputs: list[Path] = (), files: list[Path | None] = ()) -> Path:
    """Create (or reuse) the run directory, lock it for this process and record its resolved configuration; refuse
    to mix two runs in one. Returns the directory (a symbolic link's target).

    On --resume the saved configuration must equal the new one, or the resumed run could not equal the original;
    only settings that leave the batch plan alone (RESUMABLE: the learning rate, intervals, --compile) may change,
    with a warning recorded in run_config.json; paths (PATHS) may be spelt differently, since the fingerprints of
    what they hold are compared. A directory that holds no checkpoint (a start that failed or was stopped early) is
    reused by a plain rerun. The run may neither hold nor lie inside its `inputs` (the dataset, the starting model)
    nor the `files` the command reads (a --config file; None = none), and --overwrite replaces only a run of the same
    command. The recorded `options` are never refused on --resume (what they resolve to is compared), but their
    changes are recorded too; a run from before they were recorded has none.
    """
    # --overwrite empties the directory: everything in it must be ours; otherwise nothing is removed that is not ours
    out = own_output(out_dir, what="run", overwrite=True, inputs=[*inputs, *(f for f in files if f)],
                     check=run_files if overwrite else lambda p: marked(p, "run_config.json"))
    saved = out / "run_config.json"
    config = json.loads(json.dumps(config))  # as it reads back from disk (tuples become lists)
    if overwrite and saved.exists() and (wrote := read_json(saved).get("command")) != config.get("command"):
        raise UserError(f"{out}: holds a run of `{wrote}`, not of `{config.get('command')}`; --overwrite replaces "
                        "only a run of the same command; nothing was changed; choose another --out")
    if resume and not out.exists():
        raise UserError(f"{out}: nothing to resume (no such directory); run without --resume")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        lock(out, "run")  # before anything is changed: a second process on the same --out stops here
        if saved.exists():  # a run directory of ours: never touch another kind of folder
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
        if "options" not in old:  # begun before options were recorded: their derived settings are compared
            new = {k: v for k, v in new.items() if not k.startswith(OPTIONS)}
        differ = sorted(k for k in set(new) | set(before) if before.get(k) != new.get(k) and k not in PATHS)
        if refused := [k for k in differ if k not in RESUMABLE and not k.startswith(OPTIONS)]:
            free = [o.removeprefix("train.") for o in RESUMABLE if o in new]
            raise UserError(f"{out}: --resume with different settings ({', '.join(refused)}); use the original ones "
                            + (f"(only {', '.join(free)} may change)" if free else "(none of this run's may change)"))
        if differ and rank == 0:
            changes = {k: [before.get(k), new.get(k)] for k in differ}
            warn(f"{out}: resuming with changed settings " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in
                                                                       changes.items()))
            history.append({"from": latest_text(out), "changed": changes})
        if rank == 0:
            write_json(saved, {**config, **({"resumed_with_changes": history} if history else {})})
        return out
    if any(out.iterdir()) if out.exists() else False:
        reusable = not has_checkpoint(out) and {p.name for p in out.iterdir()} <= REUSABLE
        if not (overwrite or reusable):
            raise UserError(f"{out}: already holds a run; pass --resume to continue it or --overwrite to replace it")
        if rank == 0 and overwrite:  # emptied, not removed: the directory (and its lock) stays
            for entry in out.iterdir():
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        elif rank == 0:
            warn(f"{out}: reusing the directory of a start that saved no checkpoint")
            for path in (out / name for name in LOGS):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    if dist.is_initialized():
        dist.barrier()  # no rank may create files before rank 0 has cleared the directory
    if rank == 0:
        write_json(saved, config)
    return out


def run_files(out: Path) -> str | None:
    """infra.files.own_output's check for a run directory: run_config.json, and nothing this project does not write
    in a run (interrupted saves' leftovers included)."""
    leftovers = {p.name for p in out.iterdir() if TEMPORARY_DIR.fullmatch(p.name) or LEFTOVER_FILE.fullmatch(p.name)}
    return marked(out, "run_config.json", names=RUN_FILES | leftovers)


# --------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(run: Path, step: int, model: nn.Module, tokenizer, state: dict, keep: int) -> None:
    """A resumable checkpoint: the model's weights (model.write_checkpoint: fp32, as trained) and the training state.
    A partly frozen model (LoRA) saves its trainable parameters alone (TRAINABLE): megabytes, not the base, which
    run_config.json names by its fingerprint.

    Never of non-finite weights. Written to a temporary directory then renamed; `latest` is switched only once the
    checkpoint is complete, and the older ones are removed only after that."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise UserError(f"non-finite weights at step {step} ({bad[0]}{' and more' if len(bad) > 1 else ''}); not "
                        f"saved; the last intact checkpoint is {latest_name(run)}; lower --lr and use --resume")
    name = f"step-{step:07d}"
    trainable = trainable_state(model)
    with atomic_dir(run / "checkpoints" / name) as tmp:
        if trainable is None:
            model.write_checkpoint(tmp, tokenizer)
        else:
            save_file(trainable, str(tmp / TRAINABLE), metadata={"format": "pt"})
        torch.save({"step": step, **state}, tmp / "state.pt")
    point_latest(run, name)
    prune(run, keep)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The trainable parameters of a partly frozen model, by state_dict name (activation checkpointing's wrapper
    left out of the names); None when every parameter is trained."""
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)}
    if all(v.requires_grad for v in state.values()):
        return None
    return {k: v.detach().contiguous().cpu() for k, v in state.items() if v.requires_grad}


def prune(run: Path, keep: int) -> None:
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


def load_checkpoint(path: Path, model: nn.Module) -> dict:
    """Copy a checkpoint's weights into `model` (model.load_weights, on CPU before it moves); return its state."""
    weights, state_file = path / "model.safetensors", path / "state.pt"
    trainable = trainable_state(model)
    if trainable is not None:  # LoRA: the adapters alone, onto the base the model was built from
        weights = path / TRAINABLE
    if (path / ".metadata").exists():  # FSDP's sharded checkpoint: the shards load once the model is sharded
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
        if trainable is None:
            model.load_weights(tensors)
        elif set(tensors) != set(trainable):
            raise ValueError(f"it holds {len(tensors)} trainable tensors, the model {len(trainable)}")
        else:
            model.load_state_dict(tensors, strict=False)
    except (RuntimeError, ValueError) as e:  # a tensor of the wrong shape or name
        raise Corrupt(f"{weights} does not match the model ({e})") from None
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


def resume_state(run: Path, model: nn.Module, rank: int) -> dict:
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


def rng_state() -> dict:
    """Data order and initialisation use explicit seeds; the global torch RNGs (dropout) are saved for the rest."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------- the log
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


class Log:
    """metrics.jsonl, written by rank 0: one strict-JSON record per step or validation (NaN is written as null),
    each forwarded to the experiment tracker if one is chosen (infra.trackers). On resume it keeps the records up to
    the checkpoint's step; whatever came after is redone (and the tracker told where it resumed)."""

    def __init__(self, run: Path, rank: int, resumed_at: int | None = None, tracker: str = "none"):
        self.path, self.records, self.file, self.tracker = run / "metrics.jsonl", [], None, None
        if resumed_at is not None:
            self.records = read_log(self.path, resumed_at)
        if rank == 0:  # the tracker first: one that cannot start leaves the log as it was
            self.tracker = open_tracker(tracker, run, resumed_at)
            if self.tracker and (run / "run_config.json").exists():
                self.tracker.config(read_json(run / "run_config.json"))
            write_log(self.path, self.records)
            self.file = open(self.path, "a")

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record, allow_nan=False) + "\n")
            self.file.flush()
            self.records.append(record)
        if self.tracker:  # after metrics.jsonl, the source of truth
            self.tracker.log(scalars(record), record["step"])

    def validated(self, step: int) -> bool:
        return any(r["step"] == step and "validation" in r for r in self.records)

    def summary(self) -> dict:
        """The whole run's totals from its records, so a resumed run counts the steps before the resume too."""
        steps = [r for r in self.records if "tokens" in r]
        losses = [r["loss"] for r in steps if r["loss"] is not None]
        checks = [r["validation"] for r in self.records if "validation" in r]
        tokens, seconds = sum(r["tokens"] for r in steps), sum(r["seconds"] for r in steps)
        return {"last_step": steps[-1]["step"] if steps else 0, "tokens": tokens, "seconds": seconds,
                "tokens_per_s": tokens / max(seconds, 1e-9),
                "loss": losses[-1] if losses else None, "skipped_steps": sum(r.get("skipped", False) for r in steps),
                "validation": checks[-1] if checks else None}

    def seconds_until(self, step: int) -> float:
        """Seconds of training and validation up to and including `step` (a resumed run's earlier part too)."""
        return sum(r.get("seconds", 0) for r in self.records if r["step"] <= step)

    def __enter__(self) -> Log:
        return self

    def __exit__(self, *exc) -> None:
        if self.file:
            self.file.close()
        if self.tracker:
            self.tracker.close()


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as a tracker's scalars: a step's under train/ (loss, lr, grad_norm, tokens_per_s, mfu,
    mem_gb, ...), a validation's figures and seconds under validation/ (nested ones flattened: validation/ndcg@10);
    nulls (non-finite values) left out."""
    group = "validation" if "validation" in record else "train"
    figures = {**record.get("validation", {}), **{k: v for k, v in record.items() if k not in ("step", "validation")}}
    return {k: float(v) for k, v in flatten(figures, f"{group}/", "/").items() if isinstance(v, (int, float))}


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


def evaluation_output(out: Path | None, model: Path, data: Path, name: str, overwrite: bool,
                      config: Path | None = None) -> Path:
    """Where `evaluate` writes a result and its per-user ranks, both guarded: by default runs/eval/ under the whole
    checkpoint path (relative to here when below it) and `name`, so two models never collide."""
    if out is None:
        here, where = Path.cwd().resolve(), model.resolve()
        where = where.relative_to(here) if where.is_relative_to(here) else where
        out = Path("runs/eval") / f"{'-'.join(p for p in where.parts if p != where.anchor)}-{name}.json"
    out = own_output(out, what="result of evaluate", overwrite=overwrite, check=evaluation_file,
                     inputs=[model, data, *filter(None, [config])], file=True)
    own_output(per_user_file(out), what="per-user ranks of evaluate", overwrite=overwrite, file=True,
               check=lambda p: evaluation_file(out))  # its per-user ranks beside it: replaced only with it
    return out


def evaluation_file(path: Path) -> str | None:
    """None for an earlier result of evaluate (which --overwrite may replace), else why it is not one."""
    try:
        result = read_json(path)
    except UserError:
        return "not JSON"
    ours = isinstance(result, dict) and result.get("command") == "evaluate" and "protocol" in result
    return None if ours else "no \"command\": \"evaluate\" in it"


def per_user_file(path: Path) -> Path:
    """Where save_result writes the per-user ranks of the result `path`."""
    return path.with_name(path.stem + "-per_user.jsonl")


def save_result(result: dict, path: Path, extra: dict) -> None:
    """Summary JSON plus a JSONL of per-user ranks beside it (for significance tests), each written whole or not
    at all; the summary last, so a result that exists has its per-user ranks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    per_user, ranks = result.pop("per_user"), per_user_file(path)
    tmp = temporary_file(ranks)
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in per_user)
    os.replace(tmp, ranks)
    write_json(path, {**extra, **result})
    say(f"results in {path}")


# --------------------------------------------------------------------------------------------------- stopping
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
