"""Selective scan (Mamba-1) and causal depthwise conv: fast kernels with pure-PyTorch references.

Shapes follow mamba-ssm: u, delta, z [b, d, L]; A [d, n]; B, C [b, n, L]; D, delta_bias [d].
  h_t = exp(delta_t * A) h_{t-1} + delta_t B_t u_t,   y_t = C_t . h_t + D u_t,   y *= silu(z)
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:  # mamba-ssm and causal-conv1d: CUDA only, optional
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_scan
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _mamba_scan = None
from . import conv_op

# causal-conv1d's kernels as our traceable op (jamba/conv_op.py), where the package is installed
_cc1d = conv_op.causal_conv1d_kernel if conv_op.available() else None


def _triton_scan():
    """jamba.scan_op.selective_scan_triton, or None where triton is missing (imported on first use: the
    interpreter switch TRITON_INTERPRET is read when the kernels are defined)."""
    try:
        from .scan_op import selective_scan_triton
    except Exception:  # noqa: BLE001 - no triton, or a triton without a backend here
        return None
    return selective_scan_triton


def kernels_available() -> dict[str, bool]:
    return {
        "mamba_ssm": _mamba_scan is not None,
        "causal_conv1d": _cc1d is not None,
        "triton_scan": _triton_scan() is not None,
    }


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SCAN_BACKENDS = ("auto", "triton", "mamba_ssm", "torch")
# `auto` on a GPU: the first available, fastest first as measured by benchmarks/gpu_scan.py (H200, results in
# benchmarks/results/). Off the GPU: the PyTorch scan.
AUTO_CUDA_ORDER = ("mamba_ssm", "triton", "torch")


def scan_backend_problem(name: str, device_type: str) -> str | None:
    """Why backend `name` cannot run on `device_type` (None: it can)."""
    if name not in SCAN_BACKENDS:
        return f"unknown scan backend {name!r} (choose from {'|'.join(SCAN_BACKENDS)})"
    if name == "mamba_ssm" and (_mamba_scan is None or device_type != "cuda"):
        return "mamba_ssm needs the mamba-ssm package and a CUDA device"
    if name == "mamba_ssm" and torch.are_deterministic_algorithms_enabled():
        # dB, dC, dA, dD and d_delta_bias are summed with float atomicAdd (state-spaces/mamba #493)
        return "mamba-ssm's scan backward is not deterministic (deterministic algorithms are on): use triton"
    if name == "triton":
        if _triton_scan() is None:
            return "triton is not installed"
        if device_type != "cuda" and not _INTERPRET:
            return "the Triton scan runs on CUDA (on CPU only under TRITON_INTERPRET=1)"
    return None


def resolve_scan_backend(name: str, device_type: str) -> str:
    """The backend that runs: `auto` picks by AUTO_CUDA_ORDER on CUDA and `torch` elsewhere; an explicit
    backend that cannot run is an error naming why."""
    if name == "auto":
        if device_type != "cuda":
            return "torch"
        return next(b for b in AUTO_CUDA_ORDER if scan_backend_problem(b, device_type) is None)
    problem = scan_backend_problem(name, device_type)
    if problem:
        raise ValueError(f"runtime.scan_backend={name}: {problem}")
    return name


def _discretize(u, delta, A, B, delta_bias, delta_softplus):
    """Per-step decay and input, time-major [b, L, d, n] so each step of the scan is contiguous."""
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    delta = delta.transpose(1, 2)  # [b, L, d]
    dA = torch.exp(delta.unsqueeze(-1) * A.float())
    dBu = (delta * u.float().transpose(1, 2)).unsqueeze(-1) * B.float().transpose(1, 2).unsqueeze(2)
    return dA, dBu


def _finish(h, u, C, D, z, dtype):
    """h [b, L, d, n] -> y [b, d, L]."""
    y = torch.matmul(h, C.float().transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
    if D is not None:
        y = y + D.float()[None, :, None] * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """The definition: a loop over every token. Slow; used only by tests."""
    dA, dBu = _discretize(u, delta, A, B, delta_bias, delta_softplus)
    h = torch.zeros_like(dBu[:, 0])
    hs = []
    for t in range(u.shape[-1]):
        h = dA[:, t] * h + dBu[:, t]
        hs.append(h)
    hs = torch.stack(hs, dim=1)
    y = _finish(hs, u, C, D, z, u.dtype)
    return (y, h) if return_last_state else y


def linear_scan(a: torch.Tensor, x: torch.Tensor, chunk: int, reverse: bool = False) -> torch.Tensor:
    """h_t = a_t h_{t-1} + x_t along dim 1 of [b, L, d, n], h_{-1} = 0, without autograd
    (reverse=True: h_t = a_t h_{t+1} + x_t, h_L = 0).

    Two passes of O(L) work and chunk + L/chunk Python steps (not L): first every chunk is scanned
    from zero, all chunks at once, position by position; then each chunk adds its neighbour's final
    state times the running product of its decays. Every factor is in (0, 1]: nothing can overflow."""
    b, L, d, n = x.shape
    T = max(1, min(chunk, L))
    c = -(-L // T)
    pad = c * T - L
    if pad:  # padding at the end is inert either way: a = 1, x = 0
        a = F.pad(a, (0, 0, 0, 0, 0, pad), value=1.0)
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    a = a.reshape(b, c, T, d, n)
    h = x.reshape(b, c, T, d, n).clone()
    p = a.clone()  # running product of decays within each chunk
    if not reverse:
        for t in range(1, T):
            h[:, :, t] += a[:, :, t] * h[:, :, t - 1]
            p[:, :, t] *= p[:, :, t - 1]
        for j in range(1, c):
            h[:, j] += p[:, j] * h[:, j - 1, -1:]
    else:
        for t in range(T - 2, -1, -1):
            h[:, :, t] += a[:, :, t] * h[:, :, t + 1]
            p[:, :, t] *= p[:, :, t + 1]
        for j in range(c - 2, -1, -1):
            h[:, j] += p[:, j] * h[:, j + 1, :1]
    return h.reshape(b, c * T, d, n)[:, :L]


class _LinearRecurrence(torch.autograd.Function):
    """Autograd for linear_scan. The adjoint of a linear recurrence is the same recurrence run
    backwards: lam_t = g_t + a_{t+1} lam_{t+1}; dx_t = lam_t; da_t = lam_t h_{t-1}."""

    @staticmethod
    def forward(ctx, a, x, chunk: int):
        h = linear_scan(a, x, chunk)
        ctx.save_for_backward(a, h)
        ctx.chunk = chunk
        return h

    @staticmethod
    def backward(ctx, g):
        a, h = ctx.saved_tensors
        a_next = F.pad(a[:, 1:], (0, 0, 0, 0, 0, 1))
        lam = linear_scan(a_next, g.contiguous(), ctx.chunk, reverse=True)
        da = lam.clone()
        da[:, 0] = 0
        da[:, 1:] *= h[:, :-1]
        return da, lam, None


def selective_scan_chunked(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    chunk_size: int = 16,
):
    """Parallel CPU scan with a hand-written backward (no per-token autograd graph)."""
    dA, dBu = _discretize(u, delta, A, B, delta_bias, delta_softplus)
    hs = _LinearRecurrence.apply(dA, dBu, chunk_size)
    y = _finish(hs, u, C, D, z, u.dtype)
    return (y, hs[:, -1]) if return_last_state else y


def _scan_block(u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus: bool, chunk_size: int):
    """One block of the chunked scan, starting from state h0 [b, d, n]; returns (y, last state)."""
    dA, dBu = _discretize(u, delta, A, B, delta_bias, delta_softplus)
    dBu = torch.cat([dBu[:, :1] + dA[:, :1] * h0.unsqueeze(1), dBu[:, 1:]], dim=1)  # h_{-1} = h0
    hs = _LinearRecurrence.apply(dA, dBu, chunk_size)
    return _finish(hs, u, C, D, z, u.dtype), hs[:, -1].clone()  # a view would keep all of hs alive


def selective_scan_blocked(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    chunk_size: int = 16,
    block_size: int = 512,
):
    """The chunked scan over blocks of `block_size` tokens, the state carried from block to block and each
    block recomputed in backward: memory O(b * block * d * n) instead of O(b * L * d * n) (the fallback for
    long sequences, and for GPUs without mamba-ssm). Exact: the same recurrence."""
    L = u.shape[-1]
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], device=u.device, dtype=torch.float32)
    ys = []
    for s in range(0, L, block_size):
        sl = slice(s, s + block_size)
        args = (u[..., sl], delta[..., sl], A, B[..., sl], C[..., sl], D, None if z is None else z[..., sl])
        args += (delta_bias, h, delta_softplus, chunk_size)
        if torch.is_grad_enabled():
            y, h = checkpoint(_scan_block, *args, use_reentrant=False)
        else:
            y, h = _scan_block(*args)
        ys.append(y)
    y = torch.cat(ys, dim=-1)
    return (y, h) if return_last_state else y


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=True,
    use_kernel: bool = True,
    chunk_size: int = 16,
    block_size: int = 512,
    backend: str = "auto",
):
    """Dispatch by `backend` (see resolve_scan_backend; use_kernel=False means `torch`): our Triton kernels,
    mamba-ssm's fused CUDA scan, or the PyTorch chunked scan (in blocks of block_size tokens when the sequence is
    longer)."""
    if backend not in ("triton", "mamba_ssm", "torch"):
        backend = resolve_scan_backend(backend, u.device.type)
    if not use_kernel or (not u.is_cuda and not (backend == "triton" and _INTERPRET)):
        backend = "torch"  # a model built for a GPU, run on CPU tensors
    if backend == "mamba_ssm":
        return _mamba_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if backend == "triton":
        return _triton_scan()(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if u.shape[-1] > block_size:
        return selective_scan_blocked(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size=chunk_size, block_size=block_size
        )
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size=chunk_size)


def causal_conv1d_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: bool = True
) -> torch.Tensor:
    """x [b, d, L], weight [d, w]: depthwise conv looking only backwards, then SiLU."""
    w = weight.shape[-1]
    y = F.conv1d(x, weight.unsqueeze(1), bias, padding=w - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(y) if activation else y


def _triton_conv():
    """jamba.conv_triton.causal_conv1d_triton, or None where triton is missing (imported on first use)."""
    try:
        from .conv_triton import causal_conv1d_triton
    except Exception:  # noqa: BLE001 - no triton, or a triton without a backend here
        return None
    return causal_conv1d_triton


def conv_backend(device_type: str, use_kernel: bool = True) -> str:
    """The conv a Mamba mixer takes, chosen once when it is built. On CUDA: causal-conv1d's kernel, except with
    deterministic algorithms on (its weight gradient is summed over the batch with atomicAdd) or where it is
    not installed: then our Triton conv (deterministic). Else, and off the GPU, PyTorch's conv1d."""
    if not (use_kernel and device_type == "cuda"):
        return "torch"
    if _cc1d is not None and not torch.are_deterministic_algorithms_enabled():
        return "causal_conv1d"
    return "triton" if _triton_conv() is not None else "torch"


def causal_conv1d(x, weight, bias, backend: str | None = None) -> torch.Tensor:
    """SiLU(causal depthwise conv) with `backend` (conv_backend's choice; None: chosen here, for x's device);
    CPU tensors always take PyTorch's conv."""
    backend = backend or conv_backend(x.device.type)
    if backend == "causal_conv1d" and x.is_cuda:
        return _cc1d(x, weight, bias)
    if backend == "triton" and x.is_cuda:
        return _triton_conv()(x, weight, bias)
    return causal_conv1d_ref(x, weight, bias)
