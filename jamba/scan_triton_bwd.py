"""The selective scan's backward kernels (design: jamba/scan_triton.py's docstring; the op: jamba/scan_op.py)."""

from __future__ import annotations

import triton
import triton.language as tl

from .scan_triton import _col, _delta_tile, _put


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
    yp_ptr,
    hs_ptr,
    sc_ptr,
    ce_ptr,
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
    NB,
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
    BD: tl.constexpr,
    T: tl.constexpr,
    K: tl.constexpr,
    STAGES: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    SPLIT: tl.constexpr,
    SAVE_Y: tl.constexpr,
):
    # du, ddelta, dz: contiguous [b, d, L]; dAp [b, NS, N, d]; dDp, dbp [b, NS, d]; dBp, dCp [b, NP, L, N].
    # Work items: (batch, channel block) walking every segment backwards with the adjoint carried along
    # (SPLIT false, NS 1), or (batch, channel block, segment) starting from the carry _bwd_carry_kernel and
    # _combine_kernel computed for the segment's end (SPLIT, NS = NSEG). Programs loop over items, so the
    # scratch is per program, not per item.
    n = tl.arange(0, N)[:, None]
    tt = tl.arange(0, T)[None, :]
    NS = NSEG if SPLIT else 1
    sc_p = sc_ptr + tl.program_id(0).to(tl.int64) * (K // T) * N * BD + n * BD + tl.arange(0, BD)[None, :]
    for item in range(tl.program_id(0), NB * NP * NS, tl.num_programs(0)):
        seg_p = item % NS
        pid_d = (item // NS) % NP
        pid_b = (item // (NS * NP)).to(tl.int64)
        d = pid_d * BD + tl.arange(0, BD)[None, :]
        dc = pid_d * BD + tl.arange(0, BD)[:, None]
        dmask = d < DM
        dm = dc < DM
        A2 = tl.load(A_ptr + d * s_Ad + n * s_An, mask=dmask, other=0.0) * 1.4426950408889634
        Dv = tl.load(D_ptr + dc, mask=dm, other=0.0) if HAS_D else 0.0
        bias = tl.load(bias_ptr + dc, mask=dm, other=0.0) if HAS_BIAS else 0.0
        u_p = u_ptr + pid_b * s_ub + dc * s_ud
        dl_p = dl_ptr + pid_b * s_db + dc * s_dd
        z_p = z_ptr + pid_b * s_zb + dc * s_zd
        g_p = g_ptr + pid_b * s_gb + dc * s_gd
        o_p = (pid_b * DM + dc) * L  # offsets into du, ddelta, dz
        B_p = B_ptr + pid_b * s_Bb + n * s_Bn
        C_p = C_ptr + pid_b * s_Cb + n * s_Cn
        hs_p = hs_ptr + pid_b * NSEG * N * DM + n * DM + d
        red_p = (pid_b * NP + pid_d) * L * N + n  # + t * N: dB/dC partials of this channel block
        dA_acc = tl.zeros([N, BD], dtype=tl.float32)
        dD_acc = tl.zeros([BD, T], dtype=tl.float32)
        db_acc = tl.zeros([BD, T], dtype=tl.float32)
        seg_lo = seg_p if SPLIT else 0
        seg_hi = seg_p + 1 if SPLIT else NSEG
        if SPLIT:  # a_{t+1} * dh_{t+1} past the segment's end
            carry = tl.load(
                ce_ptr + pid_b * NSEG * N * DM + seg_p * N * DM + n * DM + d, mask=dmask, other=0.0
            )
        else:
            carry = tl.zeros([N, BD], dtype=tl.float32)
        for seg_i in range(seg_lo, seg_hi):
            seg = seg_hi - 1 - (seg_i - seg_lo)
            s0 = seg * K
            nch = tl.cdiv(tl.minimum(K, L - s0), T)
            tl.debug_barrier()  # the scratch is rewritten: the previous segment's readers are done
            # 1) the segment's chunk-start states, recomputed from the saved segment state
            h = tl.load(hs_p + seg * N * DM, mask=dmask, other=0.0)
            for c in tl.range(0, nch, num_stages=STAGES):
                tl.store(sc_p + c * N * BD, h)
                t0 = s0 + c * T
                dt_tile, _, m = _delta_tile(dl_p, tt, t0, L, dm, bias, HAS_BIAS, SOFTPLUS)
                u_tile = tl.load(u_p + t0 + tt, mask=m, other=0.0).to(tl.float32)
                for i in tl.static_range(T):
                    t = t0 + i
                    B_t = tl.load(B_p + t * s_Bl, mask=t < L, other=0.0).to(tl.float32)
                    dt = _col(dt_tile, tt, i)
                    h = tl.exp2(dt * A2) * h + (dt * _col(u_tile, tt, i)) * B_t
            tl.debug_barrier()  # scratch written by other threads than those that read it
            # 2) chunks backwards: T states in registers, then the adjoint recurrence
            for c_i in tl.range(0, nch, num_stages=STAGES):
                t0 = s0 + (nch - 1 - c_i) * T
                h = tl.load(sc_p + (nch - 1 - c_i) * N * BD)
                dt_tile, x_tile, m = _delta_tile(dl_p, tt, t0, L, dm, bias, HAS_BIAS, SOFTPLUS)
                u_tile = tl.load(u_p + t0 + tt, mask=m, other=0.0).to(tl.float32)
                g_tile = tl.load(g_p + t0 + tt, mask=m, other=0.0).to(tl.float32)
                hs = (h,)
                As = ()
                y_tile = tl.zeros([BD, T], dtype=tl.float32)
                for i in tl.static_range(T):
                    t = t0 + i
                    B_t = tl.load(B_p + t * s_Bl, mask=t < L, other=0.0).to(tl.float32)
                    dt = _col(dt_tile, tt, i)
                    a = tl.exp2(dt * A2)
                    h = a * h + (dt * _col(u_tile, tt, i)) * B_t
                    hs = hs + (h,)
                    As = As + (a,)
                    if HAS_Z and not SAVE_Y:
                        C_t = tl.load(C_p + t * s_Cl, mask=t < L, other=0.0).to(tl.float32)
                        y_tile = _put(y_tile, tt, i, tl.sum(h * C_t, axis=0))
                if HAS_Z:
                    z_tile = tl.load(z_p + t0 + tt, mask=m, other=0.0).to(tl.float32)
                    if SAVE_Y:  # the forward's y before the gate: no sum over the states here
                        y_tile = tl.load(yp_ptr + o_p + t0 + tt, mask=m, other=0.0).to(tl.float32)
                    elif HAS_D:
                        y_tile += Dv * u_tile
                    sz = tl.sigmoid(z_tile)
                    dz_tile = g_tile * y_tile * sz * (1.0 + z_tile * (1.0 - sz))
                    tl.store(dz_ptr + o_p + t0 + tt, dz_tile.to(dz_ptr.dtype.element_ty), mask=m)
                    dy_tile = g_tile * z_tile * sz
                else:
                    dy_tile = g_tile
                s1_tile = tl.zeros([BD, T], dtype=tl.float32)  # sum_n dh * B
                s2_tile = tl.zeros([BD, T], dtype=tl.float32)  # sum_n dh * a * h_{t-1} * A
                for i in tl.static_range(T - 1, -1, -1):
                    t = t0 + i
                    tin = t < L
                    B_t = tl.load(B_p + t * s_Bl, mask=tin, other=0.0).to(tl.float32)
                    C_t = tl.load(C_p + t * s_Cl, mask=tin, other=0.0).to(tl.float32)
                    dt = _col(dt_tile, tt, i)
                    dy = _col(dy_tile, tt, i)
                    dh = carry + dy * C_t
                    dC = tl.sum(dy * hs[i + 1], axis=1)
                    dB = tl.sum(dh * (dt * _col(u_tile, tt, i)), axis=1)
                    tl.store(dCp_ptr + red_p + t * N, dC[:, None], mask=tin)
                    tl.store(dBp_ptr + red_p + t * N, dB[:, None], mask=tin)
                    s1_tile = _put(s1_tile, tt, i, tl.sum(dh * B_t, axis=0))
                    carry = As[i] * dh
                    w = carry * hs[i]  # dh_t * a_t * h_{t-1}
                    dA_acc += dt * w
                    s2_tile = _put(s2_tile, tt, i, tl.sum(w * A2, axis=0))
                du_tile = dt_tile * s1_tile
                if HAS_D:
                    du_tile += dy_tile * Dv
                    dD_acc += dy_tile * u_tile
                ddt = u_tile * s1_tile + s2_tile * 0.6931471805599453
                if SOFTPLUS:
                    ddt = tl.where(x_tile > 20.0, ddt, ddt * tl.sigmoid(x_tile))
                ddt = tl.where(m, ddt, 0.0)
                db_acc += ddt
                tl.store(du_ptr + o_p + t0 + tt, du_tile.to(du_ptr.dtype.element_ty), mask=m)
                tl.store(ddl_ptr + o_p + t0 + tt, ddt.to(ddl_ptr.dtype.element_ty), mask=m)
        part = pid_b * NS + seg_p
        tl.store(dAp_ptr + part * N * DM + n * DM + d, dA_acc, mask=dmask)
        if HAS_D:
            tl.store(dDp_ptr + part * DM + dc, tl.sum(dD_acc, axis=1)[:, None], mask=dm)
        if HAS_BIAS:
            tl.store(dbp_ptr + part * DM + dc, tl.sum(db_acc, axis=1)[:, None], mask=dm)


@triton.jit
def _bwd_carry_kernel(
    dl_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, g_ptr, G_ptr, sdt_ptr, L, DM, NSEG,
    s_db, s_dd, s_Ad, s_An, s_Cb, s_Cn, s_Cl, s_zb, s_zd, s_gb, s_gd,
    N: tl.constexpr, BD: tl.constexpr, T: tl.constexpr, K: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """Per segment, the adjoint carry it hands to the segment before (a_t0 * dh_t0) when nothing comes in from
    the segments after, and its sum of delta: _combine_kernel (reversed) then gives every segment's incoming
    carry, so the backward's segments run in parallel."""
    pid_b = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(2)
    n = tl.arange(0, N)[:, None]
    d = tl.program_id(1) * BD + tl.arange(0, BD)[None, :]
    dc = tl.program_id(1) * BD + tl.arange(0, BD)[:, None]
    tt = tl.arange(0, T)[None, :]
    dmask = d < DM
    dm = dc < DM
    A2 = tl.load(A_ptr + d * s_Ad + n * s_An, mask=dmask, other=0.0) * 1.4426950408889634
    bias = tl.load(bias_ptr + dc, mask=dm, other=0.0) if HAS_BIAS else 0.0
    dl_p = dl_ptr + pid_b * s_db + dc * s_dd
    z_p = z_ptr + pid_b * s_zb + dc * s_zd
    g_p = g_ptr + pid_b * s_gb + dc * s_gd
    C_p = C_ptr + pid_b * s_Cb + n * s_Cn
    s0 = seg * K
    nch = tl.cdiv(tl.minimum(K, L - s0), T)
    carry = tl.zeros([N, BD], dtype=tl.float32)
    sdt = tl.zeros([BD, T], dtype=tl.float32)
    for c_i in range(0, nch):
        t0 = s0 + (nch - 1 - c_i) * T
        dt_tile, _, m = _delta_tile(dl_p, tt, t0, L, dm, bias, HAS_BIAS, SOFTPLUS)
        sdt += dt_tile
        dy_tile = tl.load(g_p + t0 + tt, mask=m, other=0.0).to(tl.float32)
        if HAS_Z:
            z_tile = tl.load(z_p + t0 + tt, mask=m, other=0.0).to(tl.float32)
            dy_tile *= z_tile * tl.sigmoid(z_tile)
        for i in tl.static_range(T - 1, -1, -1):
            t = t0 + i
            C_t = tl.load(C_p + t * s_Cl, mask=t < L, other=0.0).to(tl.float32)
            carry = tl.exp2(_col(dt_tile, tt, i) * A2) * (carry + _col(dy_tile, tt, i) * C_t)
    tl.store(G_ptr + pid_b * NSEG * N * DM + seg * N * DM + n * DM + d, carry, mask=dmask)
    tl.store(sdt_ptr + (pid_b * NSEG + seg) * DM + dc, tl.sum(sdt, axis=1)[:, None], mask=dm)
