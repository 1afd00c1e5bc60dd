"""Mamba-2 on the GPU: mamba-ssm's SSD kernel against our chunked PyTorch form, then the `bench` training step
with Mamba-2 layers in place of Mamba-1 (same pattern, 'S' for 'M') beside Mamba-1, in the same process.

    python benchmarks/gpu_mamba2.py --out benchmarks/results/DATE-mamba2.md [--batch 2 --seq 4096 --steps 6]

(a) kernel vs reference at the bench Mamba-2 shape (64 heads of 64, d_state 128, one group): forward output
    and input gradients, inputs in fp32 and in bf16 (the reference computes in fp32 from the same values);
    max |kernel - ref| / max |ref| per tensor.
(b) the step: fp32 weights, bf16 autocast, forward + backward (chunked loss) + fused AdamW, no activation
    checkpointing, no compile, no DeepSpeed (what `python -m train` runs on one GPU with parallel.compile=none,
    minus DeepSpeed's wrapper). Mean of --steps after 2 warm-up steps; MFU with jamba.counting's FLOPs
    (matmuls, attention, scan; training = 3 x forward) over a 989 TFLOP/s dense bf16 peak (H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import gc
import platform
import time

import torch
import torch.nn.functional as F

from jamba import JambaForCausalLM, get_preset
from jamba.counting import count_params, flops_per_token
from jamba.mamba2_ssd import _ssd_kernel, ssd_chunked

PEAK = 989e12
DEV = "cuda"


def kernel_vs_reference(dtype: torch.dtype, b=2, L=2048, h=64, p=64, g=1, n=128, chunk=256) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype).requires_grad_()

    x, B, C = rnd(b, L, h, p), rnd(b, L, g, n, scale=0.3), rnd(b, L, g, n, scale=0.3)
    dt = rnd(b, L, h, scale=0.5)
    A = -torch.linspace(1, 16, h, device=DEV)
    D, dt_bias = torch.rand(h, device="cuda"), torch.full((h,), -3.0, device=DEV)
    y = _ssd_kernel(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True)
    dy = torch.randn(y.shape, device="cuda", generator=gen).to(dtype)
    grads = torch.autograd.grad(y, (x, dt, B, C), dy)
    xs = [t.detach().float().requires_grad_() for t in (x, dt, B, C)]
    ref, _ = ssd_chunked(xs[0], F.softplus(xs[1] + dt_bias), A, xs[2], xs[3], chunk=64)
    ref = ref + xs[0] * D[:, None]
    ref_grads = torch.autograd.grad(ref, xs, dy.float())

    def rel(a, r):
        return ((a.float() - r).abs().max() / r.abs().max()).item()

    out = {"y": rel(y, ref)}
    out.update({f"d{k}": rel(a, r) for k, a, r in zip(("x", "dt", "B", "C"), grads, ref_grads, strict=True)})
    return out


def step_time(cfg, batch: int, seq: int, steps: int) -> dict:
    torch.manual_seed(0)
    with torch.device(DEV):  # init draws on the GPU (seconds, not minutes, at 2.5B)
        model = JambaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=DEV)
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(2 + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    ms = 1000 * sum(times) / len(times)
    tps = batch * seq / (ms / 1000)
    fl = flops_per_token(cfg, seq)["total"]
    mix = model.model.layers[0]
    mixer = getattr(mix, mix.mixer_attr)
    res = {
        "params": count_params(cfg)["total"],
        "ms": ms,
        "tok_s": tps,
        "mfu": tps * fl / PEAK,
        "flops_tok": fl,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss0": losses[0],
        "lossN": losses[-1],
        "kernels": f"scan {mixer.scan_backend}, conv {mixer.conv_backend}",
    }
    del model, opt, loss
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import mamba_ssm
    import triton

    lines: list[str] = []

    def emit(*new: str) -> None:  # the table so far is on disk after every row (a timeout keeps it)
        lines.extend(new)
        print("\n".join(new), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                f.write("\n".join(lines) + "\n")

    emit(
        f"# Mamba-2 vs Mamba-1 on {torch.cuda.get_device_name()}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}, mamba_ssm {mamba_ssm.__version__}, "
        f"Python {platform.python_version()}; `python benchmarks/gpu_mamba2.py --batch {a.batch} --seq {a.seq} "
        f"--steps {a.steps}`",
        "",
    )
    # the step first (the Triton SSD kernels autotune in its warm-up steps), then the kernel checks
    base = get_preset("bench")
    emit(
        f"## `bench` training step, {a.batch} x {a.seq} tokens (bf16 autocast, fp32 AdamW, no checkpointing, eager)",
        "",
        "| mixer | pattern | params | ms/step | tokens/s | MFU | FLOPs/token | peak GiB | loss step 0 -> last | kernels |",
        "|---|---|---|---|---|---|---|---|---|---|",
    )
    res = {}
    for name, pattern in (("Mamba-1", base.pattern), ("Mamba-2", base.pattern.replace("M", "S"))):
        r = res[name] = step_time(base.replace(layer_pattern=pattern), a.batch, a.seq, a.steps)
        emit(
            f"| {name} | `{pattern}` | {r['params'] / 1e9:.3f}B | {r['ms']:.0f} | {r['tok_s']:.0f} | "
            f"{100 * r['mfu']:.1f}% | {r['flops_tok'] / 1e9:.2f}G | {r['peak_gib']:.1f} | "
            f"{r['loss0']:.3f} -> {r['lossN']:.3f} | {r['kernels']} |"
        )
    emit("", f"Mamba-2 step time / Mamba-1 step time: {res['Mamba-2']['ms'] / res['Mamba-1']['ms']:.2f}", "")
    emit(
        "## SSD kernel (mamba_chunk_scan_combined, chunk 256) vs the chunked PyTorch form (fp32)",
        "",
        "b 2, L 2048, 64 heads x 64, d_state 128, 1 group (bench's Mamba-2 shape); max |kernel - ref| / max |ref|",
        "",
        "| inputs | y | dx | ddt | dB | dC |",
        "|---|---|---|---|---|---|",
    )
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        r = kernel_vs_reference(dt)
        emit(f"| {name} | " + " | ".join(f"{r[k]:.1e}" for k in ("y", "dx", "ddt", "dB", "dC")) + " |")


if __name__ == "__main__":
    main()
