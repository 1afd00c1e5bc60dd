"""Validation loss every trainer.eval_interval steps and once at the end (unless the last step had it)."""

from __future__ import annotations

import math

import torch

from .. import distributed as D
from ..eval import loss_sums
from ..progress import progress
from ..step import StepEnd
from .base import Callback


class Eval(Callback):
    priority = 40

    def pre_train(self) -> None:
        self.evaluated = False  # at the last step

    def post_step(self, end: StepEnd) -> None:
        if end.rollback:
            return
        interval = self.trainer.cfg.trainer.eval_interval
        self.evaluated = bool(interval) and self.trainer.step % interval == 0
        if self.evaluated:
            self.log_eval()

    def post_train(self) -> None:
        if not self.evaluated and not self.trainer.stop.stopping:
            self.log_eval()

    def log_eval(self) -> None:
        t = self.trainer
        if m := evaluate(t.engine, t.val_data, t.dist.device, t.cfg.trainer.eval_batches):
            t.metrics.log(t.step, m)


@torch.no_grad()
def evaluate(engine, val_data, device: torch.device, max_batches: int) -> dict:
    """val/loss (the LM loss, averaged over tokens on every rank), val/ppl and what they were measured on;
    {} without validation data."""
    if val_data is None:
        return {}
    engine.eval()
    label = "the whole val split" if not max_batches else f"{max_batches} batches"
    with progress(f"evaluating {label}") as tick:
        loss_sum, n, batches, early = loss_sums(engine, val_data, max_batches, device, tick)
    engine.train()
    # loss x tokens, tokens, batches, ranks that stopped early: summed over the ranks
    total = D.all_reduce_(torch.tensor([loss_sum, n, batches, float(early)], dtype=torch.float64))
    loss = float(total[0] / total[1].clamp(min=1))
    return {
        "val/loss": loss,
        "val/ppl": math.exp(min(loss, 50.0)),
        "val/tokens": int(total[1]),
        "val/batches": int(total[2]),  # over all ranks
        "val/whole_split": int(total[3] == 0),  # every rank read its whole val share
    }
