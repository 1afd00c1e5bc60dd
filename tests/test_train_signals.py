"""SIGTERM / SIGUSR1 (Slurm's --signal, a launcher stopping the job) on one rank: the run finishes its step,
saves a checkpoint of it, exits 0, and a resume continues from there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import TINY
from train_runs import Run

from train.checkpoint_layout import find_latest, read_state, tag_for
from train.metrics import read_jsonl

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parent.parent
LONG = [
    *TINY,
    "trainer.max_steps=100000",
    "trainer.eval_interval=0",
    "checkpoint.interval=0",
    "checkpoint.save_final=false",  # the stop saves by itself
]


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in read_jsonl(path) if "train/loss" in r] if path.is_file() else []


def run_until_signal(run_dir: Path, sig: signal.Signals, after: int, timeout: float = 100) -> Run:
    """`python -m train` until it has logged `after` more steps, then send it `sig`; wait for it to exit."""
    before = len(_logged_steps(run_dir))
    log = run_dir.parent / f"{run_dir.name}-{sig.name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "-m", "train", f"run_dir={run_dir}", "run_name=test", *LONG]
    with open(log, "w") as out:
        p = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + timeout
            while len(_logged_steps(run_dir)) < before + after:  # poll: the handlers are installed by then
                assert p.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no step logged in time"
                time.sleep(0.05)
            p.send_signal(sig)
            p.wait(timeout=60)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return Run(p.returncode, log.read_text(), run_dir)


@pytest.mark.timeout(240)
def test_sigterm_and_sigusr1_save_and_exit_zero(tmp_path):
    run_dir = tmp_path / "run"
    first = run_until_signal(run_dir, signal.SIGTERM, after=2)
    assert first.returncode == 0, first.output[-3000:]
    ckpt = find_latest(run_dir / "checkpoints")
    stopped = max(_logged_steps(run_dir))
    assert ckpt is not None and ckpt.name == tag_for(stopped) and read_state(ckpt)["step"] == stopped
    assert 2 <= stopped < 100000
    # SIGUSR1 on the resumed run: it continues from the saved step, then saves and exits the same way
    second = run_until_signal(run_dir, signal.SIGUSR1, after=1)
    assert second.returncode == 0, second.output[-3000:]
    assert "resumed from" in second.output
    steps = _logged_steps(run_dir)
    again = max(steps)
    assert steps[: len(steps) - (again - stopped)] == list(range(1, stopped + 1))  # no step lost or repeated
    assert steps[-(again - stopped) :] == list(range(stopped + 1, again + 1))
    assert find_latest(run_dir / "checkpoints").name == tag_for(again) and again > stopped
