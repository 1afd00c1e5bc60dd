"""Mamba-1 selective scan in Triton: forward and backward kernels (the reference is jamba.scan.selective_scan_ref).

Design (see docs/model.md, "Selective scan kernels"):
- One program per (batch, block of RD*LD channels); each holds its channels' [d_state] states in fp32 registers
  as an [RD, N, LD] tensor and walks time sequentially. Triton spreads the last axis over lanes first, so LD
  picks how many lanes share the channels and RD how many channels a thread holds: reductions over the state
  axis (y, du, d_delta) and over channels (dB, dC) are then mostly in-thread adds.
- B_t and C_t ([N] per step) are loaded once per program and shared by all its channels; decays use exp2 with
  A pre-scaled by log2(e).
- The forward saves only the state at the start of every K-step segment ([b, L/K, N, d] fp32).
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
def _delta(dl_ptrs, t, tm, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta at step t (0 where masked, so the step is the identity) and its raw pre-activation."""
    x = tl.load(dl_ptrs + t, mask=tm, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x = x + bias
    dt = x
    if SOFTPLUS:
        dt = _softplus(x)
    return tl.where(tm, dt, 0.0), x


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
    hs_ptr,
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
    RD: tl.constexpr,
    LD: tl.constexpr,
    T: tl.constexpr,
    K: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
):
    # u, delta, z, y: time is the unit-stride axis; y is contiguous [b, d, L]
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    r = tl.arange(0, RD)[:, None, None]
    n = tl.arange(0, N)[None, :, None]
    ld = tl.arange(0, LD)[None, None, :]
    d = pid_d * (RD * LD) + r * LD + ld  # [RD, 1, LD]
    dmask = d < DM
    A2 = tl.load(A_ptr + d * s_Ad + n * s_An, mask=dmask, other=0.0) * 1.4426950408889634  # [RD, N, LD]
    Dv = tl.load(D_ptr + d, mask=dmask, other=0.0) if HAS_D else 0.0
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0) if HAS_BIAS else 0.0
    u_p = u_ptr + pid_b * s_ub + d * s_ud
    dl_p = dl_ptr + pid_b * s_db + d * s_dd
    z_p = z_ptr + pid_b * s_zb + d * s_zd
    y_p = y_ptr + (pid_b * DM + d) * L
    B_p = B_ptr + pid_b * s_Bb + n * s_Bn
    C_p = C_ptr + pid_b * s_Cb + n * s_Cn
    hs_p = hs_ptr + pid_b * NSEG * N * DM + n * DM + d
    h = tl.zeros([RD, N, LD], dtype=tl.float32)
    for seg in range(0, NSEG):
        tl.store(hs_p + seg * N * DM, h, mask=dmask)
        for t0 in range(seg * K, tl.minimum(seg * K + K, L), T):
            for i in tl.static_range(T):
                t = t0 + i
                tin = t < L
                tm = dmask & tin
                dt, _ = _delta(dl_p, t, tm, bias, HAS_BIAS, SOFTPLUS)
                u_t = tl.load(u_p + t, mask=tm, other=0.0).to(tl.float32)
                B_t = tl.load(B_p + t * s_Bl, mask=tin, other=0.0).to(tl.float32)
                C_t = tl.load(C_p + t * s_Cl, mask=tin, other=0.0).to(tl.float32)
                h = tl.exp2(dt * A2) * h + (dt * u_t) * B_t
                y = tl.sum(h * C_t, axis=1, keep_dims=True)
                if HAS_D:
                    y += Dv * u_t
                if HAS_Z:
                    z_t = tl.load(z_p + t, mask=tm, other=0.0).to(tl.float32)
                    y *= z_t * tl.sigmoid(z_t)
                tl.store(y_p + t, y.to(y_ptr.dtype.element_ty), mask=tm)


