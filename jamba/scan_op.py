"""`jamba::selective_scan`: the Triton selective scan as a torch.library custom op (fake + autograd), so
torch.compile traces a whole Mamba layer through it. Same interface and semantics as mamba-ssm's
`selective_scan_fn` (without return_last_state); the kernels are in jamba/scan_triton.py."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import scan_triton as kern
from . import scan_triton_bwd as kern_bwd
from . import scan_triton_bwd2 as kern_bwd2


@dataclass(frozen=True)
class ScanTiling:
    """A backward program holds BD channels, a forward one BD_fwd; the forward moves T_fwd-step tiles, the
    backward T-step tiles and T states in registers; a state is saved every K steps (K/T chunk states in the
    backward's scratch)."""

    BD: int = 32
    # forward: measured on an H200 (session 6, benchmarks/results/2026-12-02-h200-session6.md): 16 channels x
    # 8-step tiles 1.31 ms at 4x4096x4096 vs 2.11 for 64 x 4 and 2.43 for 32 x 4 (mamba-ssm 1.37)
    BD_fwd: int = 16
    num_warps: int = 1
    T_fwd: int = 8
    T: int = 2
    K: int = 128
    stages: int = 1  # software pipelining of each chunk loop (tl.range num_stages): loads issued ahead
    split: int = 1  # 1: the forward runs its K-step segments in parallel (two passes and a combine)
    # the backward's segments in parallel too (local carries, a reverse combine): 1 always, 0 never, -1 when
    # the (batch, channel block) programs fill at most half the GPU's slots (H200: 1x4096x32768 13.6 ms split
    # vs 29.7 not; 4x4096x4096 6.7 vs 6.1: the extra passes cost more than the parallelism gives there)
    split_bwd: int = -1
    # 1: with z, the forward also writes y before the gate (in u's dtype, as mamba-ssm keeps its `out`) and the
    # backward reads it instead of summing h * C over the states again for dz
    save_y: int = 0
    # the backward kernel: 2 jamba/scan_triton_bwd2.py (states the fast axis, time-first tiles), 1 the first
    # layout (jamba/scan_triton_bwd.py)
    bwd: int = 2

    def __post_init__(self) -> None:
        for f in ("BD", "BD_fwd", "T_fwd", "T", "K"):
            v = getattr(self, f)
            if v < 1 or v & (v - 1):
                raise ValueError(f"ScanTiling.{f} must be a power of two, got {v}")
        if self.bwd not in (1, 2):
            raise ValueError(f"ScanTiling.bwd must be 1 or 2, got {self.bwd}")
        if self.K % self.T or self.K % self.T_fwd:
            raise ValueError(f"ScanTiling.K={self.K} must be a multiple of T={self.T} and T_fwd={self.T_fwd}")


# Chosen from benchmarks/gpu_scan.py on an H200 (benchmarks/results/2026-12-02-h200-*.md); tests override it.
# The GPU keeps the measured backward (layout 1) until layout 2 (ScanTiling()'s own fields: bwd=2, BD=32, T=2;
# 29% fewer instructions offline) is timed on a GPU against it and mamba-ssm (issue 27).
TILING: dict[str, ScanTiling] = {
    "cuda": ScanTiling(bwd=1, BD=16, T=4),
    "cpu": ScanTiling(BD=4, BD_fwd=4, T_fwd=4, T=4, K=8),
}


def tiling_for(device: torch.device) -> ScanTiling:
    return TILING["cuda" if device.type == "cuda" else "cpu"]


def supported(u: torch.Tensor, A: torch.Tensor) -> str | None:
    """Why this op cannot run these inputs (None: it can)."""
    n = A.shape[-1]
    if n & (n - 1):
        return f"d_state {n} is not a power of two"
    if not u.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors need TRITON_INTERPRET=1"
    return None


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _vec(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0, dtype=torch.float32) if x is None else x.float().contiguous()


def _nseg(L: int, tg: ScanTiling) -> int:
    return -(-L // tg.K)


def _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool):
    b, d, L = u.shape
    n = A.shape[1]
    tg = tiling_for(u.device)
    u, delta = _rows(u), _rows(delta)
    z = _rows(z) if z is not None else None
    A = A.float().t().contiguous().t()  # [d, n] with d the unit stride: channels go on lanes
    Dv, bias = _vec(D, u), _vec(delta_bias, u)
    zz = z if z is not None else u
    nseg = _nseg(L, tg)
    y = torch.empty(b, d, L, device=u.device, dtype=u.dtype)
    save_y = bool(tg.save_y) and z is not None
    yp = torch.empty(b, d, L, device=u.device, dtype=u.dtype) if save_y else u.new_empty(0)
    hs = torch.empty(b, nseg, n, d, device=u.device, dtype=torch.float32)
    npd = triton_cdiv(d, tg.BD_fwd)

    def run(mode: int, grid: tuple, hl: torch.Tensor, sdt: torch.Tensor) -> None:
        kern._scan_fwd_kernel[grid](
            u, delta, A, B, C, Dv, zz, bias, y, yp, hs, hl, sdt, L, d, nseg,
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), A.stride(0), A.stride(1),
            B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2), zz.stride(0),
            zz.stride(1), N=n, BD=tg.BD_fwd, T=tg.T_fwd, K=tg.K, STAGES=tg.stages, HAS_D=D is not None,
            HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, MODE=mode,
            SAVE_Y=save_y, num_warps=tg.num_warps,
        )  # fmt: skip

    if tg.split and nseg > 1:
        # segments in parallel: zero-start end states, a sequential pass for the start states, then y
        hl = torch.empty_like(hs)
        sdt = torch.empty(b, nseg, d, device=u.device, dtype=torch.float32)
        run(1, (b, npd, nseg), hl, sdt)
        kern._combine_kernel[(b, npd)](
            hl,
            sdt,
            A,
            hs,
            d,
            nseg,
            A.stride(0),
            A.stride(1),
            N=n,
            BD=tg.BD_fwd,
            REVERSE=False,
            num_warps=tg.num_warps,
        )
        run(2, (b, npd, nseg), hl, sdt)
    else:
        run(0, (b, npd, 1), hs, hs)
    return y, hs, yp


