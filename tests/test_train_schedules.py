"""Every learning-rate schedule, at every step, against its formula written out here (docs/train.md), over
parameters that move each term: warmup, total steps, floor (min_lr_ratio) and wsd's decay fraction."""

from __future__ import annotations

import math

import pytest

from train.config import Schedule, ScheduleConfig
from train.optim import lr_multiplier

CASES = [  # (warmup, total, floor, decay fraction)
    (0, 50, 0.0, 0.2),
    (10, 110, 0.1, 0.2),
    (7, 40, 0.35, 0.5),
    (3, 9, 0.6, 1.0),
]


def cosine(step: int, w: int, total: int, floor: float) -> float:
    if step < w:
        return (step + 1) / w
    t = min(1.0, (step - w) / (total - w))  # 0 at the end of warmup, 1 at total_steps and after
    return floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2


def wsd(step: int, w: int, total: int, floor: float, frac: float) -> float:
    if step < w:
        return (step + 1) / w
    start = max(w, total - max(1, round(frac * total)))  # the decay: the last `frac` of total_steps
    if step < start:
        return 1.0
    return 1.0 - (1.0 - floor) * min(1.0, (step - start + 1) / (total - start))  # the floor on its last step


@pytest.mark.parametrize("w,total,floor,frac", CASES)
def test_each_schedule_follows_its_formula_at_every_step(w, total, floor, frac):
    kw = dict(warmup_steps=w, total_steps=total, min_lr_ratio=floor, decay_fraction=frac)
    for step in range(total + 20):  # past total_steps: the floor stays
        c = lr_multiplier(step, ScheduleConfig(name=Schedule.cosine, **kw))
        d = lr_multiplier(step, ScheduleConfig(name=Schedule.wsd, **kw))
        k = lr_multiplier(step, ScheduleConfig(name=Schedule.constant, **kw))
        assert c == pytest.approx(cosine(step, w, total, floor), abs=1e-12), ("cosine", step)
        assert d == pytest.approx(wsd(step, w, total, floor, frac), abs=1e-12), ("wsd", step)
        assert k == pytest.approx((step + 1) / w if step < w else 1.0, abs=1e-12), ("constant", step)


@pytest.mark.parametrize("w,total,floor,frac", CASES)
def test_shapes_and_floors(w, total, floor, frac):
    kw = dict(warmup_steps=w, total_steps=total, min_lr_ratio=floor, decay_fraction=frac)
    c = [lr_multiplier(s, ScheduleConfig(name=Schedule.cosine, **kw)) for s in range(total + 5)]
    d = [lr_multiplier(s, ScheduleConfig(name=Schedule.wsd, **kw)) for s in range(total + 5)]
    peak = max(w - 1, 0)
    for lr in (c, d):
        assert lr[peak] == pytest.approx(1.0)  # the warmup ends at the base LR
        assert all(a <= b for a, b in zip(lr[:peak], lr[1 : peak + 1], strict=True))  # rises
        assert all(a >= b - 1e-15 for a, b in zip(lr[peak:], lr[peak + 1 :], strict=False))  # then falls
        assert min(lr) == pytest.approx(min(floor, lr[0]))  # never under the floor
        assert lr[-1] == pytest.approx(floor) and lr[total] == pytest.approx(floor)  # and ends on it
    mid = w + (total - w) // 2
    if (total - w) % 2 == 0:  # cosine: halfway between the peak and the floor at the middle of its decay
        assert c[mid] == pytest.approx((1 + floor) / 2)
    assert d[total - 1] == pytest.approx(floor)  # wsd reaches the floor on the last step
