"""Launch `python -m train` from tests as real processes (launch.commands builds the command), read what a run
left behind.

Every launch is a subprocess with a timeout (a hung collective fails the test instead of the CI job) and
one thread per rank (on a shared CPU, more threads per process only contend).
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from launch.commands import local_command
from train.metrics import read_jsonl, read_wandb_file, read_wandb_table

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    returncode: int
    output: str
    run_dir: Path

    def metrics(self) -> list[dict]:
        return read_jsonl(self.run_dir / "metrics.jsonl")

    def losses(self) -> dict[int, float]:
        """Step -> train loss; a step logged twice (resume, rollback) keeps its last record."""
        return {r["step"]: r["train/loss"] for r in self.metrics() if "train/loss" in r and "event" not in r}

    def events(self, name: str) -> list[dict]:
        return [r for r in self.metrics() if r.get("event") == name]


def run_train(
    run_dir: Path, overrides: list[str], nproc: int = 1, timeout: float = 120, env: dict | None = None
) -> Run:
    """`python -m train` (nproc == 1) or `torchrun --standalone --nproc_per_node nproc -m train`."""
    args = [f"run_dir={run_dir}", "run_name=test", *overrides]
    cmd = local_command(nproc, args)
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "1",
        "WANDB_SILENT": "true",
        **(env or {}),
    }
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and every rank: they share the new session
        out, _ = p.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}") from None
    return Run(p.returncode, out, Path(run_dir))


def _wandb_file(run_dir: Path) -> Path:
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no offline W&B run under {run_dir}/wandb")
    return files[-1]


def read_wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of the newest offline W&B run under run_dir."""
    return read_wandb_file(_wandb_file(run_dir))


def read_wandb_events(run_dir: Path, key: str = "spikes/events") -> list[dict]:
    """The rows of the event table `key` of the newest offline W&B run under run_dir."""
    return read_wandb_table(_wandb_file(run_dir), key)
