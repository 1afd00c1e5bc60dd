"""A sweep's runs on this machine (launch/sweep.py plans them): `jobs` at a time, each with its own timeout,
console output to <run_dir>/console.log, and a SIGTERM to the sweep stopping its runs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .commands import local_command

TIMED_OUT = 124  # a run's result when --timeout stopped it (as timeout(1) exits)


@dataclass
class Variant:
    """One run of a sweep as launch.sweep planned it, and where a previous invocation left it."""

    name: str
    ratio: str
    moe: bool
    pattern: str
    overrides: list[str] = field(default_factory=list)  # the whole override list of the run
    run_dir: Path = Path()
    mixer: str = "mamba"  # the non-attention mixer of the hybrid (its jamba/layers.py name)
    status: str = "new"  # new | partial | done
    step: int = 0


def run_local(
    variants: list[Variant], nproc: int, show_output: bool, timeout: float | None, jobs: int = 1
) -> dict[str, int]:
    """Runs on this machine, `jobs` at a time (several small runs share one large GPU), each stopped at
    its own `timeout`; each run's console output goes to <run_dir>/console.log."""
    results: dict[str, int] = {}
    total = len(variants)
    pending = []
    for i, v in enumerate(variants, 1):
        if v.status == "done":
            print(f"[{i}/{total}] {v.name}: done at step {v.step}, skipped", flush=True)
        else:
            pending.append((i, v))
    running: list[tuple[int, Variant, subprocess.Popen, float]] = []

    def _on_term(signum, frame):  # timeout(1) or a scheduler stopping the sweep: stop its runs too
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        while pending or running:
            while pending and len(running) < max(1, jobs):
                i, v = pending.pop(0)
                what = f"resuming from step {v.step}" if v.status == "partial" else "starting"
                print(f"[{i}/{total}] {v.name} ({v.pattern}): {what}", flush=True)
                v.run_dir.mkdir(parents=True, exist_ok=True)
                with open(v.run_dir / "console.log", "a") as log:  # the child keeps its own descriptor
                    p = subprocess.Popen(
                        local_command(nproc, v.overrides),
                        stdout=None if show_output else log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                running.append((i, v, p, time.monotonic()))
            for entry in list(running):
                i, v, p, t0 = entry
                rc = p.poll()
                if rc is None and timeout is not None and time.monotonic() - t0 > timeout:
                    _terminate(p)  # train saves a checkpoint and stops: the next invocation resumes it
                    p.wait()
                    rc = TIMED_OUT
                if rc is None:
                    continue
                running.remove(entry)
                results[v.name] = rc
                status = (
                    "ok"
                    if rc == 0
                    else f"stopped at --timeout {timeout:g}s (the same command resumes it)"
                    if rc == TIMED_OUT
                    else f"FAILED (exit {rc}; see {v.run_dir / 'console.log'})"
                )
                print(f"[{i}/{total}] {v.name}: {status} in {time.monotonic() - t0:.0f}s", flush=True)
            if running:
                try:
                    running[0][2].wait(0.2)  # wakes at once when the oldest run ends
                except subprocess.TimeoutExpired:
                    pass
    except KeyboardInterrupt:
        for _, _, p, _ in running:
            _terminate(p)
        for _, _, p, _ in running:
            p.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return results


def _terminate(p: subprocess.Popen) -> None:
    """SIGTERM to the run's session: the launcher (torchrun) and every rank."""
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
