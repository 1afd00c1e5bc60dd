"""The layer registry: every sequence mixer and feed-forward a layer pattern can name, with what the rest of
the code needs to know about it. DecoderLayer builds from it; counting, init, the memory planner, the HF
config, the sweep's layouts, activation checkpointing and the kernel log read it.

A new mixer is its module file plus one entry in MIXERS (and its cost functions here): nothing else.

Costs are per token and per layer, analytical (see jamba/counting.py for the conventions):
  params(cfg)          every parameter of the module
  matmul_params(cfg)   the weights a token multiplies with (2 FLOPs each); a depthwise conv counts as a matmul
  mixing_flops(cfg, seq_len, causal)   forward FLOPs that are not weight matmuls (attention scores, the scan)
  act_units(cfg)       activation elements autograd keeps per token (parallel/memory.py's model)
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Per state element and token, Mamba-1: dA = exp(dt * A) (2), dt * u * B (1), h = dA * h + dBu (2), y += C * h (2).
SCAN_FLOPS_PER_STATE = 7
# Mamba-2 (SSD): the decay is one scalar per head, so per (head_dim x d_state) element: h = a * h (1),
# + (dt x)_p * B_n (2), y += C_n * h (2); counted on the recurrence, not on the chunked algorithm's matmuls.
SSD_FLOPS_PER_STATE = 5


@dataclass(frozen=True)
class Mixer:
    symbol: str  # its character in a layer pattern
    name: str  # config/log name, also the activation_checkpointing unit that selects its layers
    attr: str  # the DecoderLayer attribute holding it: the state-dict prefix (transformers' name)
    module: str  # "file:Class" in jamba/, imported on first use (mixer modules import the config)
    params: Callable
    matmul_params: Callable
    mixing_flops: Callable
    flops_kind: str  # the key of flops_per_token its mixing FLOPs are reported under
    act_units: Callable
    init: Callable | None = None  # (module, cfg, normal_, rand) -> modules it initialised itself
    check: Callable | None = (
        None  # (cfg) -> [(field, problem)]: JambaConfig's validation, when the pattern uses it
    )
    hf_name: str | None = None  # transformers' layers_block_type; None: not exportable
    not_exportable: str = ""  # why, when hf_name is None ("not exportable, because ...")
    description: str = ""

    @property
    def cls(self) -> type:
        file, cls = self.module.split(":")
        return getattr(importlib.import_module(f"jamba.{file}"), cls)


@dataclass(frozen=True)
class FeedForward:
    symbol: str  # "" (the default) or the suffix after the mixer symbol
    name: str
    module: str
    params: Callable  # (cfg) -> (total, active)
    act_units: Callable

    @property
    def cls(self) -> type:
        file, cls = self.module.split(":")
        return getattr(importlib.import_module(f"jamba.{file}"), cls)


# ---- Mamba-1 (Jamba's mixer) -------------------------------------------------------------------------
def _mamba_param_parts(cfg) -> dict[str, int]:
    h, d, n, r, w = cfg.hidden_size, cfg.mamba_d_inner, cfg.mamba_d_state, cfg.mamba_dt_rank, cfg.mamba_d_conv
    pb = 1 if cfg.mamba_proj_bias else 0
    return {
        "in_proj": h * 2 * d + pb * 2 * d,
        "conv1d": d * w + (d if cfg.mamba_conv_bias else 0),
        "x_proj": d * (r + 2 * n),
        "dt_proj": r * d + d,
        "A_log": d * n,
        "D": d,
        "out_proj": d * h + pb * h,
        "norms": r + 2 * n,  # dt, B, C RMSNorms
    }


def _mamba_matmul(cfg) -> int:
    h, d, n, r, w = cfg.hidden_size, cfg.mamba_d_inner, cfg.mamba_d_state, cfg.mamba_dt_rank, cfg.mamba_d_conv
    return h * 2 * d + d * w + d * (r + 2 * n) + r * d + d * h


def _mamba_init(mod, cfg, normal_, rand) -> list:
    """Mamba practice (see jamba/init.py): S4D-real A, dt log-uniform in [dt_min, dt_max], kaiming conv."""
    d, n, r = mod.d_inner, mod.d_state, mod.dt_rank
    mod.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1))
    mod.D.fill_(1.0)
    mod.dt_proj.weight.copy_((rand(mod.dt_proj.weight.shape) * 2 - 1) * r**-0.5)
    mod.dt_proj.bias.copy_(inverse_softplus_dt(rand((d,)), cfg))
    kaiming_conv_(mod.conv1d, rand)
    return [mod.dt_proj]


# ---- attention ------------------------------------------------------------------------------------
def _attention_params(cfg) -> int:
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return h * q + 2 * h * kv + q * h


def _attention_flops(cfg, seq_len: int, causal: bool) -> float:
    keys = seq_len / 2 if causal else seq_len  # mean number of keys a query attends to
    return 2 * 2 * keys * cfg.num_attention_heads * cfg.head_dim  # QK^T and AV, 2 FLOPs per MAC


# ---- Mamba-2 ----------------------------------------------------------------------------------------
def _mamba2_params(cfg) -> int:
    h, d, w = cfg.hidden_size, cfg.mamba_d_inner, cfg.mamba_d_conv
    gn, heads = cfg.mamba2_n_groups * cfg.mamba2_d_state, cfg.mamba_d_inner // cfg.mamba2_head_dim
    pb = 1 if cfg.mamba_proj_bias else 0
    proj = 2 * d + 2 * gn + heads  # z, x, B, C, dt
    conv = (d + 2 * gn) * (w + (1 if cfg.mamba_conv_bias else 0))
    return h * proj + pb * proj + conv + 3 * heads + d + d * h + pb * h  # + dt_bias, A_log, D; norm


def _mamba2_matmul(cfg) -> int:
    h, d, w = cfg.hidden_size, cfg.mamba_d_inner, cfg.mamba_d_conv
    gn, heads = cfg.mamba2_n_groups * cfg.mamba2_d_state, cfg.mamba_d_inner // cfg.mamba2_head_dim
    return h * (2 * d + 2 * gn + heads) + (d + 2 * gn) * w + d * h


def _mamba2_init(mod, cfg, normal_, rand) -> list:
    """As mamba-ssm's Mamba2: A uniform in [1, 16] per head, dt log-uniform, D = 1, kaiming conv."""
    heads = mod.n_heads
    mod.A_log.copy_(torch.log(1 + 15 * rand((heads,))))
    mod.D.fill_(1.0)
    mod.dt_bias.copy_(inverse_softplus_dt(rand((heads,)), cfg))
    kaiming_conv_(mod.conv1d, rand)
    mod.norm.weight.fill_(1.0)
    return []


