"""Our Jamba vs transformers' JambaForCausalLM, same weights, same batches, same DeepSpeed recipe.

    TORCH_CUDA_ARCH_LIST=9.0 python benchmarks/bench_vs_hf.py --runs bench-426m:8:2048 bench:4:4096 bench:2:4096

Implementations (--which):
  hf            transformers' JambaForCausalLM (mamba-ssm + causal-conv1d kernels, SDPA) under DeepSpeed's bf16
                mode: bf16 weights, fp32 master weights in the ZeRO-1 optimizer;
  ours          our model as `python -m train` runs it on one GPU, with parallel.compile=none: DeepSpeed
                torch_autocast (fp32 weights = masters, fp32 optimizer states, bf16 matmuls), our optimizer param
                groups, ZeRO stage 0 (one rank: nothing to partition; see parallel.zero.effective_zero_stage);
  ours-compile  the same with torch.compile of every decoder layer: the trainer's default on a GPU;
  ...-z1        (suffix) ZeRO-1 instead of stage 0, which keeps a second fp32 copy of the weights;
  ...-bf16      (suffix) hf's recipe (DeepSpeed bf16 mode) for our model, to separate model from recipe;
  ...-det       (suffix) trainer.deterministic=true: torch's deterministic algorithms, our Triton scan (auto),
                PyTorch's conv (train/build.py set_deterministic), to measure what bitwise repeatability costs.
All: torch fused AdamW (client optimizer, so no JIT build), clipping 1.0, the same weights and batches.
A spec ending in :ckpt turns on full activation checkpointing; :key=value sets a field of our model's config
or of its jamba.runtime.Runtime (e.g. :ff_chunk_size=16384 or :residual_in_fp32=false). Checks that the step-0 losses agree (1e-2 relative),
then prints: ms/step, tokens/s, MFU (6N: 6 x active matmul params, the issue's convention; and all FLOPs incl. attention and scan,
from jamba.counting; 989 TFLOP/s dense bf16 peak), peak memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from jamba import JambaForCausalLM, get_preset
from jamba.counting import flops_per_token
from jamba.hf_compat import config_to_hf, load_hf_state_dict
from jamba.runtime import RUNTIME_KEYS, Runtime
from jamba.scan import kernels_available
from parallel.apply import set_activation_checkpointing

PEAK = 989e12


def _value(v: str):
    """A spec's field value: true/false, an int, or the string."""
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return int(v) if v.lstrip("-").isdigit() else v


def flags(which: str) -> set[str]:
    """'ours-compile-z0' -> {'ours', 'compile', 'z0'}."""
    return set(which.split("-"))


def ds_config(micro_batch: int, which: str) -> dict:
    f = flags(which)
    if "ours" in f and "bf16" not in f:  # the trainer's own config builder
        from parallel.zero import deepspeed_config, effective_zero_stage

        # as the trainer: stage 0 on a single rank (z1 forces ZeRO-1, for comparison)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        stage = 1 if "z1" in f else effective_zero_stage(1, world)
        cfg = deepspeed_config(
            zero_stage=stage,
            micro_batch_size=micro_batch,
            grad_accum_steps=1,
            grad_clip=0.0,  # clipped as the trainer does (run_one: optimizer_step), not by DeepSpeed
            precision="bf16",
            on_gpu=True,
        )
        cfg["checkpoint"] = {}
        return cfg
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1},
        "bf16": {"enabled": True},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_hf(cfg, ckpt: bool):
    from transformers import JambaConfig as HFConfig
    from transformers import JambaForCausalLM as HFJamba

    hf_cfg = HFConfig(
        **{k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type")}
    )
    hf_cfg._attn_implementation = "sdpa"
    hf_cfg.output_router_logits = True
    hf_cfg.use_cache = False
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialising 2.5B parameters on the host takes minutes
        m = HFJamba(hf_cfg)
    if ckpt:
        m.gradient_checkpointing_enable()
    return m


def hf_loss(m, x):
    out = m(input_ids=x[:, :-1], use_cache=False, output_router_logits=True)
    lm = F.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten())
    return lm, lm + m.module.config.router_aux_loss_coef * out.aux_loss  # m: the DeepSpeed engine


