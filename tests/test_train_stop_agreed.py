"""Stopping: a signal that reaches one rank stops every rank at the same step; no rank outlives its launcher."""

import os
import random
import signal
import threading
import time

import psutil
import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from tiny import TINY
from train_runs import run_train

from train import distributed as D
from train.checkpoint_layout import find_latest, read_state, tag_for
from train.signals import StopRequest

pytestmark = pytest.mark.distributed
TRIALS = 40


def _stop_at_the_same_step(trials: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    rng = random.Random(1234)  # the same plan on every rank: which rank is signalled, when
    jitter = random.Random(rank)  # ranks reach each all-reduce at different moments
    work = torch.randn(48, 48)
    for trial in range(trials):
        target, delay = rng.randrange(world), rng.uniform(0.0, 0.02)
        stop = StopRequest()
        stop.install()
        timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGUSR1)) if rank == target else None
        if timer:
            timer.start()
        step, deadline = 0, time.monotonic() + 5
        while not stop.stopping:  # the trainer's step: local work, then the statistics all-reduce
            step += 1
            for _ in range(jitter.randrange(1, 4)):
                work = torch.tanh(work @ work)
            acc = torch.tensor([1.0, stop.local()], dtype=torch.float64)
            D.all_reduce_(acc)
            stop.agree(float(acc[1]))
            assert time.monotonic() < deadline, f"trial {trial}: no stop"
        if timer:
            timer.join()
        steps = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(steps, torch.tensor([step]))
        assert len({int(s) for s in steps}) == 1, f"trial {trial}: ranks stopped at {steps}"
        dist.barrier()  # the next trial's signal must not land in this one
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.timeout(60)
def test_a_signal_to_one_rank_at_random_moments_stops_all_at_one_step():
    run_distributed(_stop_at_the_same_step, 2, TRIALS, timeout=50)


@pytest.mark.timeout(150)
def test_sigterm_to_one_rank_saves_one_checkpoint_and_exits_zero(tmp_path):
    args = [*TINY, "trainer.max_steps=50", "checkpoint.interval=0", "faults.signal_at_step=3"]
    run = run_train(tmp_path, [*args, "faults.signal_rank=1"], nproc=2, timeout=140)
    assert run.returncode == 0, run.output[-4000:]
    assert max(run.losses()) == 3 and "stop requested" in run.output
    ckpt = find_latest(tmp_path / "checkpoints")
    assert ckpt.name == tag_for(3) and read_state(ckpt)["step"] == 3


def _ranks_of(run_dir) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if f"run_dir={run_dir}" in cmd and "torch.distributed.run" not in cmd:
            out.append(p)
    return out


@pytest.mark.timeout(150)
def test_ranks_exit_when_the_launcher_is_killed(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train"]
    cmd += [
        f"run_dir={tmp_path}",
        "run_name=test",
        *TINY,
        "trainer.max_steps=100000",
        "checkpoint.interval=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    launcher = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "metrics.jsonl").is_file() or not (tmp_path / "metrics.jsonl").read_text():
            assert launcher.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        ranks = _ranks_of(tmp_path)
        assert len(ranks) == 2
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher's group; the ranks have sessions of their own
        launcher.wait()
        gone, alive = psutil.wait_procs(ranks, timeout=15)
        assert not alive, f"ranks {[p.pid for p in alive]} still run without their launcher"
    finally:
        for p in _ranks_of(tmp_path):
            p.kill()
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
