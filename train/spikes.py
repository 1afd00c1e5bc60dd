"""Loss-spike detection: a step's loss far above its running statistics, or a non-finite loss or gradient.

The detector only judges; the trainer applies the policy (log, skip the update, roll back). Its inputs are
all-reduced, so every rank reaches the same verdict. Losses of spiked steps never enter the statistics.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from .config import SpikeConfig

# Numeric codes of a spike event's text fields (the event carries both; W&B charts only numbers):
# spike/kind_code, spike/action_code, spike/policy_code. Append new values; never renumber.
KIND_CODES = {"loss": 0, "nonfinite_loss": 1, "nonfinite_grad": 2}
ACTION_CODES = {"applied": 0, "skipped": 1, "rolled_back": 2}
POLICY_CODES = {"log": 0, "skip_batch": 1, "rollback": 2}


@dataclass
class Spike:
    """A step judged a spike (callbacks/spikes.py applies the policy)."""

    kind: str  # a key of KIND_CODES
    threshold: float | None
    skipped: bool  # the update was not applied
    layer: tuple[str, float] | None = None  # the layer with the largest gradient norm, and that norm


class SpikeDetector:
    def __init__(self, cfg: SpikeConfig) -> None:
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.window)
        self.count = 0  # spikes so far (cumulative over resumes and rollbacks)
        self.skipped = 0  # of them, steps whose update was not applied

    def threshold(self, step: int) -> float | None:
        """The loss above which `step` is a spike; None while there is no verdict (warmup, short history)."""
        if step < self.cfg.start_step or len(self.history) < self.cfg.min_history:
            return None
        mean = sum(self.history) / len(self.history)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (len(self.history) - 1))
        return mean + max(self.cfg.sigmas * std, self.cfg.min_jump * abs(mean))

    def check_loss(self, step: int, loss: float) -> tuple[str | None, float | None]:
        """(kind, threshold): kind is "nonfinite_loss", "loss" or None."""
        if not math.isfinite(loss):
            return "nonfinite_loss", self.threshold(step)
        thr = self.threshold(step)
        return ("loss" if thr is not None and loss > thr else None), thr

    def accept(self, loss: float) -> None:
        """A step that was not a spike: its loss joins the running statistics."""
        self.history.append(float(loss))

    def state_dict(self) -> dict:
        return {"history": list(self.history), "count": self.count, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque((float(x) for x in state.get("history", [])), maxlen=self.cfg.window)
        self.count = int(state.get("count", 0))
        self.skipped = int(state.get("skipped", 0))


def largest_layer_grad_norm(model: nn.Module) -> tuple[str, float] | None:
    """(layer, norm) of the layer with the largest gradient norm, before the optimizer step.

    Under ZeRO the gradients live in the optimizer's partitions; DeepSpeed's safe_get_full_grad assembles
    each with an all-reduce, so this is collective: call it on every rank (the verdict that triggers it is
    the same everywhere). About one extra gradient reduction, paid only on a spike."""
    from deepspeed.utils import safe_get_full_grad

    sq: dict[str, float] = {}
    for name, p in model.named_parameters():
        g = safe_get_full_grad(p)
        if g is None:
            continue
        parts = name.split(".")
        key = ".".join(parts[:3]) if parts[:2] == ["model", "layers"] else ".".join(parts[:2])
        sq[key] = sq.get(key, 0.0) + float(g.detach().float().pow(2).sum())
    if not sq:
        return None
    key = max(sq, key=lambda k: sq[k])
    return key, math.sqrt(sq[key])


def is_finite(x: float | torch.Tensor | None) -> bool:
    return x is not None and math.isfinite(float(x))
