"""Stopping a job: a signal asks, every rank agrees; and no rank outlives its launcher.

SIGINT (Ctrl-C), SIGTERM and SIGUSR1 (Slurm, launchers) mean the same: stop and keep the work. `STOP` is
installed when the process starts (train/__main__.py), so a signal during start-up (model build, compile,
checkpoint load) is kept too. The handler only marks the request: a signal may reach one rank only, or
every rank at different moments, so the trainer puts `StopRequest.local()` into an all-reduce (before the
first step, then in every step's statistics) and stops when the reduced value (`agree`) says any rank
asked: all ranks stop at the same step, save the same checkpoint and exit 0.

A second SIGINT aborts at once (exit 130): the abort hooks run (the run lock is released), nothing more is
written; checkpoints are atomic, so `latest` stays on the newest complete one. A repeated SIGTERM does not
abort (Slurm signals every process of a step, and torchrun passes the signal on as well).

torchrun starts each rank in a session of its own, so `kill -9` of the launcher's process group leaves the
ranks running. `exit_with_launcher` watches the parent process from a daemon thread and ends this rank when
the parent is gone (its checkpoints are atomic: an unfinished save is ignored on resume).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("train.signals")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
ABORT_EXIT = 130  # 128 + SIGINT, as a shell reports an interrupted command


class StopRequest:
    def __init__(self) -> None:
        self.signalled = 0  # the first signal received by this process, 0: none
        self.interrupts = 0  # SIGINTs received
        self.stopping = False  # agreed by every rank
        self.abort_hooks: list[Callable[[], None]] = []

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signalled = self.signalled or signum
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                self.abort()

    def abort(self) -> None:
        """Exit now (a second Ctrl-C): release what must be released, write nothing else."""
        for hook in self.abort_hooks:
            try:
                hook()
            except Exception:  # noqa: BLE001, S110 - exiting anyway; the lock is then stale and taken over
                pass
        if os.environ.get("RANK", "0") == "0":
            print("interrupted twice: exiting without saving", file=sys.stderr, flush=True)
        os._exit(ABORT_EXIT)

    def name(self) -> str:
        return signal.Signals(self.signalled).name if self.signalled else "a signal on another rank"

    def local(self) -> float:
        """This rank's vote for the step's all-reduce (1.0: a signal arrived)."""
        return float(self.signalled != 0)

    def agree(self, reduced: float) -> bool:
        """The all-reduced sum of every rank's `local()`: the same on every rank, so is the decision."""
        self.stopping = self.stopping or reduced > 0
        return self.stopping


STOP = StopRequest()  # this process's request: installed at start-up, read by the trainer


def stop_agreed(stop: StopRequest, dist) -> bool:
    """Collective: whether a stop signal reached any rank (outside the steps, whose all-reduce carries it)."""
    import torch

    from .distributed import all_reduce_

    vote = torch.tensor([stop.local()], dtype=torch.float64, device=dist.device)
    return stop.agree(float(all_reduce_(vote)[0]))


def where_stopped(stop: StopRequest, step: int, started_at: int, latest: Path | None) -> str:
    """The line a stopped run ends with: the step, and what was saved."""
    from .checkpoint import tag_for

    by = f"stopped by {stop.name()}"
    if step == started_at:
        return f"{by} before training, at step {step}: nothing was written"
    if latest is not None and latest.name == tag_for(step):
        return f"{by} at step {step}: saved {latest}"
    return f"{by} at step {step}: not saved (the newest complete checkpoint is {latest})"


def exit_with_launcher(poll_s: float = 1.0) -> threading.Thread | None:
    """Under a launcher (torchrun, deepspeed: LOCAL_RANK is set), exit when the parent process dies."""
    if "LOCAL_RANK" not in os.environ or os.getppid() == 1:
        return None
    parent, stop = os.getppid(), threading.Event()

    def watch() -> None:
        while not stop.wait(poll_s):
            if os.getppid() != parent:
                log.error("the launcher (pid %d) is gone: rank %s exits", parent, os.environ.get("RANK", "?"))
                for hook in STOP.abort_hooks:  # the run lock
                    hook()
                os._exit(1)

    t = threading.Thread(target=watch, name="watch-launcher", daemon=True)
    t.start()
    return t
