"""What runs around the training loop, as callbacks in one fixed order.

Every hook of every callback runs in the order of `priority`, highest first (as in OLMo-core's trainer):

    Faults          100  injected failures (tests): die or signal before a step, scale or NaN its loss
    Profiler         90  logging.profile_step: records one step, writes the files after it
    CheckpointCommit 80  commits the checkpoint every rank has written
    Spikes           70  accepts the loss into the statistics, or logs the spike event
    FirstStep        65  after the job's first step: pins checkpoint host buffers, writes config.yaml and
                         layout.txt (rank 0), calls fit's on_underway (.hydra/, train.log)
    TrainMetrics     60  train/, moe/, perf/, data/ metrics every logging.interval steps
    Rollback         50  policy rollback: restores the newest checkpoint (later callbacks skip the step)
    Eval             40  validation every trainer.eval_interval steps, and at the end
    Checkpoints      30  saves every checkpoint.interval steps, and at the end; waits for the last (a final
                         save that found no room is an error)
    EndSummary        0  rank 0: the run's one-screen summary

A callback reads and changes the trainer's state through `self.trainer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from ..step import StepEnd

if TYPE_CHECKING:
    from ..trainer import Trainer


class Callback:
    priority: ClassVar[int] = 0  # higher runs earlier, in every hook

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def pre_train(self) -> None:
        """Before the first step of this job."""

    def pre_step(self, step: int) -> None:
        """Before step `step` (counted from 1) starts."""

    def micro_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of a micro-batch of `step`, before it is back-propagated."""
        return loss

    def post_step(self, end: StepEnd) -> None:
        """After the update; `end` is the same on every rank, so collectives are safe here."""

    def post_train(self) -> None:
        """After the last step (max_steps reached or an agreed stop)."""


class Callbacks:
    """The callbacks in their order; each hook calls them all."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.all = sorted(callbacks, key=lambda c: -c.priority)

    def pre_train(self) -> None:
        for c in self.all:
            c.pre_train()

    def pre_step(self, step: int) -> None:
        for c in self.all:
            c.pre_step(step)

    def micro_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        for c in self.all:
            loss = c.micro_loss(step, loss)
        return loss

    def post_step(self, end: StepEnd) -> None:
        for c in self.all:
            c.post_step(end)

    def post_train(self) -> None:
        for c in self.all:
            c.post_train()


def default_callbacks(trainer: Trainer) -> Callbacks:
    from .checkpoints import CheckpointCommit, Checkpoints, FirstStep
    from .evaluation import Eval
    from .faults import Faults
    from .metrics import TrainMetrics
    from .profiling import Profiler
    from .spikes import Rollback, Spikes
    from .summary import EndSummary

    kinds = (Faults, Profiler, CheckpointCommit, Spikes, FirstStep, TrainMetrics, Rollback, Eval, Checkpoints)
    kinds += (EndSummary,)
    return Callbacks([k(trainer) for k in kinds])
