"""Experiment trackers a run can be watched in besides metrics.jsonl (which stays the source of truth): TensorBoard
and W&B, both optional packages, imported only when chosen. infra.runs.Log forwards every record it writes (rank 0
only) and opens the tracker where its resumed run left off, so a resumed run continues the same curves."""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
from pathlib import Path
from typing import Protocol

from infra.files import UserError, read_json, write_json

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --tracker -> the package it needs
FOLDERS = ("tensorboard", "wandb")  # what the trackers write in a run directory (infra.runs' bookkeeping knows them)


class Tracker(Protocol):
    """config: the run's resolved settings (run_config.json), once per session; log: one metrics.jsonl record's
    numbers (infra.runs.scalars: train/loss, validation/ndcg@10, ...) at its step; close: flush and finish."""

    def config(self, settings: dict) -> None: ...
    def log(self, scalars: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


def check_tracker(name: str) -> None:
    """Refuse an unknown tracker or one whose package is missing, in one line, before any work is done."""
    if name != "none" and name not in PACKAGES:
        raise UserError(f"--tracker {name}: expected none, {', '.join(PACKAGES)}")
    if name != "none" and importlib.util.find_spec(PACKAGES[name]) is None:
        raise UserError(f"--tracker {name}: the {PACKAGES[name]} package is not installed; install it with "
                        f"`pip install {PACKAGES[name]}` or run without --tracker")


def open_tracker(name: str, run: Path, resumed_at: int | None) -> Tracker | None:
    """The tracker `name` writing into `run`; a run resumed at step `resumed_at` continues its curves from there."""
    check_tracker(name)
    return None if name == "none" else {"tensorboard": TensorBoard, "wandb": WandB}[name](run, resumed_at)


class TensorBoard:
    """Event files in RUN/tensorboard (`tensorboard --logdir RUN`). On resume, purge_step drops what the interrupted
    session logged after the checkpoint: those steps are redone, and each step is shown once."""

    def __init__(self, run: Path, resumed_at: int | None):
        from torch.utils.tensorboard import SummaryWriter
        self.first = 0 if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(run / "tensorboard", purge_step=self.first or None, flush_secs=10)

    def config(self, settings: dict) -> None:  # at the purge step, so a later resume from the same point replaces it
        self.writer.add_text("config", "```\n" + json.dumps(settings, indent=2) + "\n```", self.first)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """One W&B run per run directory: its id is kept in RUN/wandb/cprec-run.json, and a resumed run resumes it.
    W&B cannot take a step back, so the steps redone after a checkpoint are logged only if W&B never got them (the
    file records the last one it got). WANDB_MODE=offline writes locally (`wandb sync RUN/wandb/offline-run-*`)."""

    def __init__(self, run: Path, resumed_at: int | None):
        import wandb
        self.state = run / "wandb" / "cprec-run.json"
        self.state.parent.mkdir(exist_ok=True)
        saved = read_json(self.state) if resumed_at is not None and self.state.exists() else {}
        self.id, self.last = saved.get("id") or secrets.token_hex(4), tuple(saved.get("last", (-1, -1)))
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "cprec"), name=run.name, id=self.id,
                                  resume="allow", dir=run, settings=wandb.Settings(silent=True, console="off"))
        except Exception as e:  # no login, no network: wandb says which; the run has not started yet
            raise UserError(f"--tracker wandb: {str(e).strip().splitlines()[0]} (log in with `wandb login`, or set "
                            "WANDB_MODE=offline to write the run locally)") from None
        write_json(self.state, {"id": self.id, "last": self.last})

    def config(self, settings: dict) -> None:
        self.run.config.update(settings, allow_val_change=True)  # a resumed run may have changed --lr

    def log(self, scalars: dict[str, float], step: int) -> None:
        at = (step, int(any(k.startswith("validation/") for k in scalars)))  # a step's validation follows it
        if at <= self.last:
            return  # redone after a resume: W&B has it already
        self.run.log(scalars, step=step)
        self.last = at
        write_json(self.state, {"id": self.id, "last": at})

    def close(self) -> None:
        self.run.finish()
