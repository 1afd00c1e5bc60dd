"""The dense SwiGLU feed-forward (transformers' JambaMLP layout: gate_proj, up_proj, down_proj)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .chunks import checkpointed_chunks
from .config import JambaConfig


class SwiGLU(nn.Module):
    def __init__(self, cfg: JambaConfig) -> None:
        super().__init__()
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)
        self.chunk = 0  # runtime.ff_chunk_size (jamba/runtime.py)

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.chunk
        if not c or x.shape[:-1].numel() <= c or not (torch.is_grad_enabled() and x.requires_grad):
            return self._ff(x)
        y = checkpointed_chunks(self._ff, c, x.reshape(-1, x.shape[-1]))
        return y.view(*x.shape[:-1], -1)
