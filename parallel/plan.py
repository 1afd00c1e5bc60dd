"""Plan mode: size a run before getting the GPUs. No process group, no GPU, no weights.

    python -m parallel.plan --model jamba-v0.1 --world-size 64 --ep 8 --zero 1 --micro-batch 1 --seq-len 4096

prints the process groups (abbreviated for large worlds), the experts each rank holds, how ZeRO partitions
dense and expert parameters, and the estimated memory per GPU with and without activation checkpointing
(formulas in parallel/memory.py and docs/parallel.md).
"""

from __future__ import annotations

import argparse
import sys

from jamba.config import CHECKPOINT_CHOICES, JambaConfig
from jamba.presets import PRESETS, get_preset

from .config import ParallelConfig
from .groups import GroupLayout
from .memory import PRECISIONS, GiB, ParamCounts, estimate_memory, param_counts, precision_bytes


def _fmt_groups(groups: list[list[int]], show: int = 3) -> str:
    def one(g: list[int]) -> str:
        if len(g) <= 8:
            return "[" + ",".join(map(str, g)) + "]"
        step = g[1] - g[0]
        return f"[{g[0]},{g[1]},...,{g[-1]}] (step {step}, {len(g)} ranks)"

    if len(groups) <= show + 1:
        return " ".join(one(g) for g in groups)
    return " ".join(one(g) for g in groups[:show]) + f" ... {one(groups[-1])}  ({len(groups)} groups)"


