"""The report of benchmarks/multi_gpu.py: the machine and software it ran on, and the Markdown table."""

from __future__ import annotations

import math
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def environment(cpu: bool, n: int, child_env: dict[str, str]) -> dict:
    import importlib.metadata as md

    import torch

    env = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("deepspeed", "mamba-ssm", "causal-conv1d", "grouped_gemm", "transformers"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = "-"
    if not cpu and torch.cuda.is_available():
        env["gpu"] = f"{torch.cuda.get_device_name(0)} x {n} (of {torch.cuda.device_count()} visible)"
        env["cuda"] = torch.version.cuda
        try:
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:  # noqa: BLE001 - informative only
            env["nccl"] = f"? ({e})"
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.split()[0]
        except Exception:  # noqa: BLE001
            env["driver"] = "?"
    else:
        env["gpu"] = f"none: CPU mode, {n} gloo ranks"
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        env["commit"] = head + (" (+ local changes)" if dirty else "")
    except OSError:
        env["commit"] = "?"
    env["env"] = child_env
    return env


def _f(v, fmt: str = "{:.3g}") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def _k(v) -> str:
    return "-" if v is None else f"{v / 1e3:,.1f}k" if v >= 1e4 else f"{v:,.0f}"


def table(results: dict) -> str:
    env, n = results.get("environment", {}), results.get("gpus")
    gpu = "rank" if results.get("cpu") else "GPU"  # --cpu: gloo ranks stand in for GPUs
    lines = [
        f"# Multi-GPU check (issue 8): {n} {'CPU ranks' if results.get('cpu') else 'GPUs'}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}; " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "env"),
        "",
        "Child environment: " + " ".join(f"{k}={v}" for k, v in env.get("env", {}).items()),
        "",
        "| # | check | result | detail |",
        "| --- | --- | --- | --- |",
    ]
    row = lines.append
    eq = results.get("equivalence")
    if eq:
        if "cases" in eq:
            for c in eq["cases"].values():
                errs = ", ".join(f"{k} {v:.1e}" for k, v in c["max_rel_err"].items())
                what = f"EP={c['ep']} over {eq['world']} ranks vs unsharded model, fp32 ({eq['device'].split(':')[0]})"
                row(
                    f"| 1 | equivalence {what} | {'PASS' if c['pass'] else 'FAIL'} | max rel. err (tol {eq['tol']:.0e}): {errs} |"
                )
        else:
            row(f"| 1 | equivalence EP=1 vs EP={n} | {eq['status']} | {eq.get('detail', '')} |")
    tp = results.get("throughput")
    if tp:
        shape = f"{tp.get('micro_batch')}x{tp.get('seq_len')}/{gpu}, compile={tp.get('compile')}"
        for key, label in (
            ("single", f"1 {gpu}, EP=1"),
            ("multi", f"{tp['gpus']} {gpu}s, EP={tp['ep']}, ZeRO-2"),
        ):
            s = tp.get(key, {})
            if s.get("status") == "OK":
                detail = (
                    f"MFU {_f(s['mfu'] and 100 * s['mfu'], '{:.1f}')}%, step {_f(s['step_time_s'] * 1e3, '{:.0f}')} ms, "
                    f"peak mem {_f(s['peak_mem_gb'], '{:.1f}')} GB, total {_k(s['tokens_per_s'])} tokens/s, "
                    f"median of steps {s['steps_used'][0]}-{s['steps_used'][-1]}"
                )
                row(
                    f"| 2 | throughput {tp['model']} {shape}, {label} | {_k(s['tokens_per_s_per_gpu'])} tokens/s/{gpu} | {detail} |"
                )
            else:
                row(
                    f"| 2 | throughput {tp['model']} {shape}, {label} | {s.get('status')} | {s.get('detail', '')} |"
                )
        if len(tp.get("attempts", [])) > 1:
            tried = "; ".join(", ".join(f"{k} {v}" for k, v in t.items()) for t in tp["attempts"])
            row(
                f"| 2 | throughput attempts (out of memory: next micro-batch; other failure: compile=none) | - | {tried} |"
            )
        eff = tp.get("scaling_efficiency")
        verdict = "-" if eff is None else f"{100 * eff:.1f}%"
        row(
            f"| 2 | scaling efficiency (tokens/s/{gpu} on {tp['gpus']} / on 1; goal >= 90%) | {verdict} | "
            + ("" if eff is None else ("meets the goal" if eff >= 0.9 else "below the goal"))
            + " |"
        )
        p = tp.get("profile", {})
        if p.get("status") == "OK":
            detail = (
                f"{p['all_to_all_ms']:.1f} ms in {p['all_to_all_events']} all-to-all {p['source']} of a "
                f"{p['step_ms']:.1f} ms step (rank 0, step {p['step']}, profiled); all collectives "
                f"{100 * p['collectives_share']:.1f}%; trace {p['trace']}"
            )
            row(f"| 3 | all-to-all share of the step | {100 * p['all_to_all_share']:.2f}% | {detail} |")
        else:
            row(f"| 3 | all-to-all share of the step | {p.get('status', '-')} | {p.get('detail', '')} |")
    rs = results.get("resume")
    if rs:
        if "max_abs_diff" in rs:
            pairs = ", ".join(
                f"{a:.6f}/{b:.6f}" for a, b in zip(rs["loss_ref"], rs["loss_resumed"], strict=True)
            )
            detail = (
                f"{rs['model']}: save at step {rs['save_at']} on {rs['ranks'][0]} ranks (EP={rs['ep'][0]}), resume on "
                f"{rs['ranks'][1]} (EP={rs['ep'][1]}, grad accum 2); steps {rs['steps'][0]}-{rs['steps'][-1]} loss "
                f"uninterrupted/resumed {pairs}; max abs diff {rs['max_abs_diff']:.1e} (lm loss "
                f"{rs['max_abs_diff_lm']:.1e}, tol {rs['tol']:.0e}); optimizer states from the portable state: "
                f"{'yes' if rs['portable_state_used'] else 'no'}"
            )
        else:
            detail = rs.get("detail", "")
        row(f"| 4 | save on {n}, resume on {max(1, (n or 2) // 2)} | {rs['status']} | {detail} |")
    lines += ["", "## Commands", "", "| step | seconds | exit | command (log) |", "| --- | --- | --- | --- |"]
    for c in results.get("commands", []):
        ex = "timeout" if c["timed_out"] else str(c["rc"])
        lines.append(f"| {c['name']} | {c['seconds']:.0f} | {ex} | `{c['cmd']}` ({c['log']}) |")
    return "\n".join(lines) + "\n"
