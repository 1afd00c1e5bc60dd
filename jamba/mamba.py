"""The Mamba-1 mixer with Jamba's RMSNorms on dt, B and C (added in the paper after loss spikes at 7B).

Parameter names and shapes follow transformers' JambaMambaMixer so weights load unchanged.
A_log, D and dt_proj.bias are used in fp32 whatever the module dtype (bf16 instability otherwise).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import JambaConfig
from .norm import RMSNorm
from .scan import causal_conv1d, conv_backend, resolve_scan_backend, selective_scan


class MambaMixer(nn.Module):
    def __init__(self, cfg: JambaConfig) -> None:
        super().__init__()
        h, d, n, r = cfg.hidden_size, cfg.mamba_d_inner, cfg.mamba_d_state, cfg.mamba_dt_rank
        self.d_inner, self.d_state, self.dt_rank = d, n, r
        self.in_proj = nn.Linear(h, 2 * d, bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            d,
            d,
            kernel_size=cfg.mamba_d_conv,
            groups=d,
            padding=cfg.mamba_d_conv - 1,
            bias=cfg.mamba_conv_bias,
        )
        self.x_proj = nn.Linear(d, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, d, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = nn.Linear(d, h, bias=cfg.mamba_proj_bias)
        self.dt_layernorm = RMSNorm(r, eps=cfg.rms_norm_eps)
        self.b_layernorm = RMSNorm(n, eps=cfg.rms_norm_eps)
        self.c_layernorm = RMSNorm(n, eps=cfg.rms_norm_eps)
        self.use_kernels = cfg.use_kernels
        # chosen once, for the device this process trains on (CPU tensors always take the PyTorch scan)
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self.scan_backend = resolve_scan_backend(
            cfg.scan_backend if cfg.use_kernels else "torch", device_type
        )
        self.conv_backend = conv_backend(device_type, cfg.use_kernels)
        self.scan_chunk, self.scan_block = cfg.scan_chunk_size, cfg.scan_block_size
        for p in (self.A_log, self.D, self.dt_proj.bias):
            p._no_weight_decay = True  # read by the optimizer's param groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, L, _ = x.shape
        # in_proj computed channel-major, W @ x^T = [2d, b*L], then viewed as [b, 2d, L] (strides L, b*L, 1):
        # every row is contiguous in time, which is all the conv and scan kernels need, so u and z reach
        # them without the transposing copies that [b, L, 2d] -> [b, 2d, L] costs (forward and backward).
        xz = torch.matmul(self.in_proj.weight, x.reshape(b * L, -1).t())
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(xz.dtype)[:, None]
        u, z = xz.view(-1, b, L).permute(1, 0, 2).chunk(2, dim=1)
        u = causal_conv1d(u, self.conv1d.weight.squeeze(1), self.conv1d.bias, backend=self.conv_backend)
        dbc = self.x_proj(u.transpose(1, 2))  # [b, L, r + 2n]
        dt, B, C = torch.split(dbc, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # The norms return fp32 under autocast (fp32 weights); the CUDA scan wants B, C in u's dtype.
        dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B).to(u.dtype), self.c_layernorm(C).to(u.dtype)
        delta = self.dt_proj.weight @ dt.transpose(1, 2)  # bias is added in fp32 inside the scan
        A = -torch.exp(self.A_log.float())
        y = selective_scan(
            u,
            delta,
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            self.D.float(),
            z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            use_kernel=self.use_kernels,
            backend=self.scan_backend,
            chunk_size=self.scan_chunk,
            block_size=self.scan_block,
        )
        # y is in u's dtype: x's, or bf16 under autocast (no fp32 round trip before out_proj)
        return self.out_proj(y.transpose(1, 2))
