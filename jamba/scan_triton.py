"""Mamba-1 selective scan in Triton: the shared helpers and the forward kernels (the backward's are in
jamba/scan_triton_bwd2.py and jamba/scan_triton_bwd.py; the reference is
jamba.scan.selective_scan_ref).

Design (docs/model.md, "Selective scan kernels"):
- One program per (batch, block of channels); its states are an [N, channels] fp32 tensor in registers and it
  walks time sequentially. Decays use exp2 with A pre-scaled by log2(e). B_t and C_t ([N] per step) are
  shared by the program's channels.
- The forward (BD_fwd = 16 channels, one warp, T_fwd = 8) moves u, delta, z and y as [T, channels] tiles, time
  first: Triton gives tiles and states one layout family (a lane holds 8 of the 16 states of one channel and 4
  steps of its tile rows), so a step's row of a tile is in-thread and y's sum over the states takes one shuffle
  level (24 SHFL per 8-step chunk at sm_90, `python benchmarks/scan_sass.py`). 64 channels a program (all 16
  states of 2 channels a lane, no shuffles, 1.5x fewer instructions per state-step) measured slower on an
  H200: 4x fewer programs hide less latency (benchmarks/results/2026-12-02-h200-session6.md).
- The backward, layout 2 (jamba/scan_triton_bwd2.py, BD = 32 channels, T = 2): a lane holds 4 consecutive
  states of 4 channels (4 lanes over the states, 8 over the channels), so both kinds of reductions, over the
  states (y, du, d_delta) and over the channels (dB, dC), are mostly in-thread FMAs, and no step converts a
  layout through shared memory. Layout 1 (jamba/scan_triton_bwd.py, `ScanTiling.bwd=1`, BD = 16, T = 4):
  [BD, T] tiles and 8 lanes x 2 states, 4 lanes x 4 channels.
- The forward saves only the state at the start of every K-step segment ([b, L/K, N, d] fp32), and with
  ScanTiling.save_y y before the gate (else the backward sums h * C again for dz).
- The backward walks segments backwards: it recomputes the segment's T-step chunk-start states (to a small
  scratch), then per chunk recomputes the T states in registers and runs the adjoint recurrence backwards.
  dB and dC are reduced over the program's channels and written as per-program partial sums; dA, dD and
  d_delta_bias as per-batch partial sums; torch sums the partials in a fixed order. No float atomics: the
  backward is deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _softplus(x):
    # log(1 + e^x), the identity above 20 (as mamba-ssm)
    return tl.where(x > 20.0, x, tl.log2(1.0 + tl.exp2(x * 1.4426950408889634)) * 0.6931471805599453)


@triton.jit
def _col(tile, tt, i: tl.constexpr):
    """Column i of a [BD, T] tile as a [1, BD] row (a thread's own registers: the selects fold away)."""
    return tl.sum(tl.where(tt == i, tile, -0.0), axis=1)[None, :]


@triton.jit
def _put(tile, tt, i: tl.constexpr, v):
    """The tile with column i replaced by v ([BD])."""
    return tl.where(tt == i, v[:, None], tile)


@triton.jit
def _row(tile, tt, i: tl.constexpr):
    """Row i of a [T, BD] tile as a [1, BD] row (in-thread: the selects fold away)."""
    return tl.sum(tl.where(tt == i, tile, -0.0), axis=0)[None, :]


@triton.jit
def _delta_tile(dl_p, tt, t0, L, dm, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta for steps t0..t0+T of the program's channels ([BD, T]; 0 where masked, so those steps are the
    identity) and its raw pre-activation."""
    m = dm & (t0 + tt < L)
    x = tl.load(dl_p + t0 + tt, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x = x + bias
    dt = x
    if SOFTPLUS:
        dt = _softplus(x)
    return tl.where(m, dt, 0.0), x, m


@triton.jit
def _scan_fwd_kernel(
    u_ptr,
    dl_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    y_ptr,
    yp_ptr,
    hs_ptr,
    hl_ptr,
    sdt_ptr,
    L,
    DM,
    NSEG,
    s_ub,
    s_ud,
    s_db,
    s_dd,
    s_Ad,
    s_An,
    s_Bb,
    s_Bn,
    s_Bl,
    s_Cb,
    s_Cn,
    s_Cl,
    s_zb,
    s_zd,
    N: tl.constexpr,
    BD: tl.constexpr,
    T: tl.constexpr,
    K: tl.constexpr,
    STAGES: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    MODE: tl.constexpr,
    SAVE_Y: tl.constexpr,
):
    # u, delta, z, y: time is the unit-stride axis; y is contiguous [b, d, L]. The forward's tiles are [T, BD]
    # (time first) and its states [N, BD]: Triton gives both one layout (a thread holds all N states of its
    # channels and T steps of each), so taking a step's row out of a tile and y's sum over the states stay
    # in-thread: no shuffles, no layout conversions in the loop.
    pid_b = tl.program_id(0).to(tl.int64)
    n = tl.arange(0, N)[:, None]  # [N, 1]
    d = tl.program_id(1) * BD + tl.arange(0, BD)[None, :]  # [1, BD]
    tt = tl.arange(0, T)[:, None]  # [T, 1]
    dmask = d < DM
    A2 = tl.load(A_ptr + d * s_Ad + n * s_An, mask=dmask, other=0.0) * 1.4426950408889634  # [N, BD]
    Dv = tl.load(D_ptr + d, mask=dmask, other=0.0) if HAS_D else 0.0
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0) if HAS_BIAS else 0.0
    u_p = u_ptr + pid_b * s_ub + d * s_ud
    dl_p = dl_ptr + pid_b * s_db + d * s_dd
    z_p = z_ptr + pid_b * s_zb + d * s_zd
    y_p = y_ptr + (pid_b * DM + d) * L
    yp_p = yp_ptr + (pid_b * DM + d) * L  # y before the gate, for the backward (SAVE_Y, with z)
    B_p = B_ptr + pid_b * s_Bb + n * s_Bn
    C_p = C_ptr + pid_b * s_Cb + n * s_Cn
    hs_p = hs_ptr + pid_b * NSEG * N * DM + n * DM + d
    # MODE 0: one program walks every segment, saving each segment's start state. With the time split,
    # MODE 1 runs one segment from a zero state (its end state and sum of delta, for _combine_kernel) and
    # MODE 2 one segment from the start state _combine_kernel wrote, for y.
    seg_lo = tl.program_id(2) if MODE > 0 else 0
    seg_hi = seg_lo + 1 if MODE > 0 else NSEG
    if MODE == 2:
        h = tl.load(hs_p + seg_lo * N * DM, mask=dmask, other=0.0)
    else:
        h = tl.zeros([N, BD], dtype=tl.float32)
    sdt = tl.zeros([T, BD], dtype=tl.float32)
    for seg in range(seg_lo, seg_hi):
        if MODE == 0:
            tl.store(hs_p + seg * N * DM, h, mask=dmask)
        for t0 in tl.range(seg * K, tl.minimum(seg * K + K, L), T, num_stages=STAGES):
            dt_tile, _, m = _delta_tile(dl_p, tt, t0, L, dmask, bias, HAS_BIAS, SOFTPLUS)  # [T, BD]
            u_tile = tl.load(u_p + t0 + tt, mask=m, other=0.0).to(tl.float32)
            y_tile = tl.zeros([T, BD], dtype=tl.float32)
            if MODE == 1:
                sdt += dt_tile
            for i in tl.static_range(T):
                t = t0 + i
                B_t = tl.load(B_p + t * s_Bl, mask=t < L, other=0.0).to(tl.float32)  # [N, 1]
                dt = _row(dt_tile, tt, i)
                h = tl.exp2(dt * A2) * h + (dt * _row(u_tile, tt, i)) * B_t
                if MODE != 1:
                    C_t = tl.load(C_p + t * s_Cl, mask=t < L, other=0.0).to(tl.float32)
                    y_tile = tl.where(tt == i, tl.sum(h * C_t, axis=0)[None, :], y_tile)
            if MODE != 1:
                if HAS_D:
                    y_tile += Dv * u_tile
                if HAS_Z:
                    if SAVE_Y:
                        tl.store(yp_p + t0 + tt, y_tile.to(yp_ptr.dtype.element_ty), mask=m)
                    z_tile = tl.load(z_p + t0 + tt, mask=m, other=0.0).to(tl.float32)
                    y_tile *= z_tile * tl.sigmoid(z_tile)
                tl.store(y_p + t0 + tt, y_tile.to(y_ptr.dtype.element_ty), mask=m)
    if MODE == 1:
        tl.store(hl_ptr + pid_b * NSEG * N * DM + seg_lo * N * DM + n * DM + d, h, mask=dmask)
        tl.store(sdt_ptr + (pid_b * NSEG + seg_lo) * DM + d, tl.sum(sdt, axis=0)[None, :], mask=dmask)


@triton.jit
def _combine_kernel(
    hl_ptr,
    sdt_ptr,
    A_ptr,
    hs_ptr,
    DM,
    NSEG,
    s_Ad,
    s_An,
    N: tl.constexpr,
    BD: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """Segment start states from each segment's zero-start end state hl and its decay exp(A * sum delta):
    hs[0] = 0, hs[s + 1] = exp(A * sdt[s]) * hs[s] + hl[s] (a short sequential pass over segments). REVERSE:
    the backward's carries, hs[NSEG - 1] = 0, hs[s - 1] = exp(A * sdt[s]) * hs[s] + hl[s]."""
    pid_b = tl.program_id(0).to(tl.int64)
    n = tl.arange(0, N)[:, None]
    d = tl.program_id(1) * BD + tl.arange(0, BD)[None, :]
    dmask = d < DM
    A2 = tl.load(A_ptr + d * s_Ad + n * s_An, mask=dmask, other=0.0) * 1.4426950408889634
    off = pid_b * NSEG * N * DM + n * DM + d
    h = tl.zeros([N, BD], dtype=tl.float32)
    for seg_i in range(0, NSEG):
        seg = NSEG - 1 - seg_i if REVERSE else seg_i
        tl.store(hs_ptr + off + seg * N * DM, h, mask=dmask)
        sdt = tl.load(sdt_ptr + (pid_b * NSEG + seg) * DM + d, mask=dmask, other=0.0)
        h = tl.exp2(A2 * sdt) * h + tl.load(hl_ptr + off + seg * N * DM, mask=dmask, other=0.0)