@triton.jit
def _scan_bwd_kernel(
    u_ptr,
    dl_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    g_ptr,
    hs_ptr,
    sc_ptr,
    du_ptr,
    ddl_ptr,
    dz_ptr,
    dAp_ptr,
    dDp_ptr,
    dbp_ptr,
    dBp_ptr,
    dCp_ptr,
    L,
    DM,
    NSEG,
    NP,
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
    s_gb,
    s_gd,
    N: tl.constexpr,
    RD: tl.constexpr,
    LD: tl.constexpr,
    T: tl.constexpr,
    K: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
):
    # du, ddelta, dz: contiguous [b, d, L]; dAp [b, N, d]; dDp, dbp [b, d]; dBp, dCp [b, NP, L, N]
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    r = tl.arange(0, RD)[:, None, None]
    n = tl.arange(0, N)[None, :, None]
    ld = tl.arange(0, LD)[None, None, :]
    d = pid_d * (RD * LD) + r * LD + ld
    dmask = d < DM
    A2 = tl.load(A_ptr + d * s_Ad + n * s_An, mask=dmask, other=0.0) * 1.4426950408889634
    Dv = tl.load(D_ptr + d, mask=dmask, other=0.0) if HAS_D else 0.0
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0) if HAS_BIAS else 0.0
    u_p = u_ptr + pid_b * s_ub + d * s_ud
    dl_p = dl_ptr + pid_b * s_db + d * s_dd
    z_p = z_ptr + pid_b * s_zb + d * s_zd
    g_p = g_ptr + pid_b * s_gb + d * s_gd
    o_p = (pid_b * DM + d) * L  # offsets into du, ddelta, dz
    B_p = B_ptr + pid_b * s_Bb + n * s_Bn
    C_p = C_ptr + pid_b * s_Cb + n * s_Cn
    hs_p = hs_ptr + pid_b * NSEG * N * DM + n * DM + d
    # scratch: this program's chunk-start states of one segment, [K // T, N, RD * LD]
    pid = pid_b * tl.num_programs(1) + pid_d
    sc_p = sc_ptr + pid * (K // T) * N * (RD * LD) + n * (RD * LD) + r * LD + ld
    red_p = (pid_b * NP + pid_d) * L * N + n  # + t * N: dB/dC partials of this program
    dA_acc = tl.zeros([RD, N, LD], dtype=tl.float32)
    dD_acc = tl.zeros([RD, 1, LD], dtype=tl.float32)
    db_acc = tl.zeros([RD, 1, LD], dtype=tl.float32)
    carry = tl.zeros([RD, N, LD], dtype=tl.float32)  # a_{t+1} * dh_{t+1}
    for seg_i in range(0, NSEG):
        seg = NSEG - 1 - seg_i
        s0 = seg * K
        tl.debug_barrier()  # the scratch is rewritten: the previous segment's readers are done
        nch = tl.cdiv(tl.minimum(K, L - s0), T)
        # 1) the segment's chunk-start states, recomputed from the saved segment state
        h = tl.load(hs_p + seg * N * DM, mask=dmask, other=0.0)
        for c in range(0, nch):
            tl.store(sc_p + c * N * (RD * LD), h)
            for i in tl.static_range(T):
                t = s0 + c * T + i
                tin = t < L
                tm = dmask & tin
                dt, _ = _delta(dl_p, t, tm, bias, HAS_BIAS, SOFTPLUS)
                u_t = tl.load(u_p + t, mask=tm, other=0.0).to(tl.float32)
                B_t = tl.load(B_p + t * s_Bl, mask=tin, other=0.0).to(tl.float32)
                h = tl.exp2(dt * A2) * h + (dt * u_t) * B_t
        tl.debug_barrier()  # scratch written by other threads than those that read it
        # 2) chunks backwards: T states in registers, then the adjoint recurrence
        for c_i in range(0, nch):
            t0 = s0 + (nch - 1 - c_i) * T
            h = tl.load(sc_p + (nch - 1 - c_i) * N * (RD * LD))
            hs = (h,)
            As = ()
            ys = ()
            for i in tl.static_range(T):
                t = t0 + i
                tin = t < L
                tm = dmask & tin
                dt, _ = _delta(dl_p, t, tm, bias, HAS_BIAS, SOFTPLUS)
                u_t = tl.load(u_p + t, mask=tm, other=0.0).to(tl.float32)
                B_t = tl.load(B_p + t * s_Bl, mask=tin, other=0.0).to(tl.float32)
                C_t = tl.load(C_p + t * s_Cl, mask=tin, other=0.0).to(tl.float32)
                a = tl.exp2(dt * A2)
                h = a * h + (dt * u_t) * B_t
                y = tl.sum(h * C_t, axis=1, keep_dims=True)
                if HAS_D:
                    y += Dv * u_t
                hs = hs + (h,)
                As = As + (a,)
                ys = ys + (y,)
            for i in tl.static_range(T - 1, -1, -1):
                t = t0 + i
                tin = t < L
                tm = dmask & tin
                dt, x = _delta(dl_p, t, tm, bias, HAS_BIAS, SOFTPLUS)
                u_t = tl.load(u_p + t, mask=tm, other=0.0).to(tl.float32)
                B_t = tl.load(B_p + t * s_Bl, mask=tin, other=0.0).to(tl.float32)
                C_t = tl.load(C_p + t * s_Cl, mask=tin, other=0.0).to(tl.float32)
                g = tl.load(g_p + t, mask=tm, other=0.0).to(tl.float32)
                if HAS_Z:
                    z_t = tl.load(z_p + t, mask=tm, other=0.0).to(tl.float32)
                    sz = tl.sigmoid(z_t)
                    dy = g * z_t * sz
                    dz = g * ys[i] * sz * (1.0 + z_t * (1.0 - sz))
                    tl.store(dz_ptr + o_p + t, dz.to(dz_ptr.dtype.element_ty), mask=tm)
                else:
                    dy = g
                dh = carry + dy * C_t
                dC = tl.sum(tl.sum(dy * hs[i + 1], axis=2, keep_dims=True), axis=0, keep_dims=True)
                dB = tl.sum(tl.sum(dh * (dt * u_t), axis=2, keep_dims=True), axis=0, keep_dims=True)
                tl.store(dCp_ptr + red_p + t * N, dC, mask=tin)
                tl.store(dBp_ptr + red_p + t * N, dB, mask=tin)
                s1 = tl.sum(dh * B_t, axis=1, keep_dims=True)
                carry = As[i] * dh
                w = carry * hs[i]  # dh_t * a_t * h_{t-1}
                dA_acc += dt * w
                s2 = tl.sum(w * A2, axis=1, keep_dims=True) * 0.6931471805599453
                du = dt * s1
                if HAS_D:
                    du += dy * Dv
                    dD_acc += dy * u_t
                ddt = u_t * s1 + s2
                if SOFTPLUS:
                    ddt = tl.where(x > 20.0, ddt, ddt * tl.sigmoid(x))
                ddt = tl.where(tm, ddt, 0.0)
                db_acc += ddt
                tl.store(du_ptr + o_p + t, du.to(du_ptr.dtype.element_ty), mask=tm)
                tl.store(ddl_ptr + o_p + t, ddt.to(ddl_ptr.dtype.element_ty), mask=tm)
    tl.store(dAp_ptr + pid_b * N * DM + n * DM + d, dA_acc, mask=dmask)
    if HAS_D:
        tl.store(dDp_ptr + pid_b * DM + d, dD_acc, mask=dmask)
    if HAS_BIAS:
        tl.store(dbp_ptr + pid_b * DM + d, db_acc, mask=dmask)
