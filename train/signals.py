"""Stopping a job: a signal asks, every rank agrees; and no rank outlives its launcher.

A signal (SIGTERM, SIGUSR1: Slurm, launchers) may reach one rank only, or every rank at different moments.
The handler only marks the request; the trainer puts `StopRequest.local()` into the step's statistics
all-reduce and stops after the step when the reduced value (`agree`) says any rank asked, so all ranks
stop at the same step, save the same checkpoint and exit.

torchrun starts each rank in a session of its own, so `kill -9` of the launcher's process group leaves the
ranks running. `exit_with_launcher` watches the parent process from a daemon thread and ends this rank when
the parent is gone (its checkpoints are atomic: an unfinished save is ignored on resume).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("train.signals")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signalled = 0  # the last signal received by this process, 0: none
        self.stopping = False  # agreed by every rank

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signalled = signum

    def local(self) -> float:
        """This rank's vote for the step's all-reduce (1.0: a signal arrived)."""
        return float(self.signalled != 0)

    def agree(self, reduced: float) -> bool:
        """The all-reduced sum of every rank's `local()`: the same on every rank, so is the decision."""
        self.stopping = self.stopping or reduced > 0
        return self.stopping


def exit_with_launcher(poll_s: float = 1.0) -> threading.Thread | None:
    """Under a launcher (torchrun, deepspeed: LOCAL_RANK is set), exit when the parent process dies."""
    if "LOCAL_RANK" not in os.environ or os.getppid() == 1:
        return None
    parent, stop = os.getppid(), threading.Event()

    def watch() -> None:
        while not stop.wait(poll_s):
            if os.getppid() != parent:
                log.error("the launcher (pid %d) is gone: rank %s exits", parent, os.environ.get("RANK", "?"))
                os._exit(1)

    t = threading.Thread(target=watch, name="watch-launcher", daemon=True)
    t.start()
    return t
