"""Checkpoints around the loop: the commit of a background write every rank has finished, the saves at
checkpoint.interval and at the end. Writing happens in the background (train/checkpoint.py)."""

from __future__ import annotations

from ..checkpoint_layout import CheckpointError
from ..show import write_run_files
from ..step import StepEnd
from .base import Callback


class CheckpointCommit(Callback):
    """Early in the step's end: the commit's figures are logged before the step's metrics."""

    priority = 80

    def post_step(self, end: StepEnd) -> None:
        t = self.trainer
        if (
            t.checkpointer.in_flight and int(end.stats.saved) == t.dist.world_size
        ):  # every rank's files are written
            t.metrics.log(t.step, t.checkpointer.commit(float(end.stats.saved_bytes)))


class FirstStep(Callback):
    """After this job's first step: the checkpoints' host buffers are pinned ahead (the optimizer's states
    exist now); the run is underway: rank 0 keeps what it trains beside its log (config.yaml, layout.txt)
    and the caller learns it (`Trainer.fit(on_underway)`: .hydra/ and train.log)."""

    priority = 65

    def pre_train(self) -> None:
        self.first = self.trainer.step + 1

    def post_step(self, end: StepEnd) -> None:
        t = self.trainer
        if end.step == self.first:
            t.prepare_saves()
            if t.dist.is_main:
                write_run_files(t.run_dir, t.config, t.model_cfg)
            if t.on_underway is not None:
                t.on_underway()


class Checkpoints(Callback):
    priority = 30

    def post_step(self, end: StepEnd) -> None:
        interval = self.trainer.cfg.checkpoint.interval
        if not end.rollback and interval and self.trainer.step % interval == 0:
            self.trainer.save()

    def post_train(self) -> None:
        t = self.trainer
        if t.cfg.checkpoint.save_final or t.stop.stopping:
            t.save()
        t.finish_save()
        if t.cfg.checkpoint.save_final and t.last_saved != t.step and not t.stop.stopping:
            raise CheckpointError(f"the final checkpoint was not saved: {t.checkpointer.no_room}")
