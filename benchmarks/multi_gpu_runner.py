"""Child processes of benchmarks/multi_gpu.py: the environment every child gets (NVLink multicast off, always),
launches with a timeout that kills the whole process group, a log per run, and why a run failed."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORCED_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DEFAULT_ENV = {"TORCH_CUDA_ARCH_LIST": "9.0", "HYDRA_FULL_ERROR": "1", "WANDB_SILENT": "true"}
OOM_MARKERS = ("out of memory", "outofmemoryerror")


class Runner:
    """Launch children with a timeout (process group killed on expiry), log every command and its output."""

    def __init__(self, out: Path, cpu: bool) -> None:
        self.out, self.cpu = out, cpu
        self.env = {**os.environ, **child_env()}
        if cpu:
            self.env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.commands: list[dict] = []

    def run(self, name: str, cmd: list[str], timeout: float) -> dict:
        log = self.out / "logs" / f"{name}.log"
        t0 = time.monotonic()
        print(f"[multi_gpu] {name}: {shlex.join(cmd)}", flush=True)
        with open(log, "w") as f:
            p = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT, start_new_session=True
            )
            try:
                rc, timed_out = p.wait(timeout=timeout), False
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # the launcher and every rank: one session
                rc, timed_out = p.wait(), True
        secs = time.monotonic() - t0
        text = log.read_text(errors="replace")
        rec = {
            "name": name,
            "cmd": shlex.join(cmd),
            "rc": rc,
            "timed_out": timed_out,
            "seconds": round(secs, 1),
            "log": str(log.relative_to(self.out)),
        }
        self.commands.append(rec)
        status = "TIMEOUT" if timed_out else f"rc={rc}"
        print(f"[multi_gpu] {name}: {status} in {secs:.0f} s (log: {log})", flush=True)
        if rc != 0:
            print(text[-3000:], flush=True)
        return {
            **rec,
            "ok": rc == 0 and not timed_out,
            "oom": any(m in text.lower() for m in OOM_MARKERS),
            "text": text,
        }


def child_env() -> dict[str, str]:
    """The variables every child gets: the forced ones as they are, the defaults unless already set."""
    return {
        k: os.environ.get(k, v) if k not in FORCED_ENV else v
        for k, v in {**FORCED_ENV, **DEFAULT_ENV}.items()
    }


def fail_reason(res: dict) -> str:
    """One line for the table: why a child run failed."""
    if res.get("timed_out"):
        return f"timeout after {res['seconds']:.0f} s"
    if res.get("oom"):
        return "out of memory"
    lines = [ln for ln in res.get("text", "").splitlines() if "Error" in ln or "error" in ln]
    return f"rc={res.get('rc')}" + (f": {lines[-1].strip()[:160]}" if lines else "")
