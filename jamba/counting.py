"""Parameter and FLOP counts, analytically from a JambaConfig (no model is built).

Conventions (see docs/model.md):
  - `total` counts every parameter once (a tied lm_head is the embedding, counted once).
  - `active` is what one token uses: every non-MoE parameter plus, in MoE layers, the router and top-k of
    the E experts. Embeddings (input embedding and an untied lm_head) COUNT toward active, as toward
    total: that is the convention under which Jamba v0.1 is "52B total / 12B active" (51.6B / 12.1B;
    without embeddings it is 11.6B active). `active_non_embedding` and `non_embedding` are given too.
  - FLOPs per token: 2 per multiply-accumulate. Matmuls: 2 x the active matmul weights, always including
    the lm_head matmul (even when tied) but not the embedding lookup; the depthwise conv1d is counted as
    a matmul (one MAC per weight); biases, norms, activations, softmax and the router's top-k are ignored.
    Attention scores + values: 4 * seq_len * (heads * head_dim) per layer per token, halved for causal
    masking by default (`causal=False` gives PaLM's convention: training total = 6N + 12 * L * H * T).
    Selective scan: SCAN_FLOPS_PER_STATE per (d_inner x d_state) element per token (Mamba-2:
    SSD_FLOPS_PER_STATE per (d_inner x mamba2_d_state), on the recurrence). Each mixer's figures are its
    entry in jamba/layers.py. Training = 3 x forward (backward = 2 x forward); no activation-recomputation
    FLOPs are counted (MFU, not HFU).
"""

from __future__ import annotations

from .config import JambaConfig
from .layers import FEED_FORWARDS, MIXERS, SCAN_FLOPS_PER_STATE  # noqa: F401 - SCAN_FLOPS_PER_STATE: interface


def count_params(cfg: JambaConfig) -> dict:
    """{total, active, embedding, non_embedding, active_non_embedding, experts, lm_head, final_norm, per_layer}.

    `embedding`: the input embedding plus an untied lm_head (both vocab x hidden). `per_layer`: one dict
    per layer with kind (the mixer's registry name), moe, mixer, ffn, norms, total, active. `experts`: the
    expert weights of every MoE layer (what expert parallelism shards; the routers are not in it)."""
    h, v = cfg.hidden_size, cfg.vocab_size
    per_layer = []
    for i, (symbol, moe) in enumerate(cfg.layers):
        kind, mixer = MIXERS[symbol].name, MIXERS[symbol].params(cfg)
        ffn_total, ffn_active = FEED_FORWARDS["E" if moe else ""].params(cfg)
        norms = 2 * h  # input_layernorm, pre_ff_layernorm
        per_layer.append(
            {
                "index": i,
                "kind": kind,
                "moe": moe,
                "mixer": mixer,
                "ffn": ffn_total,
                "ffn_active": ffn_active,
                "norms": norms,
                "total": mixer + ffn_total + norms,
                "active": mixer + ffn_active + norms,
            }
        )
    lm_head = 0 if cfg.tie_word_embeddings else v * h
    embedding = v * h + lm_head
    final_norm = h
    layers_total = sum(layer["total"] for layer in per_layer)
    layers_active = sum(layer["active"] for layer in per_layer)
    return {
        "total": embedding + layers_total + final_norm,
        "active": embedding + layers_active + final_norm,
        "embedding": embedding,
        "non_embedding": layers_total + final_norm,
        "active_non_embedding": layers_active + final_norm,
        "experts": sum(layer["moe"] for layer in per_layer) * cfg.num_experts * 3 * h * cfg.intermediate_size,
        "lm_head": lm_head,
        "final_norm": final_norm,
        "per_layer": per_layer,
    }


def flops_per_token(cfg: JambaConfig, seq_len: int, training: bool = True, causal: bool = True) -> dict:
    """FLOPs per token of a forward (training=False) or forward + backward (training=True) pass.

    {matmul, attention, selective_scan, total, matmul_params, multiplier}; see the module docstring."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    matmul_params = cfg.vocab_size * cfg.hidden_size  # lm_head
    mixing = {m.flops_kind: 0.0 for m in MIXERS.values()}  # attention, selective_scan
    for symbol, moe in cfg.layers:
        spec = MIXERS[symbol]
        matmul_params += spec.matmul_params(cfg) + FEED_FORWARDS["E" if moe else ""].params(cfg)[1]
        mixing[spec.flops_kind] += spec.mixing_flops(cfg, seq_len, causal)
    mult = 3 if training else 1
    matmul = mult * 2 * matmul_params
    mixing = {k: mult * v for k, v in mixing.items()}
    return {
        "matmul": matmul,
        **mixing,
        "total": matmul + sum(mixing.values()),
        "matmul_params": matmul_params,
        "multiplier": mult,
    }


def mfu(
    tokens_per_s: float,
    cfg: JambaConfig,
    seq_len: int,
    peak_flops: float,
    training: bool = True,
    causal: bool = True,
) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware peak (e.g. 989e12 for H100 bf16
    dense, per GPU: pass per-GPU tokens/s or multiply the peak by the GPU count)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return (
        tokens_per_s * flops_per_token(cfg, seq_len, training=training, causal=causal)["total"] / peak_flops
    )
