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

from .base import Callback, Callbacks
from .checkpoints import CheckpointCommit, Checkpoints, FirstStep
from .evaluation import Eval
from .faults import Faults
from .metrics import TrainMetrics
from .profiling import Profiler
from .spikes import Rollback, Spikes
from .summary import EndSummary

__all__ = ["Callback", "Callbacks", "default_callbacks"]
ORDER = (
    Faults,
    Profiler,
    CheckpointCommit,
    Spikes,
    FirstStep,
    TrainMetrics,
    Rollback,
    Eval,
    Checkpoints,
    EndSummary,
)


def default_callbacks(trainer) -> Callbacks:
    """The callbacks of `trainer` (a train.trainer.Trainer), in ORDER."""
    return Callbacks([k(trainer) for k in ORDER])
