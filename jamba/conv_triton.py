"""The Mamba mixer's causal depthwise conv + SiLU in Triton, deterministic: the conv trainer.deterministic uses.

causal-conv1d's backward sums the weight gradient over the batch with atomicAdd, and PyTorch's deterministic
depthwise conv costs 6 ms of a 426M training step (H200, benchmarks/results/2026-12-02-h200-session7.md).
Here each program owns (batch, BD channels, BL steps): the forward is W shifted loads and FMAs; the backward
recomputes the pre-activation at the W shifts each dx needs (x tiles are cache hits), and writes dweight and
dbias as per-program partial sums that torch reduces in a fixed order (no atomics). The reference is
jamba.scan.causal_conv1d_ref; tests/test_jamba_conv_triton.py compares them in Triton's interpreter.

`jamba::causal_conv1d_det` is a torch.library custom op (fake + autograd): torch.compile traces through it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .conv_op import register_conv_autograd

BD, BL = 16, 128  # channels and steps a program


@triton.jit
def _pre(x_p, w_p, s_wk, bias, t, s: tl.constexpr, L, dm, W: tl.constexpr):
    """The pre-activation at steps t + s: bias + sum_k w[k] x[t + s - (W - 1) + k] (x is 0 before step 0)."""
    acc = tl.zeros(t.shape, dtype=tl.float32) + bias
    for k in tl.static_range(W):
        tk = t + s - (W - 1) + k
        xk = tl.load(x_p + tk, mask=dm & (tk >= 0) & (tk < L), other=0.0).to(tl.float32)
        acc += tl.load(w_p + k * s_wk).to(tl.float32) * xk
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, DM, L, s_xb, s_xd, s_wd, s_wk,
    W: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)[:, None]
    t = tl.program_id(2) * BL + tl.arange(0, BL)[None, :]
    dm = d < DM
    bias = tl.load(b_ptr + d, mask=dm, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    pre = _pre(x_ptr + pid_b * s_xb + d * s_xd, w_ptr + d * s_wd, s_wk, bias, t, 0, L, dm, W)
    y = pre * tl.sigmoid(pre)
    tl.store(y_ptr + (pid_b * DM + d) * L + t, y.to(y_ptr.dtype.element_ty), mask=dm & (t < L))


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, b_ptr, g_ptr, dx_ptr, dwp_ptr, dbp_ptr, DM, L, NT, s_xb, s_xd, s_wd, s_wk, s_gb, s_gd,
    W: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    # dx [b, d, L] contiguous; dwp [b, NT, d, W] and dbp [b, NT, d]: this program's partial sums
    pid_b = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(2)
    d = tl.program_id(1) * BD + tl.arange(0, BD)[:, None]
    t = pid_t * BL + tl.arange(0, BL)[None, :]
    dm = d < DM
    bias = tl.load(b_ptr + d, mask=dm, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    x_p = x_ptr + pid_b * s_xb + d * s_xd
    w_p = w_ptr + d * s_wd
    g_p = g_ptr + pid_b * s_gb + d * s_gd
    dx = tl.zeros([BD, BL], dtype=tl.float32)
    part = (pid_b * NT + pid_t) * DM + d
    for j in tl.static_range(W):  # dx[t] = sum_j w[W - 1 - j] * dpre[t + j]
        pre = _pre(x_p, w_p, s_wk, bias, t, j, L, dm, W)
        tj = t + j
        g = tl.load(g_p + tj, mask=dm & (tj < L), other=0.0).to(tl.float32)
        sg = tl.sigmoid(pre)
        dpre = g * sg * (1.0 + pre * (1.0 - sg))  # silu'(pre)
        dx += tl.load(w_p + (W - 1 - j) * s_wk).to(tl.float32) * dpre
        if j == 0:  # this program's steps: dweight[k] += dpre[t] x[t - (W - 1) + k], dbias += dpre[t]
            for k in tl.static_range(W):
                tk = t - (W - 1) + k
                xk = tl.load(x_p + tk, mask=dm & (tk >= 0) & (tk < L), other=0.0).to(tl.float32)
                tl.store(dwp_ptr + part * W + k, tl.sum(dpre * xk, axis=1)[:, None], mask=dm)
            if HAS_BIAS:
                tl.store(dbp_ptr + part, tl.sum(dpre, axis=1)[:, None], mask=dm)
    tl.store(dx_ptr + (pid_b * DM + d) * L + t, dx.to(dx_ptr.dtype.element_ty), mask=dm & (t < L))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _grid(b: int, d: int, L: int) -> tuple[int, int, int]:
    return b, triton.cdiv(d, BD), triton.cdiv(L, BL)


@torch.library.custom_op("jamba::causal_conv1d_det", mutates_args=())
def _conv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x = _rows(x)
    b, d, L = x.shape
    y = torch.empty(b, d, L, device=x.device, dtype=x.dtype)
    bb = bias if bias is not None else weight
    _conv_fwd_kernel[_grid(b, d, L)](
        x, weight, bb, y, d, L, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        W=weight.shape[1], BD=BD, BL=BL, HAS_BIAS=bias is not None,
    )  # fmt: skip
    return y


@_conv_op.register_fake
def _conv_fake(x, weight, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("jamba::causal_conv1d_det_bwd", mutates_args=())
def _conv_bwd_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, g = _rows(x), _rows(g)
    b, d, L = x.shape
    grid = _grid(b, d, L)
    dx = torch.empty(b, d, L, device=x.device, dtype=x.dtype)
    dwp = torch.empty(b, grid[2], d, weight.shape[1], device=x.device, dtype=torch.float32)
    dbp = torch.empty(b, grid[2], d, device=x.device, dtype=torch.float32)
    bb = bias if bias is not None else weight
    _conv_bwd_kernel[grid](
        x, weight, bb, g, dx, dwp, dbp, d, L, grid[2], x.stride(0), x.stride(1), weight.stride(0),
        weight.stride(1), g.stride(0), g.stride(1), W=weight.shape[1], BD=BD, BL=BL, HAS_BIAS=bias is not None,
    )  # fmt: skip
    # the partial sums in a fixed order: deterministic
    db = dbp.sum((0, 1)).to(bias.dtype) if bias is not None else weight.new_empty(0)
    return dx, dwp.sum((0, 1)).to(weight.dtype), db


@_conv_bwd_op.register_fake
def _conv_bwd_fake(x, weight, bias, g):
    db = bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), db


register_conv_autograd("jamba::causal_conv1d_det", _conv_bwd_op)


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """SiLU(causal depthwise conv) of x [b, d, L] with weight [d, w] and bias [d], in x's dtype; deterministic."""
    return _conv_op(x, weight.contiguous(), bias.contiguous() if bias is not None else None)
