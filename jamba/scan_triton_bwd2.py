"""The selective scan's backward, layout 2 (`ScanTiling.bwd=2`; design: jamba/scan_triton.py's docstring, the op:
jamba/scan_op.py). Same work and outputs as jamba/scan_triton_bwd.py's _scan_bwd_kernel, laid out so that the
per-step work stays in registers:
- A is read as [d, n] (the states the fast axis), so Triton lays the [N, BD] states out as 4 consecutive states by
  BD/8 channels a lane (4 lanes over the states, 8 over the channels): the reductions over the states (du, d_delta,
  y) are 3 in-thread FMAs and 2 shuffle levels per channel, those over the channels (dB, dC) BD/8 - 1 in-thread
  adds and 3 shuffle levels per state.
- The per-channel tiles are [T, BD], time first, in the states' layout family (a lane holds all T steps of its
  channels): a step's column of a tile and the write of a reduced step back into one are in-thread selects, not
  layout conversions through shared memory (the old kernel's ~6 barriers a step).
- The chunk-start scratch is [BD, N] (the states contiguous, a lane's 4 states one 16-byte access); dA's partial
  sums are [d, n] for the same reason.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .scan_triton import _delta_tile


@triton.jit
def _col3(tile, tt, i: tl.constexpr):
    """Step i of a [1, BD, T] tile as [1, BD, 1] (a thread's own registers: the selects fold away)."""
    return tl.sum(tl.where(tt == i, tile, -0.0), axis=2)[:, :, None]


@triton.jit
def _put3(tile, tt, i: tl.constexpr, v):
    """The [1, BD, T] tile with step i replaced by v ([BD])."""
    return tl.where(tt == i, v[None, :, None], tile)


@triton.jit
def _sum_n(x):
    """[G, BD, J] states summed over the states (J in-thread, then G over lanes): [BD]."""
    return tl.sum(tl.sum(x, axis=2), axis=0)


@triton.jit
def _scan_bwd2_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, g_ptr, yp_ptr, hs_ptr, sc_ptr, ce_ptr,
    du_ptr, ddl_ptr, dz_ptr, dAp_ptr, dDp_ptr, dbp_ptr, dBp_ptr, dCp_ptr,
    L, DM, NSEG, NP, NB,
    s_ub, s_ud, s_db, s_dd, s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl, s_zb, s_zd, s_gb, s_gd,
    N: tl.constexpr, BD: tl.constexpr, T: tl.constexpr, K: tl.constexpr, STAGES: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SPLIT: tl.constexpr, SAVE_Y: tl.constexpr,
):  # fmt: skip
    # du, ddelta, dz: contiguous [b, d, L]; dAp [b, NS, d, N]; dDp, dbp [b, NS, d]; dBp, dCp [b, NP, L, N]. Work
    # items and the split as in _scan_bwd_kernel. States are [G, BD, J] with state n = g * J + j. The
    # per-channel tiles are [BD, T] (elementwise work once per element), seen by the states as [1, BD, T].
    J: tl.constexpr = 4 if N >= 4 else N
    G: tl.constexpr = N // J
    dd = tl.arange(0, BD)[None, :, None]
    gg = tl.arange(0, G)[:, None, None]
    nn = gg * J + tl.arange(0, J)[None, None, :]  # [G, 1, J]
    tt = tl.arange(0, T)[None, None, :]  # [1, 1, T]
    t2 = tl.arange(0, T)[None, :]  # [1, T]
    w0 = dd == 0  # the channel that writes dB, dC
    NS = NSEG if SPLIT else 1
    sc0 = sc_ptr + tl.program_id(0).to(tl.int64) * (K // T) * (N + T) * BD
    sc_p = sc0 + dd * N + nn  # + c * N * BD: chunk c's start state
    dts_p = sc0 + (K // T) * N * BD + tl.arange(0, BD)[:, None] * T + t2  # + c * BD * T: chunk c's delta
    for item in range(tl.program_id(0), NB * NP * NS, tl.num_programs(0)):
        seg_p = item % NS
        pid_d = (item // NS) % NP
        pid_b = (item // (NS * NP)).to(tl.int64)
        d = pid_d * BD + dd  # [1, BD, 1]
        dm = d < DM
        dc = pid_d * BD + tl.arange(0, BD)[:, None]  # [BD, 1]: the tiles' channels
        dmc = dc < DM
        A2 = tl.load(A_ptr + d * s_Ad + nn * s_An, mask=dm, other=0.0) * 1.4426950408889634
        Dv = tl.load(D_ptr + dc, mask=dmc, other=0.0) if HAS_D else 0.0
        bias = tl.load(bias_ptr + dc, mask=dmc, other=0.0) if HAS_BIAS else 0.0
        u_p = u_ptr + pid_b * s_ub + dc * s_ud
        dl_p = dl_ptr + pid_b * s_db + dc * s_dd
        z_p = z_ptr + pid_b * s_zb + dc * s_zd
        g_p = g_ptr + pid_b * s_gb + dc * s_gd
        o_p = (pid_b * DM + dc) * L  # offsets into du, ddelta, dz
        B_p = B_ptr + pid_b * s_Bb + nn * s_Bn
        C_p = C_ptr + pid_b * s_Cb + nn * s_Cn
        hs_p = hs_ptr + pid_b * NSEG * N * DM + nn * DM + d
        red_p = (pid_b * NP + pid_d) * L * N + nn + dd * 0  # + t * N: dB/dC partials of this channel block
        dA_acc = tl.zeros([G, BD, J], dtype=tl.float32)
        dD_acc = tl.zeros([BD, T], dtype=tl.float32)
        db_acc = tl.zeros([BD, T], dtype=tl.float32)
        seg_lo = seg_p if SPLIT else 0
        seg_hi = seg_p + 1 if SPLIT else NSEG
        if SPLIT:  # a_{t+1} * dh_{t+1} past the segment's end
            carry = tl.load(ce_ptr + pid_b * NSEG * N * DM + seg_p * N * DM + nn * DM + d, mask=dm, other=0.0)
        else:
            carry = tl.zeros([G, BD, J], dtype=tl.float32)
        for seg_i in range(seg_lo, seg_hi):
            seg = seg_hi - 1 - (seg_i - seg_lo)
            s0 = seg * K
            nch = tl.cdiv(tl.minimum(K, L - s0), T)
            tl.debug_barrier()  # the scratch is rewritten: the previous segment's readers are done
            # 1) the segment's chunk-start states, recomputed from the saved segment state
            # (through the scratch: h then has the scratch's layout, 4 states a thread, not the saved states')
            tl.store(sc_p, tl.load(hs_p + seg * N * DM, mask=dm, other=0.0))
            tl.debug_barrier()
            h = tl.load(sc_p)
            for c in tl.range(0, nch, num_stages=STAGES):
                tl.store(sc_p + c * N * BD, h)
                t0 = s0 + c * T
                dt2, _, m = _delta_tile(dl_p, t2, t0, L, dmc, bias, HAS_BIAS, SOFTPLUS)
                tl.store(dts_p + c * BD * T, dt2)  # pass 2 reads it back: one softplus an element
                dtu3 = (dt2 * tl.load(u_p + t0 + t2, mask=m, other=0.0).to(tl.float32))[None, :, :]
                dt3 = dt2[None, :, :]
                for i in tl.static_range(T):
                    t = t0 + i
                    B_t = tl.load(B_p + t * s_Bl, mask=t < L, other=0.0).to(tl.float32)
                    h = tl.exp2(_col3(dt3, tt, i) * A2) * h + _col3(dtu3, tt, i) * B_t
            tl.debug_barrier()  # scratch written by other threads than those that read it
            # 2) chunks backwards: T states in registers, then the adjoint recurrence
            for c_i in tl.range(0, nch, num_stages=STAGES):
                t0 = s0 + (nch - 1 - c_i) * T
                h = tl.load(sc_p + (nch - 1 - c_i) * N * BD)
                m = dmc & (t0 + t2 < L)
                dt2 = tl.load(dts_p + (nch - 1 - c_i) * BD * T)
                u2 = tl.load(u_p + t0 + t2, mask=m, other=0.0).to(tl.float32)
                g2 = tl.load(g_p + t0 + t2, mask=m, other=0.0).to(tl.float32)
                dt3 = dt2[None, :, :]
                dtu3 = (dt2 * u2)[None, :, :]
                hs = (h,)
                As = ()
                y3 = tl.zeros([1, BD, T], dtype=tl.float32)
                for i in tl.static_range(T):
                    t = t0 + i
                    B_t = tl.load(B_p + t * s_Bl, mask=t < L, other=0.0).to(tl.float32)
                    a = tl.exp2(_col3(dt3, tt, i) * A2)
                    h = a * h + _col3(dtu3, tt, i) * B_t
                    hs = hs + (h,)
                    As = As + (a,)
                    if HAS_Z and not SAVE_Y:
                        C_t = tl.load(C_p + t * s_Cl, mask=t < L, other=0.0).to(tl.float32)
                        y3 = _put3(y3, tt, i, _sum_n(h * C_t))
                if HAS_Z:
                    z2 = tl.load(z_p + t0 + t2, mask=m, other=0.0).to(tl.float32)
                    if SAVE_Y:  # the forward's y before the gate: no sum over the states here
                        y2 = tl.load(yp_ptr + o_p + t0 + t2, mask=m, other=0.0).to(tl.float32)
                    else:
                        y2 = tl.reshape(y3, (BD, T))
                        if HAS_D:
                            y2 += Dv * u2
                    sz = tl.sigmoid(z2)
                    dz2 = g2 * y2 * sz * (1.0 + z2 * (1.0 - sz))
                    tl.store(dz_ptr + o_p + t0 + t2, dz2.to(dz_ptr.dtype.element_ty), mask=m)
                    dy2 = g2 * z2 * sz
                else:
                    dy2 = g2
                dy3 = dy2[None, :, :]
                s1_3 = tl.zeros([1, BD, T], dtype=tl.float32)  # sum_n dh * B
                s2_3 = tl.zeros([1, BD, T], dtype=tl.float32)  # sum_n dh * a * h_{t-1} * A
                for i in tl.static_range(T - 1, -1, -1):
                    t = t0 + i
                    tin = t < L
                    B_t = tl.load(B_p + t * s_Bl, mask=tin, other=0.0).to(tl.float32)
                    C_t = tl.load(C_p + t * s_Cl, mask=tin, other=0.0).to(tl.float32)
                    dy = _col3(dy3, tt, i)
                    dh = carry + dy * C_t
                    dC = tl.sum(dy * hs[i + 1], axis=1)[:, None, :]  # [G, 1, J]
                    dB = tl.sum(dh * _col3(dtu3, tt, i), axis=1)[:, None, :]
                    # broadcast over the channels and written by the first: the reduction's own layout
                    tl.store(dCp_ptr + red_p + t * N, dC + 0.0 * dh, mask=tin & w0)
                    tl.store(dBp_ptr + red_p + t * N, dB + 0.0 * dh, mask=tin & w0)
                    s1_3 = _put3(s1_3, tt, i, _sum_n(dh * B_t))
                    carry = As[i] * dh
                    w = carry * hs[i]  # dh_t * a_t * h_{t-1}
                    dA_acc += _col3(dt3, tt, i) * w
                    s2_3 = _put3(s2_3, tt, i, _sum_n(w * A2))
                s1 = tl.reshape(s1_3, (BD, T))
                du2 = dt2 * s1
                if HAS_D:
                    du2 += dy2 * Dv
                    dD_acc += dy2 * u2
                ddt = u2 * s1 + tl.reshape(s2_3, (BD, T)) * 0.6931471805599453
                if SOFTPLUS:  # softplus' = sigmoid(x) = 1 - exp(-softplus(x)); the identity above 20
                    ddt = tl.where(dt2 > 20.0, ddt, ddt * (1.0 - tl.exp2(dt2 * -1.4426950408889634)))
                ddt = tl.where(m, ddt, 0.0)
                db_acc += ddt
                tl.store(du_ptr + o_p + t0 + t2, du2.to(du_ptr.dtype.element_ty), mask=m)
                tl.store(ddl_ptr + o_p + t0 + t2, ddt.to(ddl_ptr.dtype.element_ty), mask=m)
        part = pid_b * NS + seg_p
        tl.store(dAp_ptr + part * N * DM + d * N + nn, dA_acc, mask=dm)
        if HAS_D:
            tl.store(dDp_ptr + part * DM + dc, tl.sum(dD_acc, axis=1)[:, None], mask=dmc)
        if HAS_BIAS:
            tl.store(dbp_ptr + part * DM + dc, tl.sum(db_acc, axis=1)[:, None], mask=dmc)
