"""AdamW whose update is skipped or clipped by the arguments of one call, and the learning-rate schedules (pure functions of the step).

The schedule keeps no state: the LR of step s is `lr * lr_multiplier(s, ...)`, set on the param groups
before every update, so a resumed run follows it exactly and a changed `optim.lr` takes effect on resume.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from parallel.zero import optimizer_param_groups

from .config import OptimConfig, Schedule, ScheduleConfig


@dataclass(frozen=True)
class Update:
    """The options of one optimizer update (see SkippableAdamW.update)."""

    skip: bool = False  # no update at all (spike policy skip_batch, non-finite values)
    max_norm: float = 0.0  # clip the global gradient norm to this; 0: no clipping
    norm: float | torch.Tensor | Callable[[], float | torch.Tensor] | None = None  # the norm, or who knows it


class SkippableAdamW(torch.optim.AdamW):
    """torch AdamW whose update takes its options as the arguments of one call: `with opt.update(skip=...,
    max_norm=..., norm=...): engine.step()`. DeepSpeed calls our `step` inside engine.step() (ZeRO: once per
    param group, on the fp32 partitions, then copies them back), so the options hold for the block and are
    gone after it. Skipping: no parameter update, no moment update, no step count. The decision must be the
    same on every rank (the trainer takes it from all-reduced values)."""

    _update: Update = Update()
    _divisor: float | torch.Tensor | None = None

    @contextlib.contextmanager
    def update(self, *, skip: bool, max_norm: float, norm) -> Iterator[None]:
        """`norm`: the global gradient norm before clipping, or a callable returning it when the first
        step of the block runs (ZeRO computes it inside engine.step())."""
        self._update, self._divisor = Update(skip, max_norm, norm), None
        try:
            yield
        finally:
            self._update, self._divisor = Update(), None

    @torch.no_grad()
    def step(self, closure=None):
        u = self._update
        if u.skip:
            return None
        if u.max_norm > 0 and self._divisor is None:  # once per update: ZeRO steps once per param group
            self._divisor = clip_divisor(u.norm() if callable(u.norm) else u.norm, u.max_norm)
        divisor = self._divisor
        if divisor is None:
            return super().step(closure)
        if self.defaults.get("fused"):
            # the fused kernel divides every gradient by grad_scale as it reads it (AMP's GradScaler input):
            # clipping without a separate pass over the gradients
            device = self.param_groups[0]["params"][0].device
            self.grad_scale = torch.as_tensor(divisor, dtype=torch.float32).to(device)
            try:
                return super().step(closure)
            finally:
                del self.grad_scale
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        torch._foreach_div_(grads, divisor)
        return super().step(closure)


def clip_divisor(norm: float | torch.Tensor, max_norm: float) -> float | torch.Tensor | None:
    """What the gradients are divided by to clip their global norm to max_norm, as torch.nn.utils.
    clip_grad_norm_ does (grads * max_norm / (norm + 1e-6) where that is below 1); None: no clipping. A norm
    on the device (ZeRO's) gives a divisor there, clamped at 1, read by no host sync."""
    if isinstance(norm, torch.Tensor):
        return torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)
    if math.isfinite(norm) and norm + 1e-6 > max_norm:
        return (norm + 1e-6) / max_norm
    return None


def grad_norm(parameters) -> float:
    """The global gradient norm of unpartitioned gradients, read back (the trainer logs it and skips non-
    finite steps). No expert parallelism where it is used (one rank), so torch's norm is the whole norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads, foreach=True)) if grads else 0.0


def optimizer_step(engine, optimizer: SkippableAdamW, *, skip: bool, max_norm: float) -> float:
    """The update at the end of a step; returns the global gradient norm before clipping (inf/nan: no update
    was made). One clipping path: DeepSpeed never clips (gradient_clipping 0); our step divides the
    gradients (in the fused kernel where there is one, which saves a read and a write of every gradient:
    20 GB of memory traffic a step for the 2.47B `bench` model). The norm: ZeRO computes it over its
    partitions inside engine.step(), before it calls our step; else it is taken here."""
    if engine.zero_optimization():
        zero = engine.optimizer
        zero.clip_grad = 0.0  # DeepSpeed's load restores it: a checkpoint of before this path holds >0
        with optimizer.update(skip=skip, max_norm=max_norm, norm=lambda: zero._global_grad_norm):
            engine.step()  # inf/nan gradients: ZeRO skips the update and reports an infinite norm
        norm = engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")
    norm = grad_norm(engine.module.parameters())
    skip = skip or not math.isfinite(norm)  # as ZeRO does: no update from inf/nan gradients
    with optimizer.update(skip=skip, max_norm=max_norm, norm=norm):
        engine.step()
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
