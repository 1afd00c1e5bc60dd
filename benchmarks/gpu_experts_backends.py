"""Experts backends on the GPU: each against the loop reference (bf16), then forward+backward timings on the
`bench` MoE shapes (hidden 2048, ffn 4096, 8 experts, top-2, 4 x 4096 tokens = 32768 routed rows).

    python benchmarks/gpu_experts_backends.py [--tokens 16384] [--out results.md]

Prints a markdown table: backend, max error vs loop (forward, input grad, weight grads, relative to the
reference's max), forward+backward time (median of 20), TFLOP/s, ratio to grouped_mm.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from jamba.experts import Experts, experts_backend_problem  # noqa: E402


def routed(tokens: int, E: int, k: int, skew: float, gen) -> torch.Tensor:
    """Counts per expert for tokens*k rows: balanced (skew 0) or with expert 0 getting `skew` of them."""
    rows = tokens * k
    w = torch.ones(E)
    if skew:
        w[0] = skew * (E - 1) / (1 - skew)
    idx = torch.multinomial(w / w.sum(), rows, replacement=True, generator=gen)
    return torch.bincount(idx, minlength=E)


def make(backend: str, E: int, H: int, Fd: int, src: Experts | None = None) -> Experts:
    m = Experts(E, H, Fd).cuda()
    if src is None:
        torch.nn.init.normal_(m.gate_up_proj, std=0.02)
        torch.nn.init.normal_(m.down_proj, std=0.02)
    else:
        m.load_state_dict(src.state_dict())
    m.backend = backend
    return m.to(torch.bfloat16)


def fwd_bwd(m: Experts, x: torch.Tensor, counts: torch.Tensor, dy: torch.Tensor):
    x = x.detach().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    y = m(x, counts)
    y.backward(dy)
    return y, x.grad, m.gate_up_proj.grad, m.down_proj.grad


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    E, H, Fd = a.experts, a.hidden, a.ffn
    gen = torch.Generator().manual_seed(0)
    lines = [
        f"# experts backends on {torch.cuda.get_device_name()} (torch {torch.__version__}), bf16",
        f"shapes: {E} experts, hidden {H}, ffn {Fd}, {a.tokens} tokens x top-{a.topk}; "
        f"fwd+bwd median of {a.iters}",
        "",
        "| backend | routing | max rel. err vs loop (y, dx, dW1, dW2) | fwd+bwd ms | TFLOP/s | vs grouped_mm |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    backends = ["loop", "grouped_mm", "grouped_gemm", "megablocks"]
    ok = {}
    for b in backends:
        p = experts_backend_problem(b, "cuda", torch.bfloat16, H, Fd)
        ok[b] = p is None
        if p:
            lines.append(f"| {b} | - | unavailable: {p} | - | - | - |")
    ref_m = make("loop", E, H, Fd)
    for routing, skew in (("balanced", 0.0), ("skewed 50% to one", 0.5)):
        counts = routed(a.tokens, E, a.topk, skew, gen).cuda()
        rows = int(counts.sum())
        x = torch.randn(rows, H, device="cuda", dtype=torch.bfloat16, generator=None)
        dy = torch.randn(rows, H, device="cuda", dtype=torch.bfloat16)
        ref = fwd_bwd(ref_m, x, counts, dy)
        flops = 3 * 2 * rows * H * (3 * Fd)  # fwd 2*rows*H*3F, bwd twice that
        times = {}
        for b in backends:
            if not ok[b]:
                continue
            m = make(b, E, H, Fd, ref_m)
            try:
                got = fwd_bwd(m, x, counts, dy)
                errs = [rel_err(g, r) for g, r in zip(got, ref, strict=True)]
                for _ in range(3):
                    fwd_bwd(m, x, counts, dy)
                torch.cuda.synchronize()
                ts = []
                for _ in range(a.iters):
                    t0 = time.perf_counter()
                    fwd_bwd(m, x, counts, dy)
                    torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t0)
                times[b] = statistics.median(ts)
                err = ", ".join(f"{e:.1e}" for e in errs)
                lines.append(
                    f"| {b} | {routing} | {err} | {times[b] * 1e3:.2f} | {flops / times[b] / 1e12:.0f} | RATIO_{b} |"
                )
            except Exception as e:  # noqa: BLE001 - record where a backend stops
                msg = " ".join(str(e).split())[:300]
                lines.append(f"| {b} | {routing} | failed: {type(e).__name__}: {msg} | - | - | - |")
            del m
        base = times.get("grouped_mm")
        for b, t in times.items():
            lines = [ln.replace(f"RATIO_{b} |", f"{base / t:.2f}x |" if base else "- |") for ln in lines]
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
