"""`logging.profile_step=N`: rank 0 records step N with torch.profiler (train/profiling.py writes the files)."""

from __future__ import annotations

import contextlib

from ..profiling import profile_step
from ..step import StepEnd
from .base import Callback


class Profiler(Callback):
    priority = 90

    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        self.active: contextlib.ExitStack | None = None

    def pre_step(self, step: int) -> None:
        t = self.trainer
        self.active = contextlib.ExitStack()
        want = t.cfg.logging.profile_step
        self.active.enter_context(profile_step(want, step, t.dist.is_main, t.dist.device, t.run_dir))

    def post_step(self, end: StepEnd) -> None:
        if self.active is not None:  # writing the files is outside the step's time
            self.active, active = None, self.active
            active.close()