def ours_loss(m, x):
    out = m(x[:, :-1], labels=x[:, 1:])
    return out.lm_loss, out.loss


def run_one(name, cfg, batch, seq, steps, which, state_dict, ckpt, runtime=None):
    import deepspeed

    if which == "hf":
        model = build_hf(cfg, ckpt)
        loss_fn = hf_loss
    else:
        with torch.device("cuda"):
            model = JambaForCausalLM(cfg, init=False, runtime=runtime)
        set_activation_checkpointing(model, "full" if ckpt else "none")
        load_hf_state_dict(model, state_dict)
        if "compile" in flags(which):
            model.compile_layers()
        loss_fn = ours_loss
    model = model.cuda()
    if "ours" in flags(which):  # the trainer's optimizer and param groups
        from parallel.zero import optimizer_param_groups
        from train.optim import SkippableAdamW

        opt = SkippableAdamW(optimizer_param_groups(model, 0.1), lr=1e-4, weight_decay=0.1, fused=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(batch, which))
    if "ours" in flags(which):  # as train/build.py
        from parallel.zero import skip_single_rank_allreduce

        skip_single_rank_allreduce(engine, int(os.environ.get("WORLD_SIZE", "1")))
    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [
        torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda", generator=g) for _ in range(2)
    ]
    torch.cuda.reset_peak_memory_stats()
    first, times = None, []
    steps = steps if batch * seq < 65536 else min(steps, 4)  # long sequences: seconds per step
    for i in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        lm, loss = loss_fn(engine, batches[i % 2])
        engine.backward(loss)
        if "ours" in flags(which) and "bf16" not in flags(which):  # the trainer's DeepSpeed config
            from train.optim import optimizer_step

            optimizer_step(engine, opt, skip=False, max_norm=1.0)  # as train/trainer.py
        else:
            engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        if i == 0:
            first = float(lm.detach())
    warm = times[2:]  # the first steps include compiles and allocator growth
    ms = 1000 * sorted(warm)[len(warm) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30
    del engine, model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return first, ms, peak


def measure(spec: str, which: str, steps: int) -> dict:
    """One (config, implementation) run; called in a fresh process so an OOM leaves nothing behind."""
    preset, b, s, *rest = spec.split(":")
    b, s, ckpt = int(b), int(s), "ckpt" in rest
    cfg = get_preset(preset)
    extra = {k: _value(v) for k, v in (kv.split("=") for kv in rest if "=" in kv)}
    runtime = Runtime(**{k: v for k, v in extra.items() if k in RUNTIME_KEYS})
    if extra and which.startswith("ours"):
        cfg = cfg.replace(**{k: v for k, v in extra.items() if k not in RUNTIME_KEYS})
    if "det" in flags(which):  # before cuBLAS starts and our model is built (it picks the scan, conv kernels)
        from train.build import set_deterministic

        set_deterministic(True)
    sd = None
    if which.startswith("ours"):  # the same weights as transformers' model: same seed, same init, then copied
        ref = build_hf(cfg, False)
        sd = {k: v.detach().cpu() for k, v in ref.state_dict().items()}
        del ref
        torch.cuda.empty_cache()
    try:
        first, ms, peak = run_one(preset, cfg, b, s, steps, which, sd, ckpt, runtime)
    except torch.OutOfMemoryError:
        return {"oom": True}
    return {"first": first, "ms": ms, "peak": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--runs",
        nargs="+",
        default=["bench-426m:8:2048", "bench:4:4096", "bench:2:4096"],
        help="preset:batch:seq[:ckpt][:key=value][@impl,impl] (the @ list overrides --which for that run)",
    )
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument(
        "--which", default="hf,ours,ours-compile", help="comma list: hf, ours, ours-compile, ours-bf16"
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--timeout", type=int, default=420, help="seconds per (config, implementation) run")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: spec,which
    args = ap.parse_args()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    for k, v in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29511",
        "NCCL_NVLS_ENABLE": "0",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }.items():
        os.environ.setdefault(k, v)
    if args.one:
        import deepspeed

        deepspeed.init_distributed()
        spec, which = args.one.split(",")
        print("RESULT " + json.dumps(measure(spec, which, args.steps)), flush=True)
        return
    import deepspeed
    import transformers

    lines = [
        f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
        f"transformers {transformers.__version__}, python {platform.python_version()}, kernels {kernels_available()}, "
        f"torch._grouped_mm {hasattr(torch, '_grouped_mm')}",
        "",
        "| config | batch x seq | impl | ms/step | tokens/s | MFU (6N) | MFU (all FLOPs) | peak GiB | step-0 loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(lines), flush=True)
    for spec in args.runs:
        spec, _, only = spec.partition("@")  # preset:b:s[:ckpt][@which,which]
        preset, b, s, *rest = spec.split(":")
        b, s = int(b), int(s)
        fl = flops_per_token(get_preset(preset), s)
        losses, res = {}, {}
        for which in (only or args.which).split(","):
            label = f"| {' '.join([preset, *rest])} | {b}x{s} | {which} |"
            try:
                proc = subprocess.run(
                    [sys.executable, __file__, "--one", f"{spec},{which}", "--steps", str(args.steps)],
                    capture_output=True,
                    text=True,
                    timeout=args.timeout,
                )
            except subprocess.TimeoutExpired:
                proc = None
            got = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")] if proc else []
            if proc is None:
                row = f"{label} TIMEOUT after {args.timeout} s | | | | | |"
            elif not got:
                row = f"{label} ERROR rc={proc.returncode}: {error_line(proc.stderr)} | | | | | |"
                if args.out:  # the whole stderr beside the table
                    log = Path(f"{args.out}.{preset}-{b}x{s}-{which}.log")
                    log.write_text(proc.stderr)
                    print(f"stderr of the failed run: {log}", file=sys.stderr)
            else:
                r = json.loads(got[0][7:])
                if r.get("oom"):
                    row = f"{label} OOM | | | | | |"
                else:
                    tok = b * s / (r["ms"] / 1000)
                    losses[which], res[which] = r["first"], r["ms"]
                    row = (
                        f"{label} {r['ms']:.0f} | {tok / 1e3:.1f}k | {100 * fl['matmul'] * tok / PEAK:.1f}% | "
                        f"{100 * fl['total'] * tok / PEAK:.1f}% | {r['peak']:.1f} | {r['first']:.4f} |"
                    )
            lines.append(row)
            print(row, flush=True)
            write_out(args.out, lines)  # what is measured survives a killed command
        for which in losses:
            if which == "hf" or "hf" not in losses:
                continue
            rel = abs(losses["hf"] - losses[which]) / abs(losses["hf"])
            line = (
                f"{which}: step-0 loss rel diff vs hf {rel:.2e} ({'OK' if rel < 1e-2 else 'MISMATCH'}), "
                f"speed-up {res['hf'] / res[which]:.2f}x"
            )
            lines.append(line)
            print(line, flush=True)
    write_out(args.out, lines)


def error_line(stderr: str) -> str:
    """The exception of a failed run (not the warnings printed after it), cut to a table cell."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", ln).strip() for ln in stderr.splitlines()]
    lines = [ln for ln in lines if ln]
    errs = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b", ln)]
    return ((errs or lines or [""])[-1])[:200].replace("|", "/")


def write_out(path: str | None, lines: list[str]) -> None:
    if path:
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