def _b(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def format_plan(
    cfg: JambaConfig,
    name: str,
    world_size: int,
    ep: int,
    zero: int,
    micro_batch: int,
    seq_len: int,
    act_ckpt: str = "none",
    precision: str = "autocast",
    gpu_mem_gib: float = 80.0,
    bucket_elems: float = 2e8,
    counts: ParamCounts | None = None,
) -> str:
    ParallelConfig(expert_parallel_size=ep, zero_stage=zero).check(world_size, cfg.num_experts)
    wb, _ = precision_bytes(precision)
    lay = GroupLayout(world_size, ep, cfg.num_experts)
    counts = counts or param_counts(cfg)
    active = counts.dense + counts.expert * cfg.num_experts_per_tok // cfg.num_experts
    L = []
    L.append(
        f"== plan: {name} on {world_size} GPUs, EP={ep}, ZeRO-{zero}, {precision}, micro-batch {micro_batch} "
        f"x seq {seq_len}, activation checkpointing '{act_ckpt}'"
    )
    L.append(
        f"model: {counts.total / 1e9:.2f}B parameters ({active / 1e9:.2f}B active per token): "
        f"dense {_b(counts.dense)}, experts {_b(counts.expert)} in {counts.moe_layers} MoE layers x "
        f"{cfg.num_experts} experts (top-{cfg.num_experts_per_tok}), "
        f"{_b(counts.expert / max(1, counts.moe_layers * cfg.num_experts))} per expert"
    )
    L.append("groups:")
    L.append(f"  data parallel (dense params): all {world_size} ranks")
    L.append(
        f"  expert parallel  ({world_size // ep} x {ep} ranks, tokens all-to-all): {_fmt_groups(lay.all_ep_groups())}"
    )
    L.append(
        f"  expert data par. ({ep} x {lay.edp_size} ranks, expert grads reduced): {_fmt_groups(lay.all_edp_groups())}"
    )
    L.append(f"experts per rank: {lay.experts_per_rank()} of {cfg.num_experts} in each MoE layer")
    rows = list(range(ep)) if ep <= 8 else [0, 1, ep - 1]
    for j in rows:
        ranks = lay.all_edp_groups()[j]
        r = "ranks " + (
            ",".join(map(str, ranks)) if len(ranks) <= 4 else f"{ranks[0]},{ranks[1]},...,{ranks[-1]}"
        )
        ex = lay.local_experts(j)
        L.append(f"  ep_rank {j:>2} ({r}): experts {ex.start}..{ex.stop - 1}")
    if ep > 8:
        L.append(f"  ... ({ep} EP ranks)")
    est = estimate_memory(
        cfg, counts, world_size, ep, zero, micro_batch, seq_len, act_ckpt, precision, bucket_elems
    )
    part = {
        0: "nothing",
        1: "optimizer states",
        2: "optimizer states + gradients",
        3: "optimizer states + gradients + weights",
    }[zero]
    L.append(f"ZeRO-{zero} partitions {part}:")
    L.append(f"  dense  {_b(counts.dense)} over DP={world_size} -> {_b(est.dense_shard)} per rank")
    L.append(
        f"  expert {_b(est.local_expert)} per rank (1/{ep} of all experts) over EDP={lay.edp_size} "
        f"-> {_b(est.expert_shard)} per rank"
    )
    L.append(f"estimated memory per GPU (GiB; {_b(est.local_dense + est.local_expert)} parameters held):")

    def row(label: str, nbytes: float, note: str = "") -> None:
        L.append(f"  {label:<32}{nbytes / GiB:8.1f}" + (f"   {note}" if note else ""))

    row(f"weights ({wb} B/param)", est.weights)
    row(f"gradients ({wb} B/param)", est.grads)
    if zero == 0 and precision != "bf16":
        row(
            "optimizer (8 B/param)",
            est.optimizer,
            "Adam exp_avg, exp_avg_sq (the fp32 weights are the masters)",
        )
    else:
        row("optimizer (12 B/param)", est.optimizer, "fp32 master + Adam exp_avg, exp_avg_sq")
    if est.cast_copies:
        row("bf16 weight copies (2 B/param)", est.cast_copies, "autocast: saved by autograd for backward")
    if est.buckets:
        row("ZeRO buckets", est.buckets, f"reduce + all-gather, {bucket_elems:.0e} elements each")
    row("= model states", est.model_states)
    row(
        f"activations (ckpt '{act_ckpt}')",
        est.activations,
        f"micro-batch {micro_batch} x {seq_len} tokens, balanced routing",
    )
    row("= total", est.total, f"of {gpu_mem_gib:.0f} GiB")
    row("  total with no checkpointing", est.model_states + est.activations_none)
    row("  total with full checkpointing", est.model_states + est.activations_full)
    headroom = gpu_mem_gib * GiB * 0.9  # allocator fragmentation, CUDA context, NCCL buffers
    if est.total <= headroom:
        L.append(f"verdict: fits ({est.total / GiB:.1f} <= 90% of {gpu_mem_gib:.0f} GiB)")
    else:
        hints = []
        if act_ckpt != "full" and est.model_states + est.activations_full <= headroom:
            hints.append("--act-ckpt full")
        if zero < 2:
            hints.append("--zero 2")
        if lay.edp_size == 1 and zero >= 1:
            hints.append("more GPUs (EDP=1: expert optimizer states are not partitioned at all)")
        if ep * 2 <= min(world_size, cfg.num_experts) and world_size % (ep * 2) == 0:
            hints.append(f"--ep {ep * 2}")
        L.append(
            f"verdict: does NOT fit ({est.total / GiB:.1f} > 90% of {gpu_mem_gib:.0f} GiB); try: "
            + ("; ".join(hints) if hints else "more GPUs or a smaller micro-batch")
        )
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parallel.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="jamba-v0.1", help=f"a preset: {', '.join(sorted(PRESETS))}")
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    ap.add_argument(
        "--zero",
        type=int,
        default=None,
        choices=(0, 1, 2, 3),
        help="default: what train/ runs, 0 on one GPU (nothing to partition), else 1",
    )
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--act-ckpt", default="none", choices=CHECKPOINT_CHOICES)
    ap.add_argument(
        "--precision",
        default="autocast",
        choices=PRECISIONS,
        help="autocast: fp32 weights, bf16 matmuls (train/zero.py); bf16: DeepSpeed bf16 module",
    )
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (H100 80)")
    ap.add_argument(
        "--bucket-elems", type=float, default=2e8, help="ZeRO reduce/all-gather bucket (elements)"
    )
    a = ap.parse_args(argv)
    try:
        cfg = get_preset(a.model)
        print(
            format_plan(
                cfg,
                a.model,
                a.world_size,
                a.ep,
                a.zero if a.zero is not None else (0 if a.world_size == 1 else 1),
                a.micro_batch,
                a.seq_len,
                a.act_ckpt,
                a.precision,
                a.gpu_mem,
                a.bucket_elems,
            )
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
