"""`faults.*`: failures injected on purpose, for the tests of resume, stop and spike handling."""

from __future__ import annotations

import logging
import os
import signal

import torch

from ..step import StepEnd
from .base import Callback

log = logging.getLogger("train")


class Faults(Callback):
    priority = 100

    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        self.cfg = trainer.cfg.faults
        self.faulted_steps: set[int] = set()  # injected loss faults fire on a step's first attempt only

    def pre_step(self, step: int) -> None:
        t, f = self.trainer, self.cfg
        if f.die_at_step == step:
            # a crash after the newest checkpoint was committed (every rank waits for it: deterministic for
            # tests; a kill during the background write is faults.kill_during_save_phase)
            t.finish_save()
        if f.die_at_step == step and t.dist.rank == f.die_rank:
            log.error("faults.die_at_step=%d: rank %d exits abruptly", step, t.dist.rank)
            os._exit(17)
        if f.signal_at_step == step and t.dist.rank == f.signal_rank:
            os.kill(os.getpid(), signal.SIGTERM)  # this rank only: the stop must still be agreed

    def micro_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Not after a rollback: the step's second attempt runs clean."""
        if step not in self.faulted_steps:
            if step in self.cfg.loss_spike_steps:
                loss = loss * self.cfg.loss_spike_scale
            if step in self.cfg.nan_loss_steps:
                loss = loss * float("nan")
        return loss

    def post_step(self, end: StepEnd) -> None:
        self.faulted_steps.add(end.step)
