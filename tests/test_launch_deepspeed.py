"""A real 2-process CPU training run started by `python -m launch.run --launcher deepspeed` from a hostfile:
hostfile -> deepspeed runner -> deepspeed.launcher.launch -> launch/entry.py -> train, on localhost."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import TINY

from train.metrics import read_jsonl

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_deepspeed_launcher_trains_two_processes(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "launch.run",
        "--hostfile",
        str(hostfile),
        "--launcher",
        "deepspeed",
        "--master-port",
        str(_free_port()),
        "--launch-dir",
        str(tmp_path / "launch"),
        "--timeout",
        "240",
        "--env",
        "JAMBA_LAUNCH_TEST=1",
        "--",
        f"run_dir={run_dir}",
        "run_name=ds",
        *TINY,
        "trainer.max_steps=3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "NCCL_DEBUG": "WARN"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "spawned with command" in out and "launch/entry.py" in out  # through deepspeed's launcher
    steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[-1]["train/tokens"] == 3 * 2 * 2 * 32  # steps x ranks x micro-batch x seq_len
    state = json.loads((run_dir / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    exported = (tmp_path / "launch" / "ds_env").read_text()  # what remote nodes would get
    assert "JAMBA_LAUNCH_TEST=1\n" in exported and "NCCL_DEBUG=WARN\n" in exported
    assert "NCCL_NVLS_ENABLE=0\n" in exported and "MASTER_ADDR=127.0.0.1\n" in exported
