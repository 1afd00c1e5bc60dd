"""The Mamba-2 mixer (pattern symbol 'S'): one input projection to z, x, B, C and dt, a causal depthwise conv
over x, B and C, the SSD scan (jamba/mamba2_ssd.py: a scalar decay per head, B and C shared by a group of
heads), a gated RMSNorm (y * silu(z), normalised over each group) and the output projection. Parameter
names follow mamba-ssm's Mamba2 (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj). Not exportable to
transformers' Jamba, which has no Mamba-2 layer (jamba/layers.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import JambaConfig
from .mamba2_ssd import TORCH_CHUNK, ssd, ssd_backend, ssd_chunked, ssd_sequential
from .scan import causal_conv1d, causal_conv1d_ref


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) over groups of the channels, in fp32 (mamba-ssm's norm_before_gate=False)."""

    def __init__(self, dim: int, groups: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.groups, self.eps = groups, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = (y.float() * F.silu(z.float())).unflatten(-1, (self.groups, -1))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * g.flatten(-2)).to(y.dtype)


@dataclass
class Mamba2Cache:
    """What generation keeps per layer: the conv's last d_conv - 1 inputs and the SSD state (fp32)."""

    conv: torch.Tensor  # [b, d_inner + 2 groups d_state, d_conv - 1]
    ssm: torch.Tensor  # [b, heads, head_dim, d_state]
    seen: int = 0


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: JambaConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.mamba_d_inner
        self.d_inner, self.head_dim, self.groups = d, cfg.mamba2_head_dim, cfg.mamba2_n_groups
        self.n_heads, self.d_state = d // cfg.mamba2_head_dim, cfg.mamba2_d_state
        self.conv_dim = d + 2 * self.groups * self.d_state
        self.in_proj = nn.Linear(h, d + self.conv_dim + self.n_heads, bias=cfg.mamba_proj_bias)  # z, xBC, dt
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=cfg.mamba_d_conv,
            groups=self.conv_dim,
            padding=cfg.mamba_d_conv - 1,
            bias=cfg.mamba_conv_bias,
        )
        # placeholders: jamba/layers.py's init sets them (A in [1, 16], dt log-uniform)
        self.dt_bias = nn.Parameter(torch.zeros(self.n_heads))
        self.A_log = nn.Parameter(torch.zeros(self.n_heads))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = GatedRMSNorm(d, self.groups, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(d, h, bias=cfg.mamba_proj_bias)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        # the PyTorch reference until jamba.runtime.apply_runtime hands over the run's backends (set_backends)
        self.scan_backend, self.conv_backend = "torch", "torch"

    def set_backends(self, backends, runtime) -> str:
        """The run's conv, and the SSD scan for its device (mamba-ssm's kernels on CUDA where importable);
        returns the SSD backend for the kernel log."""
        self.scan_backend = ssd_backend(backends.device, runtime.use_kernels)
        self.conv_backend = backends.conv
        return self.scan_backend

    def new_cache(self, batch_size: int, max_len: int, device, dtype) -> Mamba2Cache:
        w = self.conv1d.kernel_size[0]
        return Mamba2Cache(
            conv=torch.zeros(batch_size, self.conv_dim, w - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.n_heads, self.head_dim, self.d_state, device=device),
        )

    def forward(self, hidden_states: torch.Tensor, cache: Mamba2Cache | None = None) -> torch.Tensor:
        b, L, _ = hidden_states.shape
        z, xBC, dt = torch.split(
            self.in_proj(hidden_states), [self.d_inner, self.conv_dim, self.n_heads], dim=-1
        )
        weight = self.conv1d.weight.squeeze(1)
        if cache is None:
            xBC = causal_conv1d(xBC.transpose(1, 2).contiguous(), weight, self.conv1d.bias, self.conv_backend)
        else:  # the conv over (the cached inputs, these), keeping these outputs; the cache keeps the last inputs
            seq = torch.cat([cache.conv.to(xBC.dtype), xBC.transpose(1, 2)], dim=-1)
            cache.conv.copy_(seq[..., seq.shape[-1] - cache.conv.shape[-1] :])
            xBC = causal_conv1d_ref(seq, weight, self.conv1d.bias)[..., -L:]
        xBC = xBC.transpose(
            1, 2
        ).contiguous()  # [b, L, conv_dim], channels contiguous as the SSD kernel wants
        x, B, C = torch.split(xBC, [self.d_inner, self.groups * self.d_state, self.groups * self.d_state], -1)
        x = x.unflatten(-1, (self.n_heads, self.head_dim))
        B, C = B.unflatten(-1, (self.groups, self.d_state)), C.unflatten(-1, (self.groups, self.d_state))
        A = -torch.exp(self.A_log.float())
        if cache is None:
            y = ssd(x, dt, A, B, C, self.D.float(), self.dt_bias.float(), self.scan_backend)
        else:
            y = self._cached_scan(x, dt, A, B, C, cache)
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y)

    def _cached_scan(self, x, dt, A, B, C, cache: Mamba2Cache) -> torch.Tensor:
        dt = F.softplus(dt.float() + self.dt_bias.float())
        run = ssd_sequential if x.shape[1] < TORCH_CHUNK else ssd_chunked
        y, cache.ssm = run(x, dt, A, B, C, state=cache.ssm)
        cache.seen += x.shape[1]
        return (y + x.float() * self.D.float()[:, None]).to(x.dtype)
