"""The Mamba-1 mixer with Jamba's RMSNorms on dt, B and C (added in the paper after loss spikes at 7B).

Parameter names and shapes follow transformers' JambaMambaMixer so weights load unchanged.
A_log, D and dt_proj.bias are used in fp32 whatever the module dtype (bf16 instability otherwise).

Generation: `new_cache` gives a recurrent state (the conv's last d_conv - 1 inputs and the scan's state);
`forward(x, cache=...)` then takes the next tokens only, at a cost that does not grow with the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import JambaConfig
from .norm import RMSNorm
from .scan import _scan_block, causal_conv1d, selective_scan

try:  # mamba-ssm's one-token state update (Triton, CUDA only), optional
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
except Exception:  # noqa: BLE001 - any import failure means "not available"
    selective_state_update = None


@dataclass
class MambaCache:
    conv: torch.Tensor  # [b, d_inner, d_conv - 1]: the conv's last inputs (zeros before the first token)
    ssm: torch.Tensor  # [b, d_inner, d_state], fp32: the scan's state after the tokens seen
    length: int = 0  # tokens seen


def selective_state_step(h, u, delta, A, B, C, D, z, delta_bias) -> torch.Tensor:
    """One token of the selective scan, updating the state h [b, d, n] (fp32) in place; u, delta, z [b, d],
    B, C [b, n]. The same arithmetic as jamba.scan's reference (softplus of delta + bias)."""
    dt = F.softplus(delta.float() + delta_bias.float())
    h.mul_(torch.exp(dt.unsqueeze(-1) * A)).add_((dt * u.float()).unsqueeze(-1) * B.float().unsqueeze(1))
    y = (h @ C.float().unsqueeze(-1)).squeeze(-1) + D.float() * u.float()
    return (y * F.silu(z.float())).to(u.dtype)


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
        # the PyTorch reference until jamba.runtime.apply_runtime hands over the backends chosen for the run
        self.use_kernels, self.scan_backend, self.conv_backend = False, "torch", "torch"
        self.scan_chunk, self.scan_block = 16, 512
        for p in (self.A_log, self.D, self.dt_proj.bias):
            p._no_weight_decay = True  # read by the optimizer's param groups

    def new_cache(self, batch_size: int, max_len: int, device, dtype) -> MambaCache:
        """max_len is unused: the state does not grow with the context."""
        w = self.conv1d.weight.shape[-1]
        return MambaCache(
            conv=torch.zeros(batch_size, self.d_inner, w - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32),
        )

    def _conv_cached(self, u: torch.Tensor, cache: MambaCache) -> torch.Tensor:
        """SiLU(causal conv) of u [b, d, L] continuing from the cached inputs; keeps the last d_conv - 1."""
        window = torch.cat([cache.conv.to(u.dtype), u], dim=-1)
        keep = cache.conv.shape[-1]
        if keep:
            cache.conv.copy_(window[..., window.shape[-1] - keep :])
        if u.shape[-1] == 1:  # one token: a dot product per channel (conv1d costs ~1 ms a call on CPU)
            y = (window * self.conv1d.weight[:, 0].to(u.dtype)).sum(-1, keepdim=True)
            return F.silu(y if self.conv1d.bias is None else y + self.conv1d.bias.to(u.dtype)[:, None])
        return F.silu(F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner))

    def _scan_cached(self, u, delta, A, B, C, z, cache: MambaCache) -> torch.Tensor:
        """The scan from the cached state: one token by a state update (mamba-ssm's kernel on a GPU where
        installed), several (a prompt) by the chunked PyTorch scan started from that state, in blocks of
        scan_block_size tokens."""
        bias, D = self.dt_proj.bias.float(), self.D.float()
        if u.shape[-1] > 1:  # in blocks, as the training scan: its [b, block, d, n] tensors bound the memory
            ys, blk = [], self.scan_block
            for i in range(0, u.shape[-1], blk):
                u_, d_, b_, c_, z_ = (t[..., i : i + blk] for t in (u, delta, B, C, z))
                y, cache.ssm = _scan_block(u_, d_, A, b_, c_, D, z_, bias, cache.ssm, True, self.scan_chunk)
                ys.append(y)
            return torch.cat(ys, dim=-1)
        args = (u[..., 0], delta[..., 0], A, B[..., 0], C[..., 0], D, z[..., 0], bias)
        if selective_state_update is not None and u.is_cuda and self.use_kernels:
            y = selective_state_update(cache.ssm, *args[:7], dt_bias=bias, dt_softplus=True)
        else:
            y = selective_state_step(cache.ssm, *args)
        return y.unsqueeze(-1)

    def forward(self, x: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        b, L, _ = x.shape
        # in_proj computed channel-major, W @ x^T = [2d, b*L], then viewed as [b, 2d, L] (strides L, b*L, 1):
        # every row is contiguous in time, which is all the conv and scan kernels need, so u and z reach
        # them without the transposing copies that [b, L, 2d] -> [b, 2d, L] costs (forward and backward).
        xz = torch.matmul(self.in_proj.weight, x.reshape(b * L, -1).t())
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(xz.dtype)[:, None]
        u, z = xz.view(-1, b, L).permute(1, 0, 2).chunk(2, dim=1)
        if cache is None:
            u = causal_conv1d(u, self.conv1d.weight.squeeze(1), self.conv1d.bias, backend=self.conv_backend)
        else:
            u = self._conv_cached(u, cache)
        dbc = self.x_proj(u.transpose(1, 2))  # [b, L, r + 2n]
        dt, B, C = torch.split(dbc, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # The norms return fp32 under autocast (fp32 weights); the CUDA scan wants B, C in u's dtype.
        dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B).to(u.dtype), self.c_layernorm(C).to(u.dtype)
        delta = self.dt_proj.weight @ dt.transpose(1, 2)  # bias is added in fp32 inside the scan
        A = -torch.exp(self.A_log.float())
        if cache is not None:
            y = self._scan_cached(u, delta, A, B.transpose(1, 2), C.transpose(1, 2), z, cache)
            cache.length += L
            return self.out_proj(y.transpose(1, 2))
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
