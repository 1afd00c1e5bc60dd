"""Validation loss every trainer.eval_interval steps and once at the end (unless the last step had it)."""

from __future__ import annotations

import math

import torch

from .. import distributed as D
from ..progress import progress
from ..step import StepEnd
from . import Callback


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
    total = torch.zeros(4, dtype=torch.float64)  # loss x tokens, tokens, batches, ranks that stopped early
    with progress(
        f"evaluating {'the whole val split' if not max_batches else f'{max_batches} batches'}"
    ) as tick:
        for i, (x, y) in enumerate(val_data):
            if max_batches and i >= max_batches:
                total[3] += 1
                break
            out = engine(x.to(device), labels=y.to(device))
            n = float((y != -100).sum())
            total += torch.tensor([float(out.lm_loss) * n, n, 1, 0], dtype=torch.float64)
            tick()
    engine.train()
    D.all_reduce_(total)
    loss = float(total[0] / total[1].clamp(min=1))
    return {
        "val/loss": loss,
        "val/ppl": math.exp(min(loss, 50.0)),
        "val/tokens": int(total[1]),
        "val/batches": int(total[2]),  # over all ranks
        "val/whole_split": int(total[3] == 0),  # every rank read its whole val share
    }
