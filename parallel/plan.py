"""Plan mode: size a run before getting the GPUs. No process group, no GPU, no weights.

    python -m parallel.plan --model jamba-v0.1 --world-size 64 [--seq-len 4096 --micro-batch 1] [model.*=...]

The model is the trainer's: any conf/model preset (debug, bench, lm-100m, mqar, ...) with `model.*` overrides,
composed exactly as `python -m train` does. Settings left out (--zero, --ep, --act-ckpt) are searched: the
smallest plan that fits is printed (the least recomputation, then the largest micro-batch up to --micro-batch,
then the smallest EP size, then the lowest ZeRO stage: the dearest knob in step time is decided first), or "nothing fits on N GPUs" (exit 1). With every
setting given, that plan is printed with its verdict. A plan shows the process groups (abbreviated for large
worlds), the experts each rank holds, how ZeRO partitions dense and expert parameters, and the estimated
memory per GPU (formulas in parallel/memory.py and docs/parallel.md).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from jamba.config import CHECKPOINT_CHOICES, JambaConfig
from jamba.layers import checkpointed

from .config import PRECISIONS, ZERO_STAGES, ParallelConfig, effective_zero_stage
from .memory import GiB, ParamCounts, estimate_memory, layer_activation_units, param_counts, precision_bytes
from .topology import GroupLayout

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
HEADROOM = 0.9  # of the GPU's memory: allocator fragmentation, CUDA context, NCCL buffers


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
    precision: str = "bf16",
    gpu_mem_gib: float = 80.0,
    bucket_elems: float = 2e8,
    counts: ParamCounts | None = None,
) -> str:
    ParallelConfig(expert_parallel_size=ep, zero_stage=zero, activation_checkpointing=act_ckpt).check(
        world_size, cfg.num_experts
    )
    zero = effective_zero_stage(zero, world_size)  # what the trainer runs: a plain engine on one rank
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
    part = {0: "nothing (one rank)", 1: "optimizer states", 2: "optimizer states + gradients"}[zero]
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
    if zero == 0:
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
    if est.total <= gpu_mem_gib * GiB * HEADROOM:
        L.append(f"verdict: fits ({est.total / GiB:.1f} <= 90% of {gpu_mem_gib:.0f} GiB)")
    else:
        L.append(
            f"verdict: does NOT fit ({est.total / GiB:.1f} > 90% of {gpu_mem_gib:.0f} GiB); leave out --zero, "
            "--ep or --act-ckpt to search for the smallest plan that fits"
        )
    return "\n".join(L)


# ---- the search ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    zero: int
    ep: int
    act_ckpt: str
    micro_batch: int
    total_bytes: float


def checkpoint_modes(cfg: JambaConfig) -> tuple[str, ...]:
    """The checkpointing modes that differ for this model, cheapest first: a mode that selects no layer of it
    (a mixer it lacks) is `none` under another name and is left out."""
    useful = [m for m in CHECKPOINT_CHOICES if m == "none" or recompute_share(cfg, m) > 0]
    return tuple(sorted(useful, key=lambda m: (recompute_share(cfg, m), m)))


def recompute_share(cfg: JambaConfig, mode: str) -> float:
    """The share of the layers' activation units that checkpointing `mode` recomputes (its extra forward
    work, roughly): orders the modes from cheapest to dearest for this model."""
    units = layer_activation_units(cfg)
    kinds = zip(units, cfg.layers_block_type, cfg.layers_is_moe, strict=True)
    return sum(u for u, kind, moe in kinds if checkpointed(mode, kind, moe)) / sum(units)


def search(
    cfg: JambaConfig,
    world_size: int,
    micro_batch: int,
    seq_len: int,
    gpu_mem_gib: float = 80.0,
    precision: str = "bf16",
    zeros: tuple[int, ...] | None = None,
    eps: tuple[int, ...] | None = None,
    ckpts: tuple[str, ...] | None = None,
    bucket_elems: float = 2e8,
    counts: ParamCounts | None = None,
) -> tuple[Plan | None, Plan | None]:
    """(the smallest plan that fits, or None; the plan with the least memory, for the message when none does).
    Smallest, the dearest knob in step time first: the least recomputation (checkpointing re-runs forwards),
    then the largest micro-batch up to `micro_batch` (halving; gradient accumulation keeps the batch), then
    the smallest EP size (all-to-alls), then the lowest ZeRO stage (stage 2 costs little over 1). `zeros`, `eps`, `ckpts`: the values to try (default all)."""
    counts = counts or param_counts(cfg)
    E = cfg.num_experts if any(cfg.layers_is_moe) else 1
    eps = eps or tuple(e for e in range(1, world_size + 1) if world_size % e == 0 and E % e == 0)
    ckpts = ckpts or checkpoint_modes(cfg)
    zeros = zeros or ZERO_STAGES
    mbs, m = [], micro_batch
    while m >= 1:
        mbs.append(m)
        m //= 2
    headroom, least = gpu_mem_gib * GiB * HEADROOM, None
    for ck in ckpts:
        for mb in mbs:
            for ep in eps:
                for zero in zeros:
                    z = effective_zero_stage(zero, world_size)
                    est = estimate_memory(
                        cfg, counts, world_size, ep, z, mb, seq_len, ck, precision, bucket_elems
                    )
                    plan = Plan(zero, ep, ck, mb, est.total)
                    if est.total <= headroom:
                        return plan, plan
                    if least is None or est.total < least.total_bytes:
                        least = plan
    return None, least


def load_model(name: str, overrides: list[str]) -> JambaConfig:
    """The model `python -m train model=<name> <overrides>` would build (conf/model/<name>.yaml), through the
    trainer's own composition and checks."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from train.config import ConfigError, build_model_config, register
    from train.config_check import describe

    bad = [o for o in overrides if not o.startswith("model.") or "=" not in o]
    if bad:
        raise ValueError(f"{bad[0]}: only model.<field>=<value> overrides are taken here")
    register()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            dcfg = compose(config_name="config", overrides=[f"model={name}", *overrides])
        model = OmegaConf.to_object(dcfg.model)
    except (HydraException, OmegaConfBaseException) as e:
        presets = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise ValueError(f"{describe(e)} (presets: {', '.join(presets)})") from None
    try:
        return build_model_config(model)
    except ConfigError as e:
        raise ValueError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parallel.plan", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", default="jamba-v0.1", help="a preset of conf/model/ (as `python -m train model=`)"
    )
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--ep", type=int, default=None, help="expert-parallel size (left out: searched)")
    ap.add_argument(
        "--zero",
        type=int,
        default=None,
        choices=ZERO_STAGES,
        help="ZeRO stage, as parallel.zero_stage (left out: searched); one rank runs stage 0 either way",
    )
    ap.add_argument("--micro-batch", type=int, default=1, help="the largest micro-batch to try")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--act-ckpt", default=None, choices=CHECKPOINT_CHOICES, help="left out: searched")
    ap.add_argument(
        "--precision", default="bf16", choices=PRECISIONS, help="as parallel.precision (auto plans as bf16)"
    )
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (H100 80)")
    ap.add_argument(
        "--bucket-elems", type=float, default=2e8, help="ZeRO reduce/all-gather bucket (elements)"
    )
    ap.add_argument("overrides", nargs="*", help="model.<field>=<value>, as on the trainer's command line")
    a = ap.parse_args(argv)
    try:
        if a.world_size < 1 or a.micro_batch < 1:
            raise ValueError("--world-size and --micro-batch must be >= 1")
        if a.zero is not None or a.ep is not None or a.act_ckpt is not None:  # check what was given first
            ParallelConfig(
                zero_stage=a.zero or ZERO_STAGES[0],
                expert_parallel_size=a.ep or 1,
                activation_checkpointing=a.act_ckpt or "none",
            ).check(a.world_size)
        cfg = load_model(a.model, a.overrides)
        counts = param_counts(cfg)
        args = (a.world_size, a.micro_batch, a.seq_len)
        common = dict(precision=a.precision, bucket_elems=a.bucket_elems, counts=counts)
        if None not in (a.zero, a.ep, a.act_ckpt):
            print(
                format_plan(
                    cfg,
                    a.model,
                    *args[:1],
                    a.ep,
                    a.zero,
                    *args[1:],
                    a.act_ckpt,
                    gpu_mem_gib=a.gpu_mem,
                    **common,
                )
            )
            return 0
        plan, least = search(
            cfg,
            *args,
            gpu_mem_gib=a.gpu_mem,
            zeros=(a.zero,) if a.zero is not None else None,
            eps=(a.ep,) if a.ep is not None else None,
            ckpts=(a.act_ckpt,) if a.act_ckpt is not None else None,
            **common,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if plan is None:
        print(
            f"nothing fits on {a.world_size} GPUs of {a.gpu_mem:.0f} GiB: the least memory is "
            f"{least.total_bytes / GiB:.1f} GiB per GPU (ZeRO-{least.zero}, EP {least.ep}, activation "
            f"checkpointing '{least.act_ckpt}', micro-batch {least.micro_batch} x {a.seq_len}); use more GPUs, "
            "a shorter sequence or a smaller model"
        )
        return 1
    accum = (
        f", x{a.micro_batch // plan.micro_batch} gradient accumulation"
        if plan.micro_batch < a.micro_batch
        else ""
    )
    print(
        f"smallest plan that fits on {a.world_size} GPUs: parallel.zero_stage={plan.zero} "
        f"parallel.expert_parallel_size={plan.ep} parallel.activation_checkpointing={plan.act_ckpt} "
        f"data.micro_batch_size={plan.micro_batch}{accum} ({plan.total_bytes / GiB:.1f} GiB per GPU)\n"
    )
    print(
        format_plan(
            cfg,
            a.model,
            a.world_size,
            plan.ep,
            plan.zero,
            plan.micro_batch,
            a.seq_len,
            plan.act_ckpt,
            gpu_mem_gib=a.gpu_mem,
            **common,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
