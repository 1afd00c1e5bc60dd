"""Weight initialisation, Mamba practice for the SSM parameters.

Differences from transformers' `_init_weights` (documented in README):
  - dt_proj.bias: inverse softplus of dt ~ log-uniform[dt_min, dt_max] (transformers: zeros, i.e. dt=0.69);
  - dt_proj.weight: uniform(+-dt_rank^-0.5) (transformers: normal(0.02));
  - conv1d: PyTorch's default kaiming-uniform, as mamba-ssm (transformers: normal(0.02));
  - each mixer's own parameters by its registry entry's init (jamba/layers.py);
  - residual output projections (o_proj, out_proj, down_proj, experts' down_proj): std / sqrt(2 * layers),
    GPT-2/Megatron practice, so the residual stream does not grow with depth.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import JambaConfig
from .experts import Experts
from .layers import MIXERS
from .norm import RMSNorm

_RESIDUAL_OUT = ("o_proj", "out_proj", "down_proj")


@torch.no_grad()
def init_weights(model: nn.Module, cfg: JambaConfig, seed: int | None = None) -> None:
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
    std = cfg.initializer_range
    out_std = std / math.sqrt(2 * cfg.num_hidden_layers)

    def normal_(t: torch.Tensor, s: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32) * s)

    def rand(shape) -> torch.Tensor:
        return torch.rand(shape, generator=gen)

    # each mixer's own init (jamba/layers.py), run where named_modules meets it, so the generator's draws keep
    # their order; the submodules it initialised are skipped afterwards
    own_init = {m.cls: m.init for m in MIXERS.values() if m.init is not None}
    done: set[int] = set()
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if id(mod) in done:
            continue
        if type(mod) in own_init:
            done.update(id(m) for m in own_init[type(mod)](mod, cfg, normal_, rand))
        elif isinstance(mod, Experts):
            normal_(mod.gate_up_proj, std)
            normal_(mod.down_proj, out_std)
        elif isinstance(mod, nn.Linear):
            normal_(mod.weight, out_std if leaf in _RESIDUAL_OUT else std)
            if mod.bias is not None:
                mod.bias.zero_()
        elif isinstance(mod, nn.Embedding):
            normal_(mod.weight, std)
        elif isinstance(mod, RMSNorm):
            mod.weight.fill_(1.0)
