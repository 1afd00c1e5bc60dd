"""GPU: our Triton selective scan (jamba/scan_op.py) vs mamba-ssm's CUDA scan, side by side in one run.

python benchmarks/gpu_scan.py [--out FILE.md] [--tilings default T=4 LD=64,num_warps=2 ...] [--reps 20]

1. Correctness: fp32 against selective_scan_ref (y and every gradient), bf16 against mamba-ssm at each shape,
   and two backward passes bitwise equal (ours; mamba-ssm's atomics make its own differ).
2. Speed: forward and forward+backward ms (CUDA events, median of --reps), peak memory of a forward+backward,
   at the issue's shapes (bf16 u, delta, z, B, C as the model passes them: B, C time-major views; fp32 A, D,
   delta_bias; delta_softplus and the z gate on). Each --tilings entry overrides ScanTiling fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jamba import scan_op  # noqa: E402
from jamba.scan import selective_scan_ref  # noqa: E402

SHAPES = [(4, 4096, 4096), (8, 2048, 2048), (1, 4096, 32768)]  # b x d_inner x L: bench, 426M, long


def inputs(b, d, L, n=16, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*s, scale=1.0, dt=dtype):
        return (torch.randn(*s, device="cuda", generator=g) * scale).to(dt)

    u, delta, z = r(b, d, L), r(b, d, L, scale=0.5), r(b, d, L)
    B, C = r(b, L, n).transpose(1, 2), r(b, L, n).transpose(1, 2)
    A = -torch.exp(torch.rand(d, n, device="cuda", generator=g) * 2)
    D, bias = r(d, dt=torch.float32), r(d, scale=0.1, dt=torch.float32) - 2.0
    leaves = [u, delta, A, B, C, D, z, bias]
    for t in leaves:
        t.requires_grad_()
    dy = r(b, d, L)
    return leaves, dy


def mamba_fn():
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return lambda u, dl, A, B, C, D, z, bias: selective_scan_fn(u, dl, A, B, C, D, z, bias, True)


def ours(u, dl, A, B, C, D, z, bias):
    return scan_op.selective_scan_triton(u, dl, A, B, C, D, z, bias, True)


def grads(fn, leaves, dy):
    y = fn(*leaves)
    return [y, *torch.autograd.grad(y, leaves, dy)]


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def timed(fn, reps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        ms.append(start.elapsed_time(end))
    return statistics.median(ms)


def measure(fn, leaves, dy, reps):
    with torch.no_grad():
        fwd = timed(lambda: fn(*leaves), reps)
    both = timed(lambda: torch.autograd.grad(fn(*leaves), leaves, dy), reps)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.autograd.grad(fn(*leaves), leaves, dy)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return fwd, both, peak


DEFAULT = scan_op.TILING["cuda"]


def parse_tiling(spec: str) -> scan_op.ScanTiling:
    """`default`, or comma-separated ScanTiling fields over the default (e.g. `T=2,K=256`)."""
    if spec == "default":
        return DEFAULT
    kw = {k: int(v) for k, v in (p.split("=") for p in spec.split(","))}
    return dataclasses.replace(DEFAULT, **kw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tilings", nargs="+", default=["default"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shapes", nargs="+", default=[f"{b}x{d}x{L}" for b, d, L in SHAPES])
    args = ap.parse_args()
    lines = [
        f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}",
        "",
    ]
    try:
        import mamba_ssm

        mamba = mamba_fn()
        lines[0] += f", mamba-ssm {mamba_ssm.__version__}"
    except ImportError:
        mamba = None
    import triton

    lines[0] += f", triton {triton.__version__}"

    # 1) fp32 correctness against the reference, every tiling
    leaves, dy = inputs(2, 80, 300, dtype=torch.float32)
    want = grads(lambda *a: selective_scan_ref(*a, delta_softplus=True), leaves, dy)
    lines += ["| tiling | fp32 vs selective_scan_ref: worst rel err (y, grads) |", "| --- | --- |"]
    for spec in args.tilings:
        scan_op.TILING["cuda"] = parse_tiling(spec)
        got = grads(ours, leaves, dy)
        lines.append(f"| {spec} | {max(rel(a, b) for a, b in zip(got, want, strict=True)):.2e} |")
    print("\n".join(lines), flush=True)

    # 2) speed at the model's shapes
    head = "| shape b x d x L | impl | fwd ms | fwd+bwd ms | speed-up fwd+bwd | peak MiB | rel err vs mamba-ssm | deterministic bwd |"
    rows = [head, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for shape in args.shapes:
        b, d, L = (int(x) for x in shape.split("x"))
        leaves, dy = inputs(b, d, L)
        base = None
        if mamba is not None:
            ref = grads(mamba, leaves, dy)
            again = grads(mamba, leaves, dy)
            det = all(torch.equal(x, y) for x, y in zip(ref, again, strict=True))
            f, fb, pk = measure(mamba, leaves, dy, args.reps)
            base = fb
            rows.append(f"| {shape} | mamba-ssm | {f:.3f} | {fb:.3f} | 1.00x | {pk:.0f} | | {det} |")
            del again
        for spec in args.tilings:
            scan_op.TILING["cuda"] = parse_tiling(spec)
            got = grads(ours, leaves, dy)
            again = grads(ours, leaves, dy)
            det = all(torch.equal(x, y) for x, y in zip(got, again, strict=True))
            err = f"{max(rel(x, y) for x, y in zip(got, ref, strict=True)):.1e}" if mamba is not None else ""
            del got, again
            f, fb, pk = measure(ours, leaves, dy, args.reps)
            sp = f"{base / fb:.2f}x" if base else ""
            rows.append(f"| {shape} | triton {spec} | {f:.3f} | {fb:.3f} | {sp} | {pk:.0f} | {err} | {det} |")
            print(rows[-1], flush=True)
        del leaves, dy
        torch.cuda.empty_cache()
    lines += ["", *rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
