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

# One layer = a mixer symbol ('M' Mamba, '*' attention, as in Megatron's hybrid pattern)
# optionally followed by 'E' when its feed-forward is a mixture of experts. Spaces and '|' are ignored.
_LAYER_RE = re.compile(r"([M*])(E?)")
CHECKPOINT_CHOICES = ("none", "full", "mamba", "attention", "moe")
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
    # Layout, transformers style: attention where i % period == offset, MoE likewise.
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    # Layout, pattern style (overrides the periods when set), e.g. "MMEMME*MEMME" ...
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
            "attn_layer_period",
            "expert_layer_period",
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
        need(
            0 <= self.attn_layer_offset < self.attn_layer_period,
            "attn_layer_offset",
            f"must be in [0, attn_layer_period={self.attn_layer_period}), got {self.attn_layer_offset}",
        )
        need(
            0 <= self.expert_layer_offset < self.expert_layer_period,
            "expert_layer_offset",
            f"must be in [0, expert_layer_period={self.expert_layer_period}), got {self.expert_layer_offset}",
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

    # ---- layout -----------------------------------------------------------------------------
    @property
    def layers_block_type(self) -> list[str]:
        """'attention' or 'mamba' per layer (transformers' name for it)."""
        if self.layer_pattern is not None:
            return ["attention" if m == "*" else "mamba" for m, _ in parse_pattern(self.layer_pattern)]
        return [
            "attention" if i % self.attn_layer_period == self.attn_layer_offset else "mamba"
            for i in range(self.num_hidden_layers)
        ]

    @property
    def layers_is_moe(self) -> list[bool]:
        if self.num_experts <= 1:
            return [False] * self.num_hidden_layers
        if self.layer_pattern is not None:
            return [moe for _, moe in parse_pattern(self.layer_pattern)]
        return [
            i % self.expert_layer_period == self.expert_layer_offset for i in range(self.num_hidden_layers)
        ]

    @property
    def pattern(self) -> str:
        """The layout as a pattern string, whichever form the config was written in."""
        return "".join(
            ("*" if t == "attention" else "M") + ("E" if e else "")
            for t, e in zip(self.layers_block_type, self.layers_is_moe, strict=False)
        )

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
        return dataclasses.asdict(self)

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
                "use 'M' (Mamba) or '*' (attention), each optionally followed by 'E' (MoE)"
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
) -> str:
    return "".join(
        ("*" if i % attn_period == attn_offset else "M")
        + ("E" if moe and i % expert_period == expert_offset else "")
        for i in range(num_layers)
    )


def periods_from_pattern(pattern: str) -> dict | None:
    """The smallest (period, offset) pairs reproducing the pattern, or None if no such pairs exist.

    transformers' config can only express periodic layouts, so export needs this.
    """
    layers = parse_pattern(pattern)
    n = len(layers)

    def find(flags: list[bool]) -> tuple[int, int] | None:
        if not any(flags):
            return (n + 1, n) if n >= 1 else None  # offset never reached
        for period in range(n, 0, -1):  # the largest period reads most like the paper's (8, 4)
            for offset in range(period):
                if all(flags[i] == (i % period == offset) for i in range(n)):
                    return period, offset
        return None

    attn = find([m == "*" for m, _ in layers])
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