def _bwd(g, u, delta, A, B, C, D, z, delta_bias, hs, yp, delta_softplus: bool):
    b, d, L = u.shape
    n = A.shape[1]
    tg = tiling_for(u.device)
    g, u, delta = _rows(g), _rows(u), _rows(delta)
    z = _rows(z) if z is not None else None
    Af = A.float().t().contiguous().t()  # the carry kernel's layout: d the unit stride
    An = A.float().contiguous() if tg.bwd == 2 else Af  # layout 2 reads A with n the unit stride
    Dv, bias = _vec(D, u), _vec(delta_bias, u)
    zz = z if z is not None else u
    nseg, npd = hs.shape[1], triton_cdiv(d, tg.BD)
    f32 = dict(device=u.device, dtype=torch.float32)
    du = torch.empty(b, d, L, device=u.device, dtype=u.dtype)
    ddelta = torch.empty(b, d, L, device=u.device, dtype=delta.dtype)
    dz = torch.empty(b, d, L, device=u.device, dtype=z.dtype) if z is not None else du.new_empty(0)
    split = nseg > 1 and (
        tg.split_bwd == 1 or (tg.split_bwd < 0 and 2 * b * npd <= _resident_programs(u.device))
    )
    ns = nseg if split else 1
    dAp = torch.empty(b, ns, *((d, n) if tg.bwd == 2 else (n, d)), **f32)
    dDp = torch.empty(b, ns, d, **f32)
    dbp = torch.empty(b, ns, d, **f32)
    dBp = torch.empty(b, npd, L, n, **f32)
    dCp = torch.empty(b, npd, L, n, **f32)
    ce = hs  # unused without the split
    items = b * npd * ns
    programs = items
    if split:
        # each segment's incoming adjoint carry: segment-local carries, then a reverse pass over segments
        G = torch.empty_like(hs)
        sdt = torch.empty(b, nseg, d, **f32)
        kern_bwd._bwd_carry_kernel[(b, npd, nseg)](
            delta, Af, C, zz, bias, g, G, sdt, L, d, nseg,
            delta.stride(0), delta.stride(1), Af.stride(0), Af.stride(1), C.stride(0), C.stride(1), C.stride(2),
            zz.stride(0), zz.stride(1), g.stride(0), g.stride(1),
            N=n, BD=tg.BD, T=tg.T, K=tg.K, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=delta_softplus, num_warps=tg.num_warps,
        )  # fmt: skip
        ce = torch.empty_like(hs)
        kern._combine_kernel[(b, npd)](
            G, sdt, Af, ce, d, nseg, Af.stride(0), Af.stride(1), N=n, BD=tg.BD, REVERSE=True,
            num_warps=tg.num_warps,
        )  # fmt: skip
        programs = min(items, _resident_programs(u.device))
    # per program: the chunk-start states, and (layout 2) the segment's delta after the softplus
    scratch = torch.empty(programs, tg.K // tg.T, n + (tg.T if tg.bwd == 2 else 0), tg.BD, **f32)
    kernel = kern_bwd2._scan_bwd2_kernel if tg.bwd == 2 else kern_bwd._scan_bwd_kernel
    kernel[(programs,)](
        u, delta, An, B, C, Dv, zz, bias, g, yp, hs, scratch, ce, du, ddelta, dz, dAp, dDp, dbp, dBp, dCp,
        L, d, nseg, npd, b,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), An.stride(0), An.stride(1),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2), zz.stride(0), zz.stride(1),
        g.stride(0), g.stride(1),
        N=n, BD=tg.BD, T=tg.T, K=tg.K, STAGES=tg.stages, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, SPLIT=split, SAVE_Y=yp.numel() > 0,
        num_warps=tg.num_warps,
    )  # fmt: skip
    # the partial sums, reduced in a fixed order (deterministic)
    dA = dAp.sum((0, 1)) if tg.bwd == 2 else dAp.sum((0, 1)).t()
    dA = dA.contiguous().to(A.dtype)  # the fake kernel (and Inductor) expect contiguous
    dB = dBp.sum(1).to(B.dtype)  # [b, L, n]
    dC = dCp.sum(1).to(C.dtype)
    dD = dDp.sum((0, 1)) if D is not None else dDp.new_empty(0)
    dbias = dbp.sum((0, 1)) if delta_bias is not None else dbp.new_empty(0)
    return du, ddelta, dA, dB, dC, dD, dz, dbias


