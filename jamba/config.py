"""The model config: every field of transformers' JambaConfig plus the layout and residual dtype.

Validation happens at construction so a bad config fails before any tensor is allocated,
with a message naming the offending field.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field

from .layers import ATTENTION, CHECKPOINT_CHOICES, FEED_FORWARDS, MIXERS, PERIODS_OTHER, symbols_help

# One layer = a mixer symbol of jamba/layers.py ('M' Mamba, '*' attention, as in Megatron's hybrid pattern)
# optionally followed by a feed-forward symbol ('E': mixture of experts). Spaces and '|' are ignored.
_LAYER_RE = re.compile(
    "([" + re.escape("".join(MIXERS)) + "])(" + "|".join(re.escape(f) for f in FEED_FORWARDS if f) + ")?"
)
__all__ = [
    "CHECKPOINT_CHOICES",
    "JambaConfig",
    "parse_pattern",
    "pattern_from_periods",
    "periods_from_pattern",
]
# Keys older model_config.json files hold that are runtime settings now (jamba/runtime.py, the trainer's
# `runtime` and `parallel` groups): ignored on load.
MOVED_TO_RUNTIME = (
    "activation_checkpointing",
    "use_kernels",
    "scan_backend",
    "scan_chunk_size",
    "scan_block_size",
    "loss_chunk_size",
    "ff_chunk_size",
)
log = logging.getLogger("jamba.config")


@dataclass
class JambaConfig:
    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    # Layout, transformers style: attention where i % period == offset, Mamba elsewhere, MoE likewise. An input
    # form only: the layout is `pattern`, and a saved config holds the pattern alone (periods None).
    attn_layer_period: int | None = 8
    attn_layer_offset: int | None = 4
    expert_layer_period: int | None = 2
    expert_layer_offset: int | None = 1
    # Layout, pattern style (overrides the periods when set), e.g. "MMEMME*MEMME" (jamba/layers.py's symbols)
    layer_pattern: str | None = None
    num_experts: int = 16
    num_experts_per_tok: int = 2
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_dt_min: float = 0.001
    mamba_dt_max: float = 0.1
    mamba_dt_init_floor: float = 1e-4
    # Mamba-2 layers ('S'): they share mamba_expand, mamba_d_conv, the biases and the dt range with Mamba-1
    mamba2_d_state: int = 128  # Mamba-2 state size per head (N)
    mamba2_head_dim: int = 64  # Mamba-2 head width (P): mamba_d_inner / mamba2_head_dim heads
    mamba2_n_groups: int = 1  # Mamba-2 groups sharing B and C (1: all heads share them)
    rms_norm_eps: float = 1e-6
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    max_position_embeddings: int = 262144
    attention_dropout: float = 0.0
    use_rope: bool = False
    rope_theta: float = 10000.0
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    # Under autocast (fp32 weights) the residual stream is fp32, as mamba-ssm's residual_in_fp32. False keeps it
    # in the autocast dtype (bf16, as Megatron's default and transformers in bf16): half the memory of the
    # checkpointed layer inputs, which is what grows with context length. No effect without autocast.
    residual_in_fp32: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes (preset name, ...), never read by the model

    def __post_init__(self) -> None:
        if self.mamba_dt_rank == "auto" or self.mamba_dt_rank is None:
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        self.validate()

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, fld: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"JambaConfig.{fld}: {msg}")

        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "num_experts",
            "num_experts_per_tok",
            "mamba_d_state",
            "mamba_d_conv",
            "mamba_expand",
        ):
            v = getattr(self, name)
            need(
                isinstance(v, int) and not isinstance(v, bool) and v > 0,
                name,
                f"must be a positive int, got {v!r}",
            )
        need(
            isinstance(self.mamba_dt_rank, int) and self.mamba_dt_rank > 0,
            "mamba_dt_rank",
            f"must be 'auto' or a positive int, got {self.mamba_dt_rank!r}",
        )
        for kind in ("attn", "expert"):
            period, offset = getattr(self, f"{kind}_layer_period"), getattr(self, f"{kind}_layer_offset")
            if self.layer_pattern is not None and period is None and offset is None:
                continue  # a saved config: the pattern alone
            need(
                isinstance(period, int) and not isinstance(period, bool) and period > 0,
                f"{kind}_layer_period",
                f"must be a positive int (or, with layer_pattern set, None), got {period!r}",
            )
            need(
                isinstance(offset, int) and 0 <= offset < period,
                f"{kind}_layer_offset",
                f"must be in [0, {kind}_layer_period={period}), got {offset!r}",
            )
        need(
            self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            f"{self.num_attention_heads} heads do not divide hidden_size={self.hidden_size}",
        )
        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"{self.num_key_value_heads} KV heads do not divide num_attention_heads={self.num_attention_heads}",
        )
        need(
            self.num_experts == 1 or self.num_experts_per_tok <= self.num_experts,
            "num_experts_per_tok",
            f"top-k={self.num_experts_per_tok} exceeds num_experts={self.num_experts}",
        )
        need(self.hidden_act == "silu", "hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(
            0 < self.mamba_dt_min <= self.mamba_dt_max,
            "mamba_dt_min",
            "need 0 < mamba_dt_min <= mamba_dt_max",
        )
        need(
            self.router_aux_loss_coef >= 0 and self.router_z_loss_coef >= 0,
            "router_aux_loss_coef",
            "router loss coefficients must be >= 0",
        )
        if self.use_rope:
            need(
                (self.hidden_size // self.num_attention_heads) % 2 == 0,
                "use_rope",
                "RoPE needs an even head dim",
            )
        if self.layer_pattern is not None:
            layers = parse_pattern(self.layer_pattern)
            need(
                len(layers) == self.num_hidden_layers,
                "layer_pattern",
                f"describes {len(layers)} layers but num_hidden_layers={self.num_hidden_layers}",
            )
            if any(moe for _, moe in layers):
                need(self.num_experts > 1, "layer_pattern", "has MoE layers ('E') but num_experts=1")
        for symbol in sorted({m for m, _ in self.layers}):  # each mixer in use checks its own fields
            for fld, problem in MIXERS[symbol].check(self) if MIXERS[symbol].check else ():
                need(False, fld, problem)

    # ---- layout -----------------------------------------------------------------------------
    @property
    def layers(self) -> list[tuple[str, bool]]:
        """(mixer symbol, MoE feed-forward) per layer, whichever form the layout was written in."""
        if self.layer_pattern is not None:
            return [(m, moe and self.num_experts > 1) for m, moe in parse_pattern(self.layer_pattern)]
        return parse_pattern(
            pattern_from_periods(
                self.num_hidden_layers,
                self.attn_layer_period,
                self.attn_layer_offset,
                self.expert_layer_period,
                self.expert_layer_offset,
                moe=self.num_experts > 1,
            )
        )

    @property
    def layers_block_type(self) -> list[str]:
        """The mixer's registry name per layer ('attention', 'mamba', 'mamba2', ...)."""
        return [MIXERS[m].name for m, _ in self.layers]

    @property
    def layers_is_moe(self) -> list[bool]:
        return [moe for _, moe in self.layers]

    @property
    def pattern(self) -> str:
        """The layout as a pattern string, whichever form the config was written in."""
        return "".join(m + ("E" if e else "") for m, e in self.layers)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    # ---- conversion -------------------------------------------------------------------------
    def replace(self, **changes) -> JambaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """What model_config.json holds: one layout, the pattern (the periods are None)."""
        d = dataclasses.asdict(self)
        d["layer_pattern"] = self.pattern
        for k in ("attn_layer_period", "attn_layer_offset", "expert_layer_period", "expert_layer_offset"):
            d[k] = None
        return d

    def __eq__(self, other: object) -> bool:
        """Equal when they describe the same model: a layout written as periods equals its pattern."""
        return isinstance(other, JambaConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable, as a dataclass with eq

    @classmethod
    def from_dict(cls, d: dict) -> JambaConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        moved = sorted(k for k in d if k in MOVED_TO_RUNTIME)
        if (
            moved
        ):  # written before these became runtime settings (jamba/runtime.py): not the weights' business
            log.info(
                "model config: ignoring %s (runtime settings now, not part of the model)", ", ".join(moved)
            )
            d = {k: v for k, v in d.items() if k not in MOVED_TO_RUNTIME}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"JambaConfig: unknown keys {unknown}")
        return cls(**d)


