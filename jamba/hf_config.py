"""transformers' Jamba `config.json` <-> our JambaConfig: the fields both know, ours kept as extra keys,
transformers-only runtime keys ignored, and an error for anything that would change the architecture."""

from __future__ import annotations

from collections.abc import Mapping

from .config import JambaConfig, periods_from_pattern
from .layers import MIXERS

HF_ARCHITECTURE = "JambaForCausalLM"

# Fields with the same name and meaning in both configs.
SHARED_FIELDS = (
    "vocab_size",
    "tie_word_embeddings",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "initializer_range",
    "rms_norm_eps",
    "router_aux_loss_coef",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "max_position_embeddings",
    "attention_dropout",
    "num_experts_per_tok",
    "num_experts",
    "expert_layer_period",
    "expert_layer_offset",
    "attn_layer_period",
    "attn_layer_offset",
    "mamba_d_state",
    "mamba_d_conv",
    "mamba_expand",
    "mamba_dt_rank",
    "mamba_conv_bias",
    "mamba_proj_bias",
)
_PERIODS = ("attn_layer_period", "attn_layer_offset", "expert_layer_period", "expert_layer_offset")
# Ours only, but worth keeping with the weights (initialisation / training loss). transformers keeps
# unknown config keys as plain attributes and never reads these.
OURS_IN_HF = ("mamba_dt_min", "mamba_dt_max", "mamba_dt_init_floor", "router_z_loss_coef")
# Keys transformers (4.x and 5.x) writes that do not change the weights or the forward pass.
HF_IGNORED_KEYS = frozenset(
    {
        "model_type",
        "architectures",
        "transformers_version",
        "_name_or_path",
        "_commit_hash",
        "auto_map",
        "dtype",
        "torch_dtype",
        "use_cache",
        "output_router_logits",
        "use_mamba_kernels",
        "use_mambapy",
        "use_associative_scan",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "torchscript",
        "use_bfloat16",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "is_decoder",
        "add_cross_attention",
        "cross_attention_hidden_size",
        "tie_encoder_decoder",
        "id2label",
        "label2id",
        "problem_type",
        "finetuning_task",
        "tokenizer_class",
        "prefix",
        "sep_token_id",
        "decoder_start_token_id",
        "task_specific_params",
        "pruned_heads",
        "tf_legacy_loss",
        "num_logits_to_keep",
        "calc_logits_for_entire_prompt",
        "n_ctx",
        "_attn_implementation",
        "attn_implementation",
        # generation defaults that older transformers stored in config.json
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "output_scores",
        "return_dict_in_generate",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
        # positional settings transformers' Jamba attention never reads (it has no positional encoding)
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
    }
)


# ---- config ---------------------------------------------------------------------------------------
def config_to_hf(cfg: JambaConfig, use_mamba_kernels: bool | None = None) -> dict:
    """A transformers JambaConfig dict (what `config.json` holds) describing the same weights and forward.

    transformers places layers by (period, offset) only, so a `layer_pattern` must be periodic. Runtime
    knobs (checkpointing, chunk sizes) are not written; `use_mamba_kernels` defaults to True.
    """
    if cfg.use_rope:
        raise ValueError(
            "config_to_hf: use_rope=True cannot be exported: transformers' Jamba attention has "
            "no positional encoding, the exported model would compute something else"
        )
    for i, (symbol, _) in enumerate(cfg.layers):
        if MIXERS[symbol].hf_name is None:  # the registry says why (jamba/layers.py)
            raise ValueError(
                f"config_to_hf: layer {i} is a {MIXERS[symbol].name} layer ({symbol!r} in {cfg.pattern!r}): not "
                f"exportable, because {MIXERS[symbol].not_exportable}"
            )
    d = {"model_type": "jamba", "architectures": [HF_ARCHITECTURE]}
    d.update({k: getattr(cfg, k) for k in SHARED_FIELDS})
    if cfg.layer_pattern is not None:  # the layout; the period fields beside it are None or stale
        periods = periods_from_pattern(cfg.pattern)
        if periods is None:
            raise ValueError(
                f"config_to_hf: layer_pattern {cfg.pattern!r} is not periodic; transformers' JambaConfig "
                "can only place attention at i % attn_layer_period == attn_layer_offset and experts at "
                "i % expert_layer_period == expert_layer_offset, so this layout cannot be exported"
            )
        d.update({k: periods[k] for k in _PERIODS})
    # Re-derive the layout exactly as transformers does and compare: export must never move a layer.
    n = cfg.num_hidden_layers
    hf_attn = [i % d["attn_layer_period"] == d["attn_layer_offset"] for i in range(n)]
    hf_moe = [
        cfg.num_experts > 1 and i % d["expert_layer_period"] == d["expert_layer_offset"] for i in range(n)
    ]
    if hf_attn != [t == "attention" for t in cfg.layers_block_type] or hf_moe != cfg.layers_is_moe:
        raise ValueError(
            f"config_to_hf: could not express the layout {cfg.pattern!r} with periods and offsets"
        )
    d.update({k: getattr(cfg, k) for k in OURS_IN_HF})
    # transformers 5.17's cache breaks on models without attention layers (DynamicCache.get_seq_length
    # raises), so a Mamba-only export defaults to use_cache=False.
    d.update(
        use_cache="attention" in cfg.layers_block_type,
        output_router_logits=False,
        use_mamba_kernels=True if use_mamba_kernels is None else bool(use_mamba_kernels),
        use_mambapy=False,
    )
    return d


