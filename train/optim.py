"""AdamW with a skip switch, and the learning-rate schedules (pure functions of the step).

The schedule keeps no state: the LR of step s is `lr * lr_multiplier(s, ...)`, set on the param groups
before every update, so a resumed run follows it exactly and a changed `optim.lr` takes effect on resume.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from parallel.zero import optimizer_param_groups

from .config import OptimConfig, Schedule, ScheduleConfig


class SkippableAdamW(torch.optim.AdamW):
    """torch AdamW whose steps are no-ops while `skip` is set (spike policy `skip_batch`): no parameter
    update, no moment update, no step count. DeepSpeed's ZeRO optimizer calls `step` once per param group
    on the fp32 partitions and then copies them back, so the caller sets `skip` around one engine step and
    clears it after. The decision must be the same on every rank (it is taken from all-reduced values)."""

    skip: bool = False

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip:
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> SkippableAdamW:
    groups = optimizer_param_groups(model, cfg.weight_decay)
    fused = device.type == "cuda"
    return SkippableAdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
    )


def lr_multiplier(step: int, s: ScheduleConfig) -> float:
    """Multiplier of the base LR for the update made at 0-based `step`."""
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.name == Schedule.constant:
        return 1.0
    if s.name == Schedule.cosine:
        span = max(1, s.total_steps - s.warmup_steps)
        progress = min(1.0, (step - s.warmup_steps) / span)
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if s.name == Schedule.wsd:
        decay = max(1, round(s.decay_fraction * s.total_steps))
        start = max(s.warmup_steps, s.total_steps - decay)
        if step < start:
            return 1.0
        progress = min(1.0, (step - start + 1) / max(1, s.total_steps - start))
        return 1.0 - (1.0 - s.min_lr_ratio) * progress
    raise ValueError(f"unknown schedule {s.name}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