def parse_pattern(pattern: str) -> list[tuple[str, bool]]:
    """'M*E ME' -> [('M', False), ('*', True), ('M', True)]; errors name the bad position."""
    s = pattern.replace(" ", "").replace("|", "")
    out, pos = [], 0
    while pos < len(s):
        m = _LAYER_RE.match(s, pos)
        if m is None:
            raise ValueError(
                f"JambaConfig.layer_pattern: unexpected {s[pos]!r} at position {pos} of {pattern!r}; "
                f"use {symbols_help()}"
            )
        out.append((m.group(1), m.group(2) == "E"))
        pos = m.end()
    if not out:
        raise ValueError("JambaConfig.layer_pattern: empty pattern")
    return out


def pattern_from_periods(
    num_layers: int,
    attn_period: int,
    attn_offset: int,
    expert_period: int,
    expert_offset: int,
    moe: bool = True,
    mixer: str = PERIODS_OTHER,
) -> str:
    """The pattern of a periods layout: attention at i % attn_period == attn_offset, `mixer` elsewhere."""
    return "".join(
        (ATTENTION if i % attn_period == attn_offset else mixer)
        + ("E" if moe and i % expert_period == expert_offset else "")
        for i in range(num_layers)
    )


def periods_from_pattern(pattern: str) -> dict | None:
    """The smallest (period, offset) pairs reproducing the pattern, or None if no such pairs exist.

    transformers' config can only express periodic layouts, so export needs this.
    """
    layers = parse_pattern(pattern)
    n = len(layers)
    if any(m not in (ATTENTION, PERIODS_OTHER) for m, _ in layers):
        return None  # transformers' periods place only attention and Mamba-1

    def find(flags: list[bool]) -> tuple[int, int] | None:
        if not any(flags):
            return (n + 1, n) if n >= 1 else None  # offset never reached
        for period in range(n, 0, -1):  # the largest period reads most like the paper's (8, 4)
            for offset in range(period):
                if all(flags[i] == (i % period == offset) for i in range(n)):
                    return period, offset
        return None

    attn = find([m == ATTENTION for m, _ in layers])
    exp = find([e for _, e in layers])
    if attn is None or exp is None:
        return None
    return {
        "attn_layer_period": attn[0],
        "attn_layer_offset": attn[1],
        "expert_layer_period": exp[0],
        "expert_layer_offset": exp[1],
        "has_moe": any(e for _, e in layers),
    }