def config_from_hf(d: Mapping, ignore_unknown: bool = False) -> JambaConfig:
    """Our JambaConfig from a transformers config dict.

    Keys that only steer transformers' runtime (use_cache, use_mamba_kernels, dtype, ...) are ignored.
    Keys that would change the architecture in a way we do not implement raise, as do keys we do not
    know at all (pass ignore_unknown=True to skip the latter)."""
    d = dict(d)
    if d.get("model_type", "jamba") != "jamba":
        raise ValueError(f"config_from_hf: model_type is {d['model_type']!r}, expected 'jamba'")
    arch = d.get("architectures")
    if arch and HF_ARCHITECTURE not in arch:
        raise ValueError(
            f"config_from_hf: architectures {arch} do not include {HF_ARCHITECTURE}; only the "
            "causal-LM weights can be loaded"
        )
    if "num_local_experts" in d:  # transformers' attribute_map alias
        alias = d.pop("num_local_experts")
        if "num_experts" in d and d["num_experts"] != alias:
            raise ValueError(
                f"config_from_hf: num_local_experts={alias} contradicts num_experts={d['num_experts']}"
            )
        d["num_experts"] = alias

    problems = []
    hidden = d.get("hidden_size", JambaConfig.hidden_size)
    heads = d.get("num_attention_heads", JambaConfig.num_attention_heads)
    if d.get("head_dim") is not None and d["head_dim"] * heads != hidden:
        problems.append(
            f"head_dim={d['head_dim']} (only hidden_size / num_attention_heads = {hidden // heads})"
        )
    if d.get("sliding_window") is not None:
        problems.append(f"sliding_window={d['sliding_window']} (only full causal attention)")
    if d.get("quantization_config") is not None:
        problems.append("quantization_config (quantized weights)")
    if d.get("mamba_inner_layernorms", True) is not True:  # pre-transformers remote-code configs
        problems.append("mamba_inner_layernorms=False (the dt/B/C norms are always present)")
    if "n_ctx" in d and "max_position_embeddings" not in d:  # remote-code name of the same field
        d["max_position_embeddings"] = d["n_ctx"]
    if d.get("num_key_value_heads", 0) is None:  # transformers: None means MHA
        d["num_key_value_heads"] = heads
    if problems:
        raise ValueError("config_from_hf: unsupported architecture settings: " + "; ".join(problems))
    for k in ("head_dim", "sliding_window", "quantization_config", "mamba_inner_layernorms"):
        d.pop(k, None)

    kwargs = {k: d.pop(k) for k in (*SHARED_FIELDS, *OURS_IN_HF) if k in d}
    unknown = sorted(k for k in d if k not in HF_IGNORED_KEYS)
    if unknown and not ignore_unknown:
        raise ValueError(
            f"config_from_hf: unknown keys {unknown}; they may change the architecture. "
            "Pass ignore_unknown=True if they are known to be harmless"
        )
    return JambaConfig(**kwargs)


# ---- state dicts ----------------------------------------------------------------------------------
