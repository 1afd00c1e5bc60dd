"""The run directory: one job at a time (train/rundir.py's lock), nothing written by a job that fails to
start, run names that cannot leave runs/, config errors printed once."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import TINY
from train_runs import run_train

from train import rundir
from train.rundir import LOCK_FILE, RunLock, RunLockError

REPO = Path(__file__).resolve().parent.parent


def test_a_live_lock_refuses_a_second_holder_and_is_released(tmp_path):
    first = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(RunLockError, match=f"in use by pid {os.getpid()} on {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    finally:
        first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    RunLock(tmp_path).acquire().release()


def test_stale_locks_are_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "start": "1"}))
    mine = RunLock(tmp_path).acquire()  # the same host, its pid gone
    assert mine.held() and f"pid {dead.pid} is not running" in caplog.text
    mine.release()
    # Another host: alive while its heartbeat is fresh, stale once it is older than STALE_S.
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "start": "1", "since": "then"}))
    with pytest.raises(RunLockError, match="pid 1 on elsewhere"):
        RunLock(tmp_path).acquire()
    old = time.time() - rundir.STALE_S - 5
    os.utime(lock, (old, old))
    mine = RunLock(tmp_path).acquire()
    assert mine.held() and "no heartbeat for" in caplog.text
    mine.release()


@pytest.mark.timeout(60)
def test_a_second_job_on_a_live_run_fails_at_once_and_touches_nothing(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("the run's own config\n")
    (tmp_path / "train.log").write_text("the run's own log\n")
    before = sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    holder = RunLock(tmp_path).acquire()
    try:
        t0 = time.monotonic()
        second = run_train(tmp_path, [*TINY, "trainer.max_steps=1"], timeout=50)
        took = time.monotonic() - t0
    finally:
        holder.release()
    assert second.returncode == 2, second.output[-3000:]
    assert f"in use by pid {os.getpid()} on {socket.gethostname()}" in second.output
    assert took < 30  # before the process group, the data and the model
    assert sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


@pytest.mark.timeout(60)
def test_run_names_cannot_leave_runs(tmp_path):
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    for name in ("../../x", "..", "."):
        p = subprocess.run(
            [sys.executable, "-m", "train", f"run_name={name}", "trainer.max_steps=1"],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=50,
        )
        assert p.returncode == 2 and p.stderr.strip().startswith("ConfigError: run_name: "), p.stderr[-2000:]
        assert "Traceback" not in p.stderr + p.stdout
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")] == ["a", "a/b"]  # nothing written


@pytest.mark.distributed
@pytest.mark.timeout(90)
def test_config_errors_are_one_line_printed_once(tmp_path):
    run = run_train(
        tmp_path, [*TINY, "parallel.expert_parallel_size=2", "model.num_experts=3"], nproc=2, timeout=80
    )
    assert run.returncode != 0
    lines = [ln for ln in run.output.splitlines() if "ConfigError" in ln]
    assert lines == [
        "ConfigError: parallel.expert_parallel_size: 2 does not divide model.num_experts=3 (each rank holds "
        "num_experts / expert_parallel_size experts of every MoE layer)"
    ], run.output[-3000:]
    assert "train/__main__.py" not in run.output  # no traceback of ours
    assert not any(tmp_path.iterdir())
    plus = run_train(tmp_path, [*TINY, "+optim.lrr=1e-3"], timeout=50)
    assert plus.returncode == 2 and "ConfigError: optim.lrr: not a setting" in plus.output
