"""benchmarks/multi_gpu.py (issue 8's multi-GPU check) end to end on CPU/gloo, and `logging.profile_step`.

The script's GPU path differs only in its overrides (model=bench, NCCL, bf16); its NCCL kernel accounting is
checked on a synthetic trace here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _number(text: str) -> float:
    return float(text.replace(",", "").rstrip("k")) * (1e3 if text.endswith("k") else 1)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_multi_gpu_script_on_cpu(tmp_path):
    # Only what this script adds: its throughput runs, scaling efficiency and all-to-all share, and its table
    # and results. Its other steps repeat tests of their own: `equivalence` is tests/test_parallel_ep.py and
    # test_parallel_deepspeed.py, `resume` (N ranks -> N/2) is test_parallel_checkpoint.py's 2 -> 1 resume.
    out = tmp_path / "mg"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "multi_gpu.py"),
        "--cpu",
        "--gpus",
        "2",
        "--only",
        "throughput",
        "--steps",
        "3",
        "--out",
        str(out),
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    md = (out / "multi_gpu.md").read_text()
    assert md in p.stdout  # printed as well
    # 2: throughput rows with numbers, and the scaling efficiency
    for label in ("1 rank, EP=1", "2 ranks, EP=2, ZeRO-2"):
        m = re.search(
            rf"\| 2 \| throughput .*{re.escape(label)} \| ([\d.,]+k?) tokens/s/rank \| MFU ([\d.]+)%", md
        )
        assert m and _number(m.group(1)) > 0, (label, md)
    assert re.search(r"\| 2 \| scaling efficiency .*\| [\d.]+% \|", md), md
    # 3: the all-to-all share, from the profile of the 2-rank run's last step
    m = re.search(r"\| 3 \| all-to-all share of the step \| ([\d.]+)% \|", md)
    assert m and 0 < float(m.group(1)) < 100, md
    assert (out / "runs" / "throughput_2gpu" / "profile_step3.txt").is_file()
    res = json.loads((out / "results.json").read_text())
    tp = res["throughput"]
    assert tp["scaling_efficiency"] > 0 and tp["multi"]["steps_used"] == [2]  # warm-up and profiled left out
    assert {c["name"] for c in res["commands"]} == {"throughput_1gpu", "throughput_2gpu"}
    assert "equivalence" not in res and "resume" not in res
    assert "NCCL_NVLS_ENABLE=0" in md


@pytest.mark.timeout(200)
def test_profile_step_writes_a_table_and_a_trace(tmp_path):
    from tiny import TINY
    from train_runs import run_train

    from train.profiling import collective_share

    run = run_train(
        tmp_path / "run",
        [*TINY, "trainer.max_steps=2", "logging.profile_step=2", "checkpoint.save_final=false"],
        timeout=150,
    )
    assert run.returncode == 0, run.output[-4000:]
    txt, trace = tmp_path / "run" / "profile_step2.txt", tmp_path / "run" / "profile_step2.json"
    assert "train_step#2" in txt.read_text() and "self_cpu_time_total" in txt.read_text()
    assert not (tmp_path / "run" / "profile_step1.txt").exists()
    share = collective_share(trace)
    assert share["source"] == "cpu ranges" and share["step_ms"] > 0 and share["all_to_all_ms"] == 0
    assert sorted(run.losses()) == [1, 2]  # the profiled step is a normal step


def test_profile_step_is_validated():
    from train.config import ConfigError, LoggingConfig

    LoggingConfig(profile_step=0).validate()
    with pytest.raises(ConfigError, match="logging.profile_step"):
        LoggingConfig(profile_step=-1).validate()


def test_collective_share_counts_nccl_kernels_once():
    from train.profiling import collective_share

    def ev(name, ts, dur, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    trace = {
        "traceEvents": [
            ev("train_step#7", 0, 1000, "user_annotation"),
            ev("train_step#7", 5, 990, "gpu_user_annotation"),
            ev("ampere_sgemm_128x64", 10, 300),
            ev("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", 100, 100),  # overlaps the GEMM
            ev("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", 150, 100),  # and the one before
            ev("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 600, 50),
            ev("nccl:all_to_all", 90, 5, "user_annotation"),  # CPU side: not counted on a GPU trace
        ]
    }
    s = collective_share(trace)
    assert s["source"] == "cuda kernels" and s["step_ms"] == 1.0
    assert s["all_to_all_ms"] == pytest.approx(0.15) and s["all_to_all_share"] == pytest.approx(0.15)
    assert s["collectives_ms"] == pytest.approx(0.2) and s["busy_ms"] == pytest.approx(0.35)
