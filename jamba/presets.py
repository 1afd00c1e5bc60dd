"""Named model flavors (torchtitan style): always a tiny debug one, the paper's sizes, and `bench`."""

from __future__ import annotations

from .config import JambaConfig

PRESETS: dict[str, dict] = {
    # A CPU step (seq 256 x batch 4, forward+backward) in well under a second; still a 1:7 hybrid with MoE.
    "debug": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        attn_layer_period=8,
        attn_layer_offset=4,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=16,
        max_position_embeddings=4096,
    ),
    # Paper ablations (arXiv 2403.19887 sec. 6): 1.3B dense hybrids on 250B tokens, 7B on 50B tokens.
    # The paper does not list every width; these are the sizes that land on the quoted totals.
    "ablation-1.3b": dict(
        vocab_size=65536,
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_experts=1,
        num_experts_per_tok=1,
    ),
    "ablation-7b": dict(
        vocab_size=65536,
        hidden_size=4096,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_experts=1,
        num_experts_per_tok=1,
    ),
    # Jamba v0.1: 52B total / 12B active (the transformers defaults).
    "jamba-v0.1": dict(
        vocab_size=65536,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_experts=16,
        num_experts_per_tok=2,
    ),
    # The fixed GPU benchmark config (2.47B parameters): do not change, figures compare across sessions.
    "bench": dict(
        vocab_size=65536,
        hidden_size=2048,
        intermediate_size=4096,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        attn_layer_period=8,
        attn_layer_offset=4,
        expert_layer_period=2,
        expert_layer_offset=1,
        tie_word_embeddings=False,
    ),
    # The 426M config of the GPU issue's baseline table.
    "bench-426m": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        attn_layer_period=8,
        attn_layer_offset=4,
        expert_layer_period=2,
        expert_layer_offset=1,
    ),
}


def get_preset(name: str, **overrides) -> JambaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return JambaConfig(**{**PRESETS[name], **overrides, "extra": {"preset": name}})
