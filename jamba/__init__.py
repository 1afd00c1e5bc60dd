"""Jamba: hybrid Transformer-Mamba mixture-of-experts language model (plain nn.Modules, no distributed code)."""

from .config import JambaConfig, parse_pattern, pattern_from_periods, periods_from_pattern
from .model import JambaForCausalLM, JambaOutput
from .presets import PRESETS, get_preset

__all__ = [
    "JambaConfig",
    "JambaForCausalLM",
    "JambaOutput",
    "PRESETS",
    "get_preset",
    "parse_pattern",
    "pattern_from_periods",
    "periods_from_pattern",
]
