"""Are two fresh GPU training runs bitwise identical? `trainer.deterministic=true` against the default.

    python benchmarks/gpu_determinism.py [--model bench-426m --steps 20 --out runs/determinism.md] [-- overrides]

Runs `python -m train` four times from scratch (the same seed and data): twice with trainer.deterministic=true,
twice without, then prints one row per pair: whether every logged train loss and gradient norm is bitwise
equal, the largest loss difference, the first step that differs, and the median step time after the warm-up
(the cost of determinism). Extra arguments after `--` are Hydra overrides for every run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from train.metrics import read_jsonl


def run(run_dir: Path, model: str, steps: int, det: bool, extra: list[str], timeout: int) -> list[dict]:
    args = [
        sys.executable, "-m", "train", f"model={model}", f"run_dir={run_dir}", "run_name=det",
        f"trainer.max_steps={steps}", f"trainer.deterministic={str(det).lower()}", "trainer.eval_interval=0",
        "trainer.eval_batches=1", "logging.interval=1", "logging.wandb.mode=disabled", "checkpoint.interval=0",
        "checkpoint.save_final=false", "resume=never", *extra,
    ]  # fmt: skip
    t = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        sys.exit(f"{run_dir.name} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    print(f"{run_dir.name}: {time.perf_counter() - t:.0f} s", flush=True)
    kernels = [ln for ln in (p.stdout + p.stderr).splitlines() if "kernels:" in ln]
    print("  " + (kernels[-1].split("] ")[-1] if kernels else "(no kernels line)"), flush=True)
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r and "event" not in r]


def compare(a: list[dict], b: list[dict]) -> tuple[bool, float, int | None]:
    keys = ("train/loss", "train/grad_norm")
    same = [all(x[k] == y[k] for k in keys) for x, y in zip(a, b, strict=True)]
    first = next((x["step"] for x, s in zip(a, same, strict=True) if not s), None)
    diff = max(abs(x["train/loss"] - y["train/loss"]) for x, y in zip(a, b, strict=True))
    return all(same), diff, first


def step_ms(recs: list[dict], warm: int = 5) -> float:
    return 1000 * statistics.median(r["perf/step_time_s"] for r in recs[warm:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench-426m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--root", default="runs/determinism")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per run")
    ap.add_argument("--out", default=None, help="also write the table here (Markdown)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    root = Path(a.root)
    recs = {}
    for det in (True, False):
        for k in ("a", "b"):
            name = f"{'det' if det else 'default'}-{k}"
            recs[name] = run(root / name, a.model, a.steps, det, a.overrides, a.timeout)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    lines = [
        f"`python benchmarks/gpu_determinism.py --model {a.model} --steps {a.steps} {' '.join(a.overrides)}`",
        f"({dev}, torch {torch.__version__}): two fresh runs each, losses and gradient norms of every step.",
        "",
        "| trainer.deterministic | bitwise equal | max loss diff | first step differing | median ms/step (a, b) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for det in ("det", "default"):
        x, y = recs[f"{det}-a"], recs[f"{det}-b"]
        same, diff, first = compare(x, y)
        ms = f"{step_ms(x):.1f}, {step_ms(y):.1f}"
        lines.append(f"| {det == 'det'} | {same} | {diff:.3g} | {first or '-'} | {ms} |")
    print("\n".join(lines))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
