"""Mamba-2's state-space dual (SSD) scan: a chunked PyTorch form (CPU, and the reference) and mamba-ssm's
Triton kernels (`mamba_chunk_scan_combined`) on GPU where the package imports.

The recurrence, per head h with a scalar decay (the difference from Mamba-1's per-channel, per-state A):
    a_t = exp(dt_t * A_h),   S_t = a_t S_{t-1} + dt_t x_t B_t^T   (S: [head_dim, d_state]),   y_t = S_t C_t + D_h x_t
B and C are shared by the heads of a group. The chunked form splits time into chunks of Q steps: inside a chunk
y is a masked (C B^T * decay) matrix times dt x, a quadratic "attention" over Q steps; across chunks only the
end states S travel, one step per chunk. Work O(L Q) instead of a length-L sequential loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # mamba-ssm's Triton SSD kernels: imported from the submodule, no causal-conv1d needed
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _ssd_kernel
except Exception:  # noqa: BLE001 - not installed, or no GPU build of triton here
    _ssd_kernel = None

SSD_BACKENDS = ("mamba_ssm", "torch")
KERNEL_CHUNK = 256  # mamba-ssm's default chunk length
TORCH_CHUNK = 64  # the PyTorch form keeps [chunks, Q, Q, heads] scores: smaller Q, less memory


def ssd_backend(device_type: str, use_kernels: bool = True) -> str:
    """Chosen once per mixer: mamba-ssm's kernels on CUDA where importable (and deterministic algorithms are
    off: their backward is not checked for determinism here), the PyTorch form otherwise."""
    if use_kernels and device_type == "cuda" and _ssd_kernel is not None:
        if not torch.are_deterministic_algorithms_enabled():
            return "mamba_ssm"
    return "torch"


def _heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[..., groups, n] -> [..., heads, n]: each group's B or C serves its n_heads / groups heads."""
    return t.repeat_interleave(n_heads // t.shape[-2], dim=-2)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk: int = TORCH_CHUNK,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [b, L, h, p], dt [b, L, h] (after softplus), A [h] (negative), B, C [b, L, g, n]; state [b, h, p, n]
    or None (zeros). Returns y [b, L, h, p] without the D term, in fp32, and the end state (fp32)."""
    b, L, h, p = x.shape
    n = B.shape[-1]
    pad = (-L) % chunk  # padded steps have dt = 0: no decay, no input, the end state is unchanged
    x, dt, B, C = (F.pad(t, (0,) * (2 * t.dim() - 4) + (0, pad)) if pad else t for t in (x, dt, B, C))
    c = (L + pad) // chunk
    x = x.float().reshape(b, c, chunk, h, p)
    dt = dt.float().reshape(b, c, chunk, h)
    Bh = _heads(B.float(), h).reshape(b, c, chunk, h, n)
    Ch = _heads(C.float(), h).reshape(b, c, chunk, h, n)
    acs = (dt * A.float()).cumsum(2)  # log decay from the chunk's start to step i (inclusive)
    xdt = x * dt[..., None]
    # inside a chunk: decay from step j to step i >= j is exp(acs_i - acs_j); -inf above the diagonal
    seg = acs[:, :, :, None, :] - acs[:, :, None, :, :]  # [b, c, i, j, h]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal[:, :, None], float("-inf")))
    scores = torch.einsum("bcihn,bcjhn->bcijh", Ch, Bh) * decay
    y = torch.einsum("bcijh,bcjhp->bcihp", scores, xdt)
    # what each chunk adds to the state at its end, then the states carried from chunk to chunk
    to_end = torch.exp(acs[:, :, -1:, :] - acs)  # [b, c, Q, h]
    added = torch.einsum("bcjhn,bcjh,bcjhp->bchpn", Bh, to_end, xdt)
    chunk_decay = torch.exp(acs[:, :, -1, :])  # [b, c, h]
    S = x.new_zeros(b, h, p, n) if state is None else state.float()
    before = []
    for k in range(c):
        before.append(S)
        S = S * chunk_decay[:, k, :, None, None] + added[:, k]
    before = torch.stack(before, 1)  # the state entering each chunk [b, c, h, p, n]
    y = y + torch.einsum("bcihn,bchpn,bcih->bcihp", Ch, before, torch.exp(acs))
    return y.reshape(b, c * chunk, h, p)[:, :L], S


def ssd_sequential(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one step at a time (same arguments as ssd_chunked, a state required): the test
    reference, and the generation path for a few tokens."""
    h = x.shape[2]
    S, ys = state.float(), []
    A = A.float()
    for t in range(x.shape[1]):
        a = torch.exp(dt[:, t].float() * A)  # [b, h]
        xdt = x[:, t].float() * dt[:, t, :, None].float()  # [b, h, p]
        S = S * a[:, :, None, None] + xdt[..., None] * _heads(B[:, t].float(), h)[:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, _heads(C[:, t].float(), h)))
    return torch.stack(ys, 1), S


def ssd(
    x: torch.Tensor,
    dt_raw: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """y [b, L, h, p] in x's dtype, from the pre-softplus dt (the kernel adds dt_bias and applies softplus)."""
    if backend == "mamba_ssm" and x.is_cuda:
        return _ssd_kernel(x, dt_raw, A, B, C, KERNEL_CHUNK, D=D, dt_bias=dt_bias, dt_softplus=True)
    dt = F.softplus(dt_raw.float() + dt_bias.float())
    y, _ = ssd_chunked(x, dt, A, B, C)
    return (y + x.float() * D.float()[:, None]).to(x.dtype)
