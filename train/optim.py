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
    clip_divisor: float | None = None  # set by clip_grad_norm_ below, consumed by the next step

    @torch.no_grad()
    def step(self, closure=None):
        divisor, self.clip_divisor = self.clip_divisor, None
        if self.skip:
            return None
        if divisor is None:
            return super().step(closure)
        if self.defaults.get("fused"):
            # the fused kernel divides every gradient by grad_scale as it reads it (AMP's GradScaler input):
            # clipping without a separate pass over the gradients
            device = self.param_groups[0]["params"][0].device
            self.grad_scale = torch.tensor(divisor, dtype=torch.float32, device=device)
            try:
                return super().step(closure)
            finally:
                del self.grad_scale
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        torch._foreach_div_(grads, divisor)
        return super().step(closure)


def clip_grad_norm_(optimizer: SkippableAdamW, parameters, max_norm: float) -> float:
    """The global gradient norm, read back (the trainer logs it and skips non-finite steps), and clipping to
    max_norm as torch.nn.utils.clip_grad_norm_ does, left to the optimizer's next step: a fused optimizer
    scales inside its kernel, which saves a read and a write of every gradient (20 GB of memory traffic a
    step for the 2.47B `bench` model). max_norm 0 disables clipping. Unpartitioned optimizers only (ZeRO clips itself)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = float(torch.nn.utils.get_total_norm(grads, foreach=True)) if grads else 0.0
    if max_norm > 0 and math.isfinite(norm) and norm + 1e-6 > max_norm:
        optimizer.clip_divisor = (norm + 1e-6) / max_norm  # torch: grads * max_norm / (norm + 1e-6)
    return norm


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
