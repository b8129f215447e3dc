import math

import pytest
import torch

from infra.files import UserError
from schedule import SHAPES, Schedule, factor, scheduler, steps, validate

TOTAL = 1000


def curve(s: Schedule, total: int = TOTAL) -> list[float]:
    return [factor(t, total, s) for t in range(total)]


def test_counts_and_fractions_are_rounded_in_one_place():
    assert steps(0.1, 1000) == 100 and steps(100, 1000) == 100 and steps(0.0015, 1000) == 2 and steps(5000, 10) == 10


@pytest.mark.parametrize("shape", SHAPES)
def test_wsa_phases(shape):
    s = Schedule("wsa", warmup=0.05, anneal=0.2, shape=shape, floor=0.1, start=0.01)
    f = curve(s)
    assert f[0] == pytest.approx(0.01)  # non-zero first step
    assert all(a < b for a, b in zip(f[:50], f[1:51]))  # warmup rises strictly into the peak
    assert f[50:800] == [1.0] * 750  # exact peak through the stable phase
    assert all(a > b for a, b in zip(f[799:], f[800:]))  # strictly monotone annealing
    assert f[-1] == pytest.approx(0.1)  # the floor at the last step
    assert f[50] - f[49] == pytest.approx((1 - 0.01) / 50)  # the warmup joins the peak without a jump
    # continuity at the annealing join: the first drop is one step of the continuous curve, so it vanishes as the
    # phase gets longer (1-sqrt starts steep, so compare against its own formula, not the next drop)
    long = Schedule("wsa", warmup=0.05, anneal=0.2, shape=shape, floor=0.1)
    join = 10**6 - 2 * 10**5
    assert 0 < factor(join - 1, 10**6, long) - factor(join, 10**6, long) < 3e-3


# Hand-computed factors of a 10-step WSA run (no warmup, 4 annealing steps, floor 0.1): the decay covers steps 6-9 at
# progress p = 1/4, 2/4, 3/4, 1. 1-sqrt: 0.1 + 0.9(1 - sqrt p); cosine: 0.1 + 0.45(1 + cos(pi p));
# linear: 0.1 + 0.9(1 - p); exp: 0.1^p.
GOLDEN = {
    "1-sqrt": [0.55, 0.3636039, 0.2205771, 0.1],
    "cosine": [0.8681981, 0.55, 0.2318019, 0.1],
    "linear": [0.775, 0.55, 0.325, 0.1],
    "exp": [0.5623413, 0.3162278, 0.1778279, 0.1],
}


@pytest.mark.parametrize("shape", SHAPES)
def test_annealing_shapes_equal_hand_computed_factors(shape):
    s = Schedule("wsa", warmup=0, anneal=4, shape=shape, floor=0.1)
    assert curve(s, 10) == pytest.approx([1.0] * 6 + GOLDEN[shape], abs=1e-6)
    warm = Schedule("wsa", warmup=4, anneal=4, shape=shape, floor=0.1, start=0.2)  # linear from 0.2 to the peak
    assert curve(warm, 10)[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_annealing_fraction_zero_is_warmup_stable_only():
    f = curve(Schedule("wsa", warmup=10, anneal=0))
    assert f[10:] == [1.0] * (TOTAL - 10)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_baselines_decay_from_warmup_to_floor(name):
    f = curve(Schedule(name, warmup=100, floor=0.0))
    assert f[100] < 1 and f[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(f[100:], f[101:]))
    mid = f[100 + 450]  # half-way through the decay
    assert mid == pytest.approx(0.5 * (1 + math.cos(math.pi * 451 / 900)) if name == "cosine" else 1 - 451 / 900)


def test_constant():
    assert curve(Schedule("constant", warmup=10))[10:] == [1.0] * (TOTAL - 10)


def test_invalid_settings_are_refused():
    for s, message in [(Schedule("wsd"), "--schedule 'wsd'"), (Schedule(shape="sqrt"), "--anneal-shape 'sqrt'"),
                       (Schedule(shape="exp", floor=0.0), "must be > 0"),
                       (Schedule(warmup=0.6, anneal=0.6), "exceed"), (Schedule(warmup=-5), "--warmup -5"),
                       (Schedule(anneal=-0.1), "--anneal -0.1")]:
        with pytest.raises(UserError, match=message):
            validate(s, TOTAL)


@pytest.mark.parametrize("s, total, expected", [
    (Schedule(warmup=2, anneal=0), 5, [0.01, 0.505, 1, 1, 1]),  # warmup-stable only
    (Schedule(warmup=0, anneal=0.2), 1, [1]),  # annealing rounds to 0 steps in 1- and 2-step runs
    (Schedule(warmup=0, anneal=0.2), 2, [1, 1]),
    (Schedule("cosine", warmup=1), 1, [0.01]),  # nothing left to decay
])
def test_the_factor_after_the_last_step_exists(s, total, expected):
    """LambdaLR evaluates step `total` after the last step and when a finished run is resumed: no division by 0."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = scheduler(opt, s, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected)
    assert factor(total, total, s) == factor(total - 1, total, s)
    scheduler(opt, s, total).load_state_dict(sched.state_dict())


def test_lambda_lr_state_restores_on_resume():
    def run(n, state=None):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        sched = scheduler(opt, Schedule(warmup=10, anneal=0.3), 100)
        if state:
            sched.load_state_dict(state)
        lrs = []
        for _ in range(n):
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        return lrs, sched.state_dict()

    full, _ = run(100)
    first, state = run(40)
    rest, _ = run(60, state)
    assert first + rest == full
