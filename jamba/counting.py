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
    Selective scan: SCAN_FLOPS_PER_STATE per (d_inner x d_state) element per token. Training = 3 x forward
    (backward = 2 x forward); no activation-recomputation FLOPs are counted (MFU, not HFU).
"""

from __future__ import annotations

from .config import JambaConfig

# Per state element and token: dA = exp(dt * A) (2), dt * u * B (1, dt * u is per channel), h = dA * h + dBu
# (2), y += C * h (2). The O(d_inner) terms (D skip, gate, softplus) are ignored.
SCAN_FLOPS_PER_STATE = 7


def _mamba_params(cfg: JambaConfig) -> dict[str, int]:
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


def _mamba_matmul_params(cfg: JambaConfig) -> int:
    h, d, n, r, w = cfg.hidden_size, cfg.mamba_d_inner, cfg.mamba_d_state, cfg.mamba_dt_rank, cfg.mamba_d_conv
    return h * 2 * d + d * w + d * (r + 2 * n) + r * d + d * h


def _attention_params(cfg: JambaConfig) -> int:
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return h * q + 2 * h * kv + q * h


def _expert_params(cfg: JambaConfig) -> int:
    """One expert (or the dense MLP): gate, up and down projections."""
    return 3 * cfg.hidden_size * cfg.intermediate_size


def _ffn_params(cfg: JambaConfig, moe: bool) -> tuple[int, int]:
    """(total, active) of one feed-forward; all of it is matmul weights."""
    expert = _expert_params(cfg)
    if not moe:
        return expert, expert
    router = cfg.hidden_size * cfg.num_experts
    return router + cfg.num_experts * expert, router + cfg.num_experts_per_tok * expert


def count_params(cfg: JambaConfig) -> dict:
    """{total, active, embedding, non_embedding, active_non_embedding, experts, lm_head, final_norm, per_layer}.

    `embedding`: the input embedding plus an untied lm_head (both vocab x hidden). `per_layer`: one dict
    per layer with kind ('attention'/'mamba'), moe, mixer, ffn, norms, total, active. `experts`: the expert
    weights of every MoE layer (what expert parallelism shards; the routers are not in it)."""
    h, v = cfg.hidden_size, cfg.vocab_size
    per_layer = []
    for i, (kind, moe) in enumerate(zip(cfg.layers_block_type, cfg.layers_is_moe, strict=True)):
        mixer = _attention_params(cfg) if kind == "attention" else sum(_mamba_params(cfg).values())
        ffn_total, ffn_active = _ffn_params(cfg, moe)
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
        "experts": sum(layer["moe"] for layer in per_layer) * cfg.num_experts * _expert_params(cfg),
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
    n_attn = n_mamba = 0
    for kind, moe in zip(cfg.layers_block_type, cfg.layers_is_moe, strict=True):
        if kind == "attention":
            n_attn += 1
            matmul_params += _attention_params(cfg)
        else:
            n_mamba += 1
            matmul_params += _mamba_matmul_params(cfg)
        matmul_params += _ffn_params(cfg, moe)[1]
    mult = 3 if training else 1
    attn_width = cfg.num_attention_heads * cfg.head_dim
    keys = seq_len / 2 if causal else seq_len  # mean number of keys a query attends to
    matmul = mult * 2 * matmul_params
    attention = mult * n_attn * 2 * 2 * keys * attn_width  # QK^T and AV, 2 FLOPs per MAC
    scan = mult * n_mamba * SCAN_FLOPS_PER_STATE * cfg.mamba_d_inner * cfg.mamba_d_state
    return {
        "matmul": matmul,
        "attention": attention,
        "selective_scan": scan,
        "total": matmul + attention + scan,
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
