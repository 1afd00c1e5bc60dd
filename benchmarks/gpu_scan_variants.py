"""How to call mamba-ssm's selective scan: forward + backward time of one Mamba layer's scan, per variant.

python benchmarks/gpu_scan_variants.py [--batch 4 --seq 4096 --d-inner 4096 --d-state 16]

Variants: `z in kernel` (what jamba/mamba.py does: the SiLU(z) gate fused into the scan), `gate outside`
(the scan without z, the gate as a separate compiled elementwise op). (B and C must be in u's dtype: the
kernel rejects fp32 B/C with bf16 u.) Checks each variant's output and gradients against the first, then prints ms.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--d-inner", type=int, default=4096)
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    b, d, L, n = args.batch, args.d_inner, args.seq, args.d_state
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype).requires_grad_()

    u, delta, z = rnd(b, d, L), rnd(b, d, L, scale=0.5), rnd(b, d, L)
    B, C = rnd(b, n, L), rnd(b, n, L)
    A = (-torch.exp(torch.rand(d, n, device="cuda", generator=g))).requires_grad_()
    D, bias = rnd(d, dtype=torch.float32), rnd(d, dtype=torch.float32, scale=0.1)
    dy = torch.randn(b, d, L, device="cuda", generator=g).to(torch.bfloat16)
    gate = torch.compile(lambda y, z: y * F.silu(z))

    variants = {
        "z in kernel": lambda: selective_scan_fn(u, delta, A, B, C, D, z, bias, True),
        "gate outside": lambda: gate(selective_scan_fn(u, delta, A, B, C, D, None, bias, True), z),
    }
    leaves = [u, delta, z, B, C, A, D, bias]
    ref = None
    rows = []
    for name, fn in variants.items():
        y = fn()
        grads = torch.autograd.grad(y, leaves, dy)
        if ref is None:
            ref = (y.float(), [x.float() for x in grads])
        else:
            err = max(
                (y.float() - ref[0]).abs().max().item() / ref[0].abs().max().item(),
                *(
                    (a.float() - r).abs().max().item() / r.abs().max().clamp(min=1e-6).item()
                    for a, r in zip(grads, ref[1], strict=True)
                ),
            )
            assert err < 5e-2, f"{name}: max relative error {err:.2e} vs z in kernel"
        times = {}
        for what in ("fwd", "fwd+bwd"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(args.reps):
                y = fn()
                if what == "fwd+bwd":
                    torch.autograd.grad(y, leaves, dy)
            end.record()
            torch.cuda.synchronize()
            times[what] = start.elapsed_time(end) / args.reps
        rows.append((name, times["fwd"], times["fwd+bwd"]))
    print(f"selective scan, batch {b} x seq {L}, d_inner {d}, d_state {n}, {torch.cuda.get_device_name()}")
    print("| variant | fwd ms | fwd+bwd ms | vs z in kernel |\n| --- | --- | --- | --- |")
    for name, f, fb in rows:
        print(f"| {name} | {f:.2f} | {fb:.2f} | {rows[0][2] / fb:.2f}x |")


if __name__ == "__main__":
    main()
