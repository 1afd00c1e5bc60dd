"""Per-GPU memory estimate for a Jamba config under expert parallelism and ZeRO (used by `parallel.plan`).

Notation: Pd dense parameters, Pe expert parameters (all experts of all layers), N ranks, EP size ep,
EDP = N / ep ranks share each expert shard. Each rank holds Pd + Pe/ep parameters ("local").
Bytes per parameter, by precision (parallel/config.py PRECISIONS, the trainer's; "auto" plans as bf16):
    "bf16" (torch autocast: fp32 weights, bf16 matmuls): weights 4, grads 4, bf16 activations; autograd
    also keeps the bf16 copies of the weights it saves for backward: 2 per parameter (not counted under
    full activation checkpointing: see estimate_memory);
    "fp32": weights 4, grads 4, fp32 activations.
    optimizer: 12 = fp32 master copy + exp_avg + exp_avg_sq (ZeRO-1/2 clone an fp32 master partition even
    when the weights are fp32 already); 8 with stage 0 (they are the masters: what train/ runs on a single
    rank).
ZeRO partitions over the ranks that hold the same tensor: dense over N, experts over EDP.
    stage 0 (one rank): nothing partitioned;  1: optimizer states;  2: + gradients.
Communication buckets (ZeRO 1/2): reduce bucket + all-gather bucket of `bucket_elems` each (train/zero.py
uses 2e8), in the gradient dtype.

Activations: what autograd keeps per token, in units of the hidden size h (elements of the activation
dtype; fp32 tensors count twice), read off our modules with the GPU kernels (flash SDPA, mamba-ssm,
causal-conv1d, grouped GEMM); d = mamba_expand * h, F = intermediate size, k = top-k:
    RMSNorm (fp32 inside)         3h each, two per layer
    attention                    6h   (q/k/v input, q, repeated k and v, output, o_proj input)
    Mamba                        h + 2d + d + d + d + d   (in_proj input, xz, conv out, delta, scan out, gated y)
    Mamba-2 (g groups, state n)  h + 6d + 4gn   (in_proj input, zxBCdt, conv out, scan out, gated norm, out_proj in)
    dense SwiGLU                 h + 4F
    MoE (balanced routing)       h + k * (2h + 4F)   (router input; per routed row: input, gate_up out, silu,
                                 product, output); a rank receiving more than its share needs more (dropless)
A layer under activation checkpointing keeps only its input (h); the backward of one checkpointed layer
recomputes it, so the largest checkpointed layer is added once more. The chunked cross-entropy adds
runtime.loss_chunk_size * vocab * 8 bytes (fp32 logits and their gradient) transiently.
"""

from __future__ import annotations

from dataclasses import dataclass

from jamba import JambaConfig
from jamba.counting import count_params
from jamba.layers import FEED_FORWARDS, MIXERS, checkpointed
from jamba.runtime import Runtime

from .config import PRECISIONS

GiB = 1024**3
LOSS_CHUNK = Runtime().loss_chunk_size


def precision_bytes(precision: str) -> tuple[int, int]:
    """(bytes per weight or gradient, bytes per activation element)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {'|'.join(PRECISIONS)}, got {precision!r}")
    return 4, (4 if precision == "fp32" else 2)


@dataclass
class ParamCounts:
    dense: int
    expert: int  # all experts of all MoE layers
    moe_layers: int

    @property
    def total(self) -> int:
        return self.dense + self.expert


def param_counts(cfg: JambaConfig) -> ParamCounts:
    """Dense and expert parameters, from jamba.counting (exact: tests/test_parallel_plan.py checks it against
    the built model)."""
    c = count_params(cfg)
    return ParamCounts(c["total"] - c["experts"], c["experts"], sum(cfg.layers_is_moe))


def layer_activation_units(cfg: JambaConfig) -> list[float]:
    """Saved activation elements per token for each layer, in units of h (see the module docstring; each
    mixer's and feed-forward's figure is its entry in jamba/layers.py)."""
    h = cfg.hidden_size
    return [
        (2 * 3 * h + MIXERS[m].act_units(cfg) + FEED_FORWARDS["E" if moe else ""].act_units(cfg)) / h
        for m, moe in cfg.layers
    ]


def activation_bytes(
    cfg: JambaConfig, micro_batch: int, seq_len: int, mode: str, act_bytes: int, loss_chunk: int = LOSS_CHUNK
) -> float:
    tokens = micro_batch * seq_len
    units = layer_activation_units(cfg)
    kept, peak = 0.0, 0.0
    for u, kind, moe in zip(units, cfg.layers_block_type, cfg.layers_is_moe, strict=True):
        if checkpointed(mode, kind, moe):
            kept += 1.0
            peak = max(peak, u)
        else:
            kept += u
    per_token = (kept + peak) * cfg.hidden_size * act_bytes
    loss = min(tokens, loss_chunk) * cfg.vocab_size * 8
    return tokens * per_token + loss


@dataclass
class MemoryEstimate:
    weights: float
    grads: float
    optimizer: float
    buckets: float
    activations: float
    activations_none: float
    activations_full: float
    local_dense: int
    local_expert: int
    dense_shard: float  # dense parameters per rank in each ZeRO partition
    expert_shard: float
    cast_copies: float = 0.0  # autocast: bf16 copies of the weights, saved for backward

    @property
    def model_states(self) -> float:
        return self.weights + self.grads + self.optimizer + self.buckets + self.cast_copies

    @property
    def total(self) -> float:
        return self.model_states + self.activations


def estimate_memory(
    cfg: JambaConfig,
    counts: ParamCounts,
    world_size: int,
    ep: int,
    zero: int,
    micro_batch: int,
    seq_len: int,
    act_ckpt: str = "none",
    precision: str = "bf16",
    bucket_elems: float = 2e8,
) -> MemoryEstimate:
    edp = world_size // ep
    pb, ab = precision_bytes(precision)
    local_dense, local_expert = counts.dense, counts.expert // ep
    dense_shard, expert_shard = counts.dense / world_size, local_expert / edp

    def maybe(partitioned: bool) -> float:
        return (dense_shard + expert_shard) if partitioned else (local_dense + local_expert)

    weights = pb * maybe(False)  # ZeRO-3 (partitioned weights) is not offered: parallel/config.py
    grads = pb * maybe(zero >= 2)
    optimizer = (8 if zero == 0 else 12) * maybe(zero >= 1)
    buckets = 2 * bucket_elems * pb if zero in (1, 2) else 0.0
    act = activation_bytes(cfg, micro_batch, seq_len, act_ckpt, ab)
    return MemoryEstimate(
        weights,
        grads,
        optimizer,
        buckets,
        act,
        activation_bytes(cfg, micro_batch, seq_len, "none", ab),
        activation_bytes(cfg, micro_batch, seq_len, "full", ab),
        local_dense,
        local_expert,
        dense_shard,
        expert_shard,
        # under full checkpointing the copies made in the forward are dropped with the autocast cache before
        # backward, and backward re-casts one layer at a time (measured: bench 4x4096 fits in 39 GiB)
        2 * maybe(False) if precision != "fp32" and act_ckpt != "full" else 0.0,
    )
