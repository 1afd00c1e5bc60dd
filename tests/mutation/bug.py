"""The shape of a planted bug and the test paths the bug lists name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bug:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


RUN = "tests/test_train_run.py::"
SPIKES = "tests/test_train_spikes.py::"
CKPT = "tests/test_parallel_checkpoint.py::"
KILLED = RUN + "test_killed_save_keeps_latest_and_resume_is_exact"
SCAN = "tests/test_jamba_scan_triton.py::"
EVAL = "tests/test_train_eval_values.py::"
SCHED = "tests/test_train_schedules.py::"
STOPS = "tests/test_train_stops.py::"
DISK = "tests/test_train_disk.py::"
