"""GPU check of every fast path against its pure-PyTorch reference, then a first timing of the model.

    python benchmarks/gpu_kernels.py [--out results.md]

Prints (and writes) a table: kernel, shape, max relative error (forward and gradients), and timings.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from jamba import JambaForCausalLM, get_preset
from jamba.experts import experts_grouped, experts_ref
from jamba.runtime import Runtime
from jamba.scan import (
    causal_conv1d,
    causal_conv1d_ref,
    kernels_available,
    selective_scan,
    selective_scan_chunked,
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def scan_check(rows):
    g = torch.Generator(device="cuda").manual_seed(0)
    b, d, L, n = 2, 256, 2048, 16
    r = lambda *s: torch.randn(*s, device="cuda", generator=g).requires_grad_()  # noqa: E731
    A = (-torch.rand(d, n, device="cuda", generator=g) * 8).requires_grad_()
    ins = (r(b, d, L), r(b, d, L), A, r(b, n, L), r(b, n, L), r(d), r(b, d, L), r(d))
    y = selective_scan(*ins, use_kernel=True)
    y_ref = selective_scan_chunked(*ins, delta_softplus=True)
    gy = torch.randn_like(y)
    gk = torch.autograd.grad(y, ins, gy)
    gr = torch.autograd.grad(y_ref, ins, gy)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    rows.append(("selective_scan (mamba-ssm) fwd", f"{b}x{d}x{L} n={n}", rel(y, y_ref)))
    rows.append(
        ("selective_scan bwd (worst input)", "", max(rel(a, c) for a, c in zip(gk, gr, strict=False)))
    )
    rows.append(
        (
            "  per-input grad rel err",
            "",
            json.dumps({k: round(rel(a, c), 7) for k, a, c in zip(names, gk, gr, strict=False)}),
        )
    )


def conv_check(rows):
    x = torch.randn(2, 512, 2048, device="cuda", requires_grad=True)
    w = torch.randn(512, 4, device="cuda", requires_grad=True)
    bias = torch.randn(512, device="cuda", requires_grad=True)
    y, y_ref = causal_conv1d(x, w, bias), causal_conv1d_ref(x, w, bias)
    g = torch.randn_like(y)
    gk, gr = torch.autograd.grad(y, (x, w, bias), g), torch.autograd.grad(y_ref, (x, w, bias), g)
    rows.append(("causal_conv1d fwd", "2x512x2048 w=4", rel(y, y_ref)))
    rows.append(("causal_conv1d bwd (worst)", "", max(rel(a, c) for a, c in zip(gk, gr, strict=False))))


def experts_check(rows):
    torch.manual_seed(0)
    counts = torch.tensor([900, 0, 37, 3000, 1, 640, 0, 1500], device="cuda")
    H, F = 1024, 2048
    x = (torch.randn(int(counts.sum()), H, device="cuda")).to(torch.bfloat16).requires_grad_()
    gu = (torch.randn(8, 2 * F, H, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    dn = (torch.randn(8, H, F, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    out = experts_grouped(x, counts, gu, dn)
    ref = experts_ref(x.float(), counts, gu.float(), dn.float())
    g = torch.randn_like(ref)
    gk = torch.autograd.grad(out, (x, gu, dn), g.to(out.dtype))
    gr = torch.autograd.grad(ref, (x, gu, dn), g)
    rows.append(
        (
            "grouped_mm experts fwd (bf16 vs fp32 loop)",
            f"{int(counts.sum())} tok, 8 experts H{H} F{F}",
            rel(out, ref),
        )
    )
    rows.append(("grouped_mm experts bwd (worst)", "", max(rel(a, c) for a, c in zip(gk, gr, strict=False))))


def model_check(rows):
    cfg = get_preset("debug", vocab_size=512)
    torch.manual_seed(0)
    x = torch.randint(0, 512, (2, 513), device="cuda")
    outs = []
    for kernels in (True, False):
        m = JambaForCausalLM(cfg, seed=0, runtime=Runtime(use_kernels=kernels), dtype=torch.float32).cuda()
        o = m(x[:, :-1], labels=x[:, 1:], return_logits=True)
        o.loss.backward()
        outs.append((o.logits.detach(), {n: p.grad for n, p in m.named_parameters()}))
    rows.append(("debug model logits, kernels vs reference (fp32)", "2x512", rel(outs[0][0], outs[1][0])))
    rows.append(
        ("debug model grads, worst tensor", "", max(rel(outs[0][1][k], outs[1][1][k]) for k in outs[0][1]))
    )


def timing(rows, preset: str, batch: int, seq: int, steps: int = 5, variant: str = ""):
    cfg = get_preset(preset)
    m = JambaForCausalLM(cfg, seed=0).cuda().to(torch.bfloat16)
    if variant == "compile":  # each layer compiled on its own; mamba-ssm ops are graph breaks
        for layer in m.model.layers:
            layer.compile()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = m(x[:, :-1], labels=x[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    ms = 1000 * sorted(times[3:])[len(times[3:]) // 2]
    try:
        from jamba.counting import flops_per_token

        fpt = flops_per_token(cfg, seq)["total"]
    except Exception:  # noqa: BLE001
        fpt = None
    tok_s = batch * seq / (ms / 1000)
    mfu = f"{100 * fpt * tok_s / 989e12:.1f}%" if fpt else "n/a"
    rows.append(
        (
            f"{preset} pure bf16 + fused AdamW step {variant}",
            f"{batch}x{seq}",
            f"{ms:.0f} ms, {tok_s / 1e3:.1f}k tok/s, MFU {mfu}, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
        )
    )
    del m, opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--timing", nargs="*", default=["bench-426m:8:2048", "bench:2:4096"])
    args = ap.parse_args()
    rows: list[tuple] = []
    info = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **kernels_available(),
        "grouped_mm": hasattr(torch, "_grouped_mm"),
    }
    for fn in (scan_check, conv_check, experts_check, model_check):
        try:
            fn(rows)
        except Exception as e:  # noqa: BLE001 - report and go on to the next check
            rows.append((fn.__name__, "FAILED", repr(e)[:300]))
    for spec in args.timing:
        name, b, s, *var = spec.split(":")
        try:
            timing(rows, name, int(b), int(s), variant=var[0] if var else "")
        except Exception as e:  # noqa: BLE001
            rows.append((f"timing {spec}", "FAILED", repr(e)[:300]))
        torch.cuda.empty_cache()
    lines = [f"{k}: {v}" for k, v in info.items()] + ["", "| check | shape | result |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c if isinstance(c, str) else f'{c:.2e}'} |" for a, b, c in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
