"""`logging.profile_step=N`: rank 0 records optimizer step N (forward, backward, optimizer step) with
torch.profiler and writes `<run_dir>/profile_step<N>.txt` (operator table, sorted by device time on a GPU,
CPU time on CPU) and `<run_dir>/profile_step<N>.json` (a chrome trace: chrome://tracing or Perfetto).

`collective_share(trace)` reads such a trace back: the part of the step spent in all-to-all (the expert-
parallel token exchange) and in any collective. On a GPU it counts NCCL kernels (all_to_all_single runs as
grouped send/recv: `ncclDevKernel_SendRecv`); on CPU (gloo) the collectives' own ranges. The step is the
`train_step#N` range this module puts around it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger("train.profiling")

STEP_RANGE = "train_step#"
ALL_TO_ALL = re.compile(r"sendrecv|alltoall|all_to_all", re.IGNORECASE)
COLLECTIVE = re.compile(
    r"nccl|gloo:|c10d::|sendrecv|alltoall|all_to_all|allreduce|all_reduce|allgather|all_gather|reducescatter|"
    r"reduce_scatter|broadcast",
    re.IGNORECASE,
)


def profile_paths(run_dir: Path, step: int) -> tuple[Path, Path]:
    return Path(run_dir) / f"profile_step{step}.txt", Path(run_dir) / f"profile_step{step}.json"


@contextlib.contextmanager
def profile_step(
    want: int, step: int, is_main: bool, device: torch.device, run_dir: Path, rows: int = 60
) -> Iterator[None]:
    """Profile the enclosed code when `step == want` (want > 0) on the main rank; else do nothing."""
    if not (want and step == want and is_main):
        yield
        return
    from torch.profiler import ProfilerActivity, profile, record_function

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        with record_function(f"{STEP_RANGE}{step}"):
            yield
            if on_gpu:
                torch.cuda.synchronize(device)  # the step's last kernels inside the range
    txt, trace = profile_paths(run_dir, step)
    txt.parent.mkdir(parents=True, exist_ok=True)
    sort = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=80)
    prof.export_chrome_trace(str(trace))
    summary = collective_share(trace)
    txt.write_text(f"step {step} on {device}, sorted by {sort}\n{table}\n{json.dumps(summary, indent=1)}\n")
    log.info(
        "profiled step %d: %s, %s (all-to-all %.1f%% of the step)",
        step,
        txt,
        trace,
        100 * summary["all_to_all_share"],
    )


def _union_us(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (overlapping kernels or nested ranges count once)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(spans):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def collective_share(trace: Path | str | dict) -> dict:
    """Step time and time in all-to-all / any collective, in ms, from a chrome trace of `profile_step`.

    Shares are of the step's wall time (the `train_step#N` range). GPU: kernel intervals (an NCCL kernel's
    time includes waiting for the peers, which the step waits for too); CPU: the collectives' ranges."""
    data = trace if isinstance(trace, dict) else json.loads(Path(trace).read_text())
    events = [e for e in data.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    step = [
        e
        for e in events
        if str(e.get("name", "")).startswith(STEP_RANGE) and e.get("cat") != "gpu_user_annotation"
    ]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    if kernels:
        source = "cuda kernels"
        pool = kernels
    else:
        source = "cpu ranges"
        pool = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and e not in step]

    def spans(rx: re.Pattern | None) -> list[tuple[float, float]]:
        return [
            (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
            for e in pool
            if rx is None or rx.search(str(e.get("name", "")))
        ]

    step_us = max((float(e["dur"]) for e in step), default=0.0)
    a2a_us, coll_us = _union_us(spans(ALL_TO_ALL)), _union_us(spans(COLLECTIVE))
    busy_us = _union_us(spans(None)) if kernels else step_us
    n_a2a = len(spans(ALL_TO_ALL))
    return {
        "source": source,
        "step_ms": step_us / 1e3,
        "busy_ms": busy_us / 1e3,  # GPU: the union of all kernels
        "all_to_all_ms": a2a_us / 1e3,
        "all_to_all_events": n_a2a,
        "collectives_ms": coll_us / 1e3,
        "all_to_all_share": a2a_us / step_us if step_us else float("nan"),
        "collectives_share": coll_us / step_us if step_us else float("nan"),
    }
