"""Grouped-query causal self-attention. No positional encoding by default (Jamba's Mamba layers
carry position); RoPE is an ablation knob. SDPA picks flash attention on GPU.

Generation: `new_cache` gives a KV cache; `forward(x, cache=...)` then takes the next tokens only, stores
their keys and values and attends over everything cached (the interface every mixer follows)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import JambaConfig


def rope_cos_sin(
    seq_len: int, head_dim: int, theta: float, device, dtype, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of positions start .. start + seq_len - 1."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(start, start + seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far (before the grouped-query expansion)."""

    k: torch.Tensor  # [b, n_kv, max_len, head_dim]
    v: torch.Tensor
    length: int = 0  # tokens stored


class Attention(nn.Module):
    def __init__(self, cfg: JambaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.use_rope, self.rope_theta = cfg.use_rope, cfg.rope_theta
        self.dropout = cfg.attention_dropout

    def new_cache(self, batch_size: int, max_len: int, device, dtype) -> KVCache:
        shape = (batch_size, self.n_kv, max_len, self.head_dim)
        return KVCache(
            torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        )

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        start = 0 if cache is None else cache.length
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if self.use_rope:
            cos, sin = rope_cos_sin(t, self.head_dim, self.rope_theta, x.device, q.dtype, start)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            return self.o_proj(self._attend_cached(q, k, v, cache).transpose(1, 2).reshape(b, t, -1))
        if self.n_kv != self.n_heads:
            # Expanding KV is a view-then-copy; flash/efficient SDPA kernels accept the expanded heads.
            rep = self.n_heads // self.n_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))

    def _attend_cached(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """Store k, v after the cached tokens; q's tokens attend to every earlier token and themselves."""
        start, t = cache.length, q.shape[2]
        if start + t > cache.k.shape[2]:
            raise ValueError(f"KV cache full: it holds {cache.k.shape[2]} tokens, {start} + {t} asked")
        cache.k[:, :, start : start + t] = k
        cache.v[:, :, start : start + t] = v
        cache.length = end = start + t
        k, v = cache.k[:, :, :end].to(q.dtype), cache.v[:, :, :end].to(q.dtype)
        mask, causal = None, False
        if t > 1 and start == 0:
            causal = True
        elif t > 1:  # query i sits at position start + i
            pos = torch.arange(end, device=q.device)
            mask = pos[None, :] <= (start + torch.arange(t, device=q.device))[:, None]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv != self.n_heads
        )
