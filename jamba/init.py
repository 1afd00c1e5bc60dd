"""Weight initialisation, Mamba practice for the SSM parameters.

Differences from transformers' `_init_weights` (documented in README):
  - dt_proj.bias: inverse softplus of dt ~ log-uniform[dt_min, dt_max] (transformers: zeros, i.e. dt=0.69);
  - dt_proj.weight: uniform(+-dt_rank^-0.5) (transformers: normal(0.02));
  - conv1d: PyTorch's default kaiming-uniform, as mamba-ssm (transformers: normal(0.02));
  - residual output projections (o_proj, out_proj, down_proj, experts' down_proj): std / sqrt(2 * layers),
    GPT-2/Megatron practice, so the residual stream does not grow with depth.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import JambaConfig
from .experts import Experts
from .mamba import MambaMixer
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

    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, MambaMixer):
            d, n, r = mod.d_inner, mod.d_state, mod.dt_rank
            mod.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1))
            mod.D.fill_(1.0)
            bound = r**-0.5
            mod.dt_proj.weight.copy_((torch.rand(mod.dt_proj.weight.shape, generator=gen) * 2 - 1) * bound)
            u = torch.rand(d, generator=gen)
            dt = torch.exp(
                u * (math.log(cfg.mamba_dt_max) - math.log(cfg.mamba_dt_min)) + math.log(cfg.mamba_dt_min)
            )
            dt = dt.clamp(min=cfg.mamba_dt_init_floor)
            mod.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            w = mod.conv1d.weight
            fan_in = w.shape[1] * w.shape[2]
            b = 1 / math.sqrt(fan_in)
            w.copy_((torch.rand(w.shape, generator=gen) * 2 - 1) * b)  # kaiming-uniform(a=sqrt 5) bound
            if mod.conv1d.bias is not None:
                mod.conv1d.bias.copy_((torch.rand(mod.conv1d.bias.shape, generator=gen) * 2 - 1) * b)
        elif isinstance(mod, Experts):
            normal_(mod.gate_up_proj, std)
            normal_(mod.down_proj, out_std)
        elif isinstance(mod, nn.Linear):
            if name.endswith("dt_proj"):
                continue  # done with its mixer
            normal_(mod.weight, out_std if leaf in _RESIDUAL_OUT else std)
            if mod.bias is not None:
                mod.bias.zero_()
        elif isinstance(mod, nn.Embedding):
            normal_(mod.weight, std)
        elif isinstance(mod, RMSNorm):
            mod.weight.fill_(1.0)
