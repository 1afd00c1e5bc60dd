"""The one-screen summary at the end of the run, on rank 0 (train/summary.py writes it)."""

from __future__ import annotations

import time

from ..summary import end_summary
from .base import Callback


class EndSummary(Callback):
    priority = 0  # last: after the final eval and checkpoint

    def pre_train(self) -> None:
        self.started, self.first = time.perf_counter(), self.trainer.step + 1

    def post_train(self) -> None:
        if self.trainer.dist.is_main:
            end_summary(self.trainer, time.perf_counter() - self.started, self.first - 1)