def _resident_programs(device: torch.device) -> int:
    """Programs the split backward launches (each loops over segments): about as many as fit on the GPU at
    once (one-warp programs of ~255 registers: 8 an SM), so its per-program scratch stays small."""
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, each looping over several items
    return torch.cuda.get_device_properties(device).multi_processor_count * 8


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@torch.library.custom_op("jamba::selective_scan", mutates_args=())
def _scan_op(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@_scan_op.register_fake
def _scan_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    b, d, L = u.shape
    tg = tiling_for(u.device)
    yp = u.new_empty(b, d, L) if tg.save_y and z is not None else u.new_empty(0)
    return u.new_empty(b, d, L), u.new_empty(b, _nseg(L, tg), A.shape[1], d, dtype=torch.float32), yp


@torch.library.custom_op("jamba::selective_scan_bwd", mutates_args=())
def _scan_bwd_op(
    g: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    hs: torch.Tensor,
    yp: torch.Tensor,
    delta_softplus: bool,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    return _bwd(g, u, delta, A, B, C, D, z, delta_bias, hs, yp, delta_softplus)


@_scan_bwd_op.register_fake
def _scan_bwd_fake(g, u, delta, A, B, C, D, z, delta_bias, hs, yp, delta_softplus):
    b, d, L = u.shape
    n = A.shape[1]
    e = u.new_empty(0, dtype=torch.float32)
    return (
        u.new_empty(b, d, L),
        delta.new_empty(b, d, L),
        A.new_empty(d, n),
        B.new_empty(b, L, n),
        C.new_empty(b, L, n),
        u.new_empty(d, dtype=torch.float32) if D is not None else e,
        z.new_empty(b, d, L) if z is not None else u.new_empty(0),
        u.new_empty(d, dtype=torch.float32) if delta_bias is not None else e,
    )


def _setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1], output[2])
    ctx.delta_softplus = delta_softplus
    ctx.has = (D is not None, z is not None, delta_bias is not None)


def _backward(ctx, gy, _ghs, _gyp):
    u, delta, A, B, C, D, z, delta_bias, hs, yp = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, dbias = _scan_bwd_op(
        gy, u, delta, A, B, C, D, z, delta_bias, hs, yp, ctx.delta_softplus
    )
    has_d, has_z, has_bias = ctx.has
    return (
        du,
        ddelta,
        dA,
        dB.transpose(1, 2),
        dC.transpose(1, 2),
        dD.to(D.dtype) if has_d else None,
        dz if has_z else None,
        dbias.to(delta_bias.dtype) if has_bias else None,
        None,
    )


torch.library.register_autograd("jamba::selective_scan", _backward, setup_context=_setup)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """y [b, d, L] in u's dtype, as mamba-ssm's selective_scan_fn."""
    return _scan_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))[0]
