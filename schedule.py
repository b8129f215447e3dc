"""Learning-rate schedules as LambdaLR factors: CPRec's Warmup-Stable-Annealing (WSA) and the ablation baselines.

WSA is the Warmup-Stable-Decay family (MiniCPM; Hägele et al. 2024): a linear warmup from a small non-zero factor,
a long constant peak, and an annealing phase over the last fraction of steps down to a floor. The paper gives no
formula; ours is below and every number is an option. Step the scheduler once per optimizer step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from infra.files import UserError, quote

SCHEDULES = ("wsa", "cosine", "linear", "constant")
SHAPES = ("1-sqrt", "cosine", "linear", "exp")


@dataclass
class Schedule:
    name: str = "wsa"
    warmup: float = 0.02  # a step count if >= 1, else a fraction of all steps
    anneal: float = 0.2  # WSA only: the annealing phase, count or fraction; 0 = warmup-stable only
    shape: str = "1-sqrt"  # WSA annealing shape; Hägele et al. find 1-sqrt beats linear
    floor: float = 0.1  # the factor at the last step (exp needs it > 0)
    start: float = 0.01  # the factor at the first step: never 0, or step 0 would be wasted


def steps(amount: float, total: int) -> int:
    """The one place counts and fractions are rounded: >= 1 is a count, below 1 a fraction of `total`."""
    return min(total, int(amount) if amount >= 1 else round(amount * total))


def anneal(progress: float, shape: str, floor: float) -> float:
    """Factor after `progress` in (0, 1] of a decay from 1 to `floor`: monotone, and exactly `floor` at 1."""
    if shape == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if shape == "linear":
        return floor + (1 - floor) * (1 - progress)
    if shape == "1-sqrt":
        return floor + (1 - floor) * (1 - math.sqrt(progress))
    if shape == "exp":
        return floor ** progress
    raise UserError(f"--anneal-shape {quote(shape)}: expected one of {', '.join(SHAPES)}")


def factor(step: int, total: int, s: Schedule) -> float:
    """The learning-rate multiplier for 0-based optimizer step `step` of `total`.

    LambdaLR also asks for step `total` (after the last step, and on resume): it gets the last step's factor."""
    step = min(step, total - 1)
    warmup = steps(s.warmup, total)
    if step < warmup:  # linear from `start` towards 1; the peak itself is reached at step `warmup`
        return s.start + (1 - s.start) * step / warmup
    if s.name == "constant":
        return 1.0
    decay_steps = steps(s.anneal, total) if s.name == "wsa" else total - warmup
    first_decay = total - decay_steps
    if step < first_decay or decay_steps == 0:
        return 1.0
    progress = (step - first_decay + 1) / decay_steps  # reaches 1 exactly at the last step
    shape = {"wsa": s.shape, "cosine": "cosine", "linear": "linear"}[s.name]
    return anneal(progress, shape, s.floor)


def validate(s: Schedule, total: int) -> None:
    """Refuse settings the schedule cannot follow (called by extras.options.check before a run starts)."""
    if s.name not in SCHEDULES:
        raise UserError(f"--schedule {quote(s.name)}: expected one of {', '.join(SCHEDULES)}")
    anneal(1.0, s.shape, s.floor)  # unknown shapes fail here, before training starts
    if s.name == "wsa" and s.shape == "exp" and s.floor <= 0:
        raise UserError("--lr-floor must be > 0 for the exp annealing shape")
    for option, amount in (("--warmup", s.warmup), ("--anneal", s.anneal)):
        if not amount >= 0:
            raise UserError(f"{option} {amount}: expected a step count, or a fraction of all steps, >= 0")
    if not 0 <= s.floor <= 1:
        raise UserError(f"--lr-floor {s.floor}: expected a fraction of the peak in [0, 1]")
    if not 0 < s.start <= 1:
        raise ValueError(f"Schedule.start {s.start}: expected a fraction of the peak in (0, 1]")
    for option, amount in (("--warmup", s.warmup), ("--anneal", s.anneal)):
        if amount >= 1 and int(amount) > total:
            raise UserError(f"{option} {amount:g}: more steps than the run's {total}; give a count up to {total} or a "
                            "fraction below 1")
    decay = steps(s.anneal, total) if s.name == "wsa" else 0
    if steps(s.warmup, total) + decay > total:
        raise UserError(f"warmup ({steps(s.warmup, total)}) + annealing ({decay}) steps exceed the {total} steps")


def scheduler(optimizer: torch.optim.Optimizer, s: Schedule, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Settings are checked before a run starts (extras.options.check calls `validate`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step, total, s))
