"""Profile one training step of a preset on GPU and print the top CUDA kernels and per-module times.

python benchmarks/gpu_profile.py --preset bench --batch 4 --seq 4096 [--ckpt none] [--precision autocast] [--compile]

--precision autocast (default) is the trainer's recipe without DeepSpeed: fp32 weights and optimizer states, bf16
matmuls under torch.autocast; bf16 casts the whole model to bf16 (pure bf16). --compile compiles every decoder
layer (parallel.compile=layers); per-part ranges are then not recorded (they would split the graphs).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from jamba import JambaForCausalLM, get_preset
from jamba.layers import MIXERS
from jamba.runtime import Runtime
from parallel.apply import set_activation_checkpointing

MIXER_ATTRS = {m.attr for m in MIXERS.values()}


def tag_modules(model: torch.nn.Module) -> None:
    """Wrap each layer part's forward in a record_function range so the profile groups by part."""
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in (*MIXER_ATTRS, "feed_forward", "lm_head") or name.endswith("embed_tokens"):
            kind = leaf if leaf != "feed_forward" else type(mod).__name__
            fwd = mod.forward

            def wrapped(*a, _f=fwd, _k=kind, **k):
                with record_function(f"part::{_k}"):
                    return _f(*a, **k)

            mod.forward = wrapped


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--ckpt", default="none")
    ap.add_argument("--rows", type=int, default=35)
    ap.add_argument("--precision", default="autocast", choices=["autocast", "bf16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument(
        "--scan-backend", default="auto", help="runtime.scan_backend: auto|triton|mamba_ssm|torch"
    )
    ap.add_argument("--deterministic", action="store_true", help="as trainer.deterministic=true")
    ap.add_argument(
        "--where",
        default="",
        help="also print input shapes and Python call sites of the ops whose name contains this",
    )
    args = ap.parse_args()
    if args.deterministic:  # before the model is built: it picks the scan and conv kernels
        from train.build import set_deterministic

        set_deterministic(True)
    cfg = get_preset(args.preset)
    rt = Runtime(scan_backend=args.scan_backend)
    m = JambaForCausalLM(cfg, seed=0, runtime=rt, device_type="cuda", dtype=torch.bfloat16).cuda()
    set_activation_checkpointing(m, args.ckpt)
    if args.precision == "bf16":
        m = m.to(torch.bfloat16)
    if args.compile:
        m.compile_layers()
    else:
        tag_modules(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device="cuda")

    def step():
        with torch.autocast("cuda", torch.bfloat16, enabled=args.precision == "autocast"):
            out = m(x[:, :-1], labels=x[:, 1:])
        out.loss.backward()
        with record_function("part::optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    print(
        f"{args.preset} {args.batch}x{args.seq} {args.precision} compile={args.compile}: step "
        f"{1000 * sorted(times)[1]:.1f} ms (median of 3), peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    )
    where = dict(record_shapes=True, with_stack=True) if args.where else {}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], **where) as prof:
        step()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    parts = defaultdict(float)
    for e in ka:
        if e.key.startswith("part::"):
            parts[e.key] += e.device_time_total / 1000
    if args.where:
        for e in prof.key_averages(group_by_input_shape=True, group_by_stack_n=12):
            if args.where in e.key:
                print(
                    f"\n{e.key} x{e.count} self CUDA {e.self_device_time_total / 1000:.2f} ms shapes {e.input_shapes}"
                )
                print("  " + "\n  ".join(e.stack))
    print(
        "forward CUDA time by part (ms, includes nested):", {k: round(v, 1) for k, v in sorted(parts.items())}
    )


if __name__ == "__main__":
    main()
