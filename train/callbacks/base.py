"""The callback base class and the runner that calls every hook of every callback in priority order."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..step import StepEnd


class Callback:
    priority: ClassVar[int] = 0  # higher runs earlier, in every hook

    def __init__(self, trainer: Any) -> None:  # the Trainer (not imported: train/trainer.py imports us)
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
