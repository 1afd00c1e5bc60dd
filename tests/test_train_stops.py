"""Stops and failures as a user launches them (`python -m launch.torchrun`, what `make train`, `launch.run`
and the Slurm scripts run), on 2 ranks: a signal during start-up writes nothing and exits 0; Ctrl-C
mid-run saves every rank at one step and exits 0; a second Ctrl-C exits at once, `latest` intact; a
failed attempt on an existing run is one line, exit 2, and changes no file of the run. Every wait is on a
condition (a log line, a file) with a deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_data_common import make_prepared

from data.manifest import load_manifest
from train.checkpoint import find_latest, is_complete, read_state, tag_for
from train.metrics import read_jsonl
from train.testing import TINY

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parent.parent
LONG = [*TINY, "trainer.max_steps=100000", "trainer.eval_interval=0", "checkpoint.interval=0"]


class Job:
    """`python -m launch.torchrun --standalone --nproc_per_node 2 -m train ...`, its output in a file."""

    def __init__(self, tmp: Path, name: str, overrides: list[str]) -> None:
        self.log = tmp / f"{name}.log"
        cmd = [sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc_per_node=2", "-m", "train"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
        with open(self.log, "w") as out:
            self.p = subprocess.Popen(
                [*cmd, *overrides], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                start_new_session=True,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, what: str, cond, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert self.p.poll() is None, (
                f"exited {self.p.returncode} before {what}:\n{self.output()[-3000:]}"
            )
            assert time.monotonic() < deadline, f"no {what} in {timeout} s:\n{self.output()[-3000:]}"
            time.sleep(0.05)

    def finish(self, timeout: float = 120) -> int:
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            raise AssertionError(f"did not exit in {timeout} s:\n{self.output()[-3000:]}") from None

    def kill(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()


def steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in read_jsonl(path) if "train/loss" in r] if path.is_file() else []


def files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.timeout(150)
def test_sigterm_to_the_launcher_during_start_up_writes_nothing_and_exits_zero(tmp_path):
    run_dir = tmp_path / "run"
    job = Job(tmp_path, "start", [f"run_dir={run_dir}", "run_name=t", *LONG])
    try:
        job.wait_for("rank start-up", lambda: "rank 0/2 on cpu" in job.output())  # the model is not built yet
        job.p.send_signal(signal.SIGTERM)
        assert job.finish() == 0, job.output()[-3000:]
    finally:
        job.kill()
    out = job.output()
    assert "stopped by SIGTERM" in out and ("during start-up" in out or "before training" in out), out[-3000:]
    assert "Traceback" not in out and "step 1/" not in out
    assert not run_dir.exists()  # nothing written: not even the run folder


@pytest.mark.timeout(300)
def test_ctrl_c_mid_run_then_twice_then_a_failed_attempt(tmp_path):
    corpus = make_prepared(tmp_path, n_docs=96)
    run_dir = tmp_path / "run"
    args = [f"run_dir={run_dir}", "run_name=t", *LONG, f"data.path={corpus}", "data.verify_checksums=false"]
    # Ctrl-C mid-run: both ranks stop after the same step, save it, exit 0
    job = Job(tmp_path, "int", args)
    try:
        job.wait_for("2 steps", lambda: len(steps(run_dir)) >= 2)
        job.p.send_signal(signal.SIGINT)
        assert job.finish() == 0, job.output()[-3000:]
    finally:
        job.kill()
    stopped = max(steps(run_dir))
    ckpt = find_latest(run_dir / "checkpoints")
    assert ckpt.name == tag_for(stopped) and read_state(ckpt)["step"] == stopped
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    assert f"stopped by SIGINT at step {stopped}: saved {ckpt}" in job.output()
    assert "KeyboardInterrupt" not in job.output() and "Traceback" not in job.output()
    assert not (run_dir / ".lock").exists()
    # Ctrl-C twice on the resumed run: out at once, `latest` on a complete checkpoint (this one, or the stop's
    # own save if it was done before the second Ctrl-C came)
    job = Job(tmp_path, "twice", args)
    try:
        job.wait_for("a step after the resume", lambda: max(steps(run_dir)) > stopped)
        job.p.send_signal(signal.SIGINT)
        job.wait_for("the first Ctrl-C", lambda: "stop requested" in job.output())  # (signals coalesce)
        job.p.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        assert job.finish(timeout=30) in (0, 130), job.output()[-3000:]
        assert time.monotonic() - t0 < 15, "the second Ctrl-C did not exit at once"
    finally:
        job.kill()
    latest = find_latest(run_dir / "checkpoints")
    assert is_complete(latest) and read_state(latest)["step"] >= stopped
    ranks_gone = time.monotonic() + 10  # they follow their launcher within a second (train/signals.py)
    while (run_dir / ".lock").exists() and time.monotonic() < ranks_gone:
        time.sleep(0.05)
    assert not (run_dir / ".lock").exists()
    # a failed attempt (every training shard damaged, checksums off): one line, exit 2, no file changed
    before = files(run_dir)
    for shard in load_manifest(corpus).shards("train"):
        data = bytearray((Path(corpus) / shard.name).read_bytes())
        data[0] ^= 0xFF  # the tar's first member name: the shard no longer parses
        (Path(corpus) / shard.name).write_bytes(bytes(data))
    job = Job(tmp_path, "fail", args)
    try:
        assert job.finish() == 2, job.output()[-3000:]
    finally:
        job.kill()
    lines = job.output().strip().splitlines()
    assert lines[-1].startswith("DataError: ") and "train-" in lines[-1], lines[-5:]
    assert sum("DataError" in ln for ln in lines) == 1 and "Traceback" not in job.output(), lines[-20:]
    assert files(run_dir) == before  # .hydra, train.log, metrics, checkpoints: byte for byte


def test_a_second_ctrl_c_exits_at_once_after_the_abort_hooks():
    code = (
        "import os, signal, time\n"
        "from train.signals import STOP\n"
        "STOP.install().abort_hooks.append(lambda: print('lock released', flush=True))\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"  # a repeated SIGTERM (Slurm and torchrun both) is no abort
        "print('still here', STOP.signalled, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(30)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert p.returncode == 130 and p.stdout.split("\n")[:2] == ["still here 15", "lock released"], p
    assert p.stderr.strip() == "interrupted twice: exiting without saving"


@pytest.mark.timeout(60)
def test_a_bad_override_stops_the_launcher_before_any_rank(tmp_path):
    cmd = [sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc_per_node=2", "-m", "train"]
    p = subprocess.run([*cmd, f"run_dir={tmp_path}/r", "trainer.max_steps=-5"], cwd=ROOT, capture_output=True,
                       text=True, timeout=50)  # fmt: skip
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip() == "ConfigError: trainer.max_steps: must be >= 1, got -5"
    assert not (tmp_path / "r").exists()