def _mamba2_check(cfg) -> list[tuple[str, str]]:
    bad = [
        (f, f"must be a positive int, got {getattr(cfg, f)!r}")
        for f in ("mamba2_d_state", "mamba2_head_dim", "mamba2_n_groups")
        if not (isinstance(getattr(cfg, f), int) and getattr(cfg, f) > 0)
    ]
    if not bad and cfg.mamba_d_inner % (cfg.mamba2_head_dim * cfg.mamba2_n_groups):
        bad.append(
            (
                "mamba2_head_dim",
                f"mamba2_head_dim={cfg.mamba2_head_dim} x mamba2_n_groups={cfg.mamba2_n_groups} must divide the "
                f"Mamba inner width mamba_expand * hidden_size = {cfg.mamba_d_inner}",
            )
        )
    return bad


# ---- shared init pieces -----------------------------------------------------------------------------
def inverse_softplus_dt(u: torch.Tensor, cfg) -> torch.Tensor:
    """dt log-uniform in [dt_min, dt_max] from u ~ U[0, 1), floored, as the bias that softplus maps to it."""
    lo, hi = math.log(cfg.mamba_dt_min), math.log(cfg.mamba_dt_max)
    dt = torch.exp(u * (hi - lo) + lo).clamp(min=cfg.mamba_dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


def kaiming_conv_(conv, rand) -> None:
    """PyTorch's default Conv1d init (kaiming-uniform, a=sqrt 5), as mamba-ssm, from our generator."""
    w = conv.weight
    b = 1 / math.sqrt(w.shape[1] * w.shape[2])
    w.copy_((rand(w.shape) * 2 - 1) * b)
    if conv.bias is not None:
        conv.bias.copy_((rand(conv.bias.shape) * 2 - 1) * b)


# ---- the registry -----------------------------------------------------------------------------------
MIXERS: dict[str, Mixer] = {
    m.symbol: m
    for m in (
        Mixer(
            symbol="M",
            name="mamba",
            attr="mamba",
            module="mamba:MambaMixer",
            params=lambda cfg: sum(_mamba_param_parts(cfg).values()),
            matmul_params=_mamba_matmul,
            mixing_flops=lambda cfg, t, c: SCAN_FLOPS_PER_STATE * cfg.mamba_d_inner * cfg.mamba_d_state,
            flops_kind="selective_scan",
            # in_proj input, xz, conv out, delta, scan out, gated y (mamba-ssm + causal-conv1d kernels)
            act_units=lambda cfg: cfg.hidden_size + 6 * cfg.mamba_d_inner,
            init=_mamba_init,
            hf_name="mamba",
            description="Mamba-1 with Jamba's dt/B/C RMSNorms",
        ),
        Mixer(
            symbol="*",
            name="attention",
            attr="self_attn",
            module="attention:Attention",
            params=_attention_params,
            matmul_params=_attention_params,
            mixing_flops=_attention_flops,
            flops_kind="attention",
            # q/k/v input, q, repeated k and v, output, o_proj input (flash SDPA)
            act_units=lambda cfg: 6 * cfg.hidden_size,
            hf_name="attention",
            description="grouped-query causal attention",
        ),
        Mixer(
            symbol="S",
            name="mamba2",
            attr="mamba",
            module="mamba2:Mamba2Mixer",
            params=_mamba2_params,
            matmul_params=_mamba2_matmul,
            mixing_flops=lambda cfg, t, c: SSD_FLOPS_PER_STATE * cfg.mamba_d_inner * cfg.mamba2_d_state,
            flops_kind="selective_scan",
            # in_proj input, zxBCdt, conv out (x, B, C), scan out, gated-norm output, out_proj input
            act_units=lambda cfg: (
                cfg.hidden_size + 6 * cfg.mamba_d_inner + 4 * cfg.mamba2_n_groups * cfg.mamba2_d_state
            ),
            init=_mamba2_init,
            check=_mamba2_check,
            not_exportable="transformers' Jamba has no Mamba-2 layer",
            description="Mamba-2 (SSD: a scalar decay per head, gated RMSNorm)",
        ),
    )
}

FEED_FORWARDS: dict[str, FeedForward] = {
    f.symbol: f
    for f in (
        FeedForward(
            symbol="",
            name="dense",
            module="mlp:SwiGLU",
            params=lambda cfg: (3 * cfg.hidden_size * cfg.intermediate_size,) * 2,
            act_units=lambda cfg: cfg.hidden_size + 4 * cfg.intermediate_size,
        ),
        FeedForward(
            symbol="E",
            name="moe",
            module="moe:SparseMoE",
            params=lambda cfg: (
                cfg.hidden_size * cfg.num_experts
                + cfg.num_experts * 3 * cfg.hidden_size * cfg.intermediate_size,
                cfg.hidden_size * cfg.num_experts
                + cfg.num_experts_per_tok * 3 * cfg.hidden_size * cfg.intermediate_size,
            ),
            # router input; per routed row: input, gate_up out, silu, product, output (balanced routing)
            act_units=lambda cfg: (
                cfg.hidden_size + cfg.num_experts_per_tok * (2 * cfg.hidden_size + 4 * cfg.intermediate_size)
            ),
        ),
    )
}

ATTENTION = "*"  # the periods notation places this mixer at i % attn_layer_period == attn_layer_offset ...
PERIODS_OTHER = "M"  # ... and this one everywhere else (transformers' Jamba knows only these two)
# activation_checkpointing: nothing, every layer, the layers of one mixer, or the MoE layers
CHECKPOINT_CHOICES = ("none", "full", *(m.name for m in MIXERS.values()), "moe")
MIXER_NAMES = {m.name: m for m in MIXERS.values()}


def mixer_named(name: str) -> Mixer:
    if name not in MIXER_NAMES:
        raise ValueError(f"unknown mixer {name!r}; choose from {', '.join(MIXER_NAMES)}")
    return MIXER_NAMES[name]


def checkpointed(mode: str, mixer: str, moe: bool) -> bool:
    """Whether activation_checkpointing=`mode` recomputes a layer with this mixer (name) and feed-forward."""
    return mode == "full" or mode == mixer or (mode == "moe" and moe)


def symbols_help() -> str:
    """The pattern alphabet, for error messages and docs."""
    mix = ", ".join(f"{s!r} ({m.name})" for s, m in MIXERS.items())
    return f"a mixer {mix}, each optionally followed by 'E' (MoE feed-forward)"
