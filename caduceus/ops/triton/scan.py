"""Mamba-1 selective scan in Triton, (batch, length, channels) layout.

One program owns a batch row and a block of ``BD`` channels; its state ``h[N, BD]`` stays in registers while it walks
time sequentially (work-efficient: one exp2 per state element). Inputs are loaded a block of ``U`` steps ahead of use
(double-buffered tuples), because Triton does not software-pipeline a sequential loop and a step would otherwise wait
for its own loads. ``reverse`` only changes the index arithmetic. The forward saves the state every ``CHUNK`` steps;
the backward walks the chunks in reverse, recomputes each ``SUB``-step piece into registers (states and decays, so the
reverse step needs no exp of its own) and runs the adjoint back over it. dB and dC are summed over the program's
channels, written per channel block and summed in a fixed order. Both directions cut time into segments run in
parallel when (batch, channel block) programs are too few: state (forward) or adjoint (backward) is passed between
segments by a small chaining kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# The CPU interpreter (TRITON_INTERPRET=1) runs no PTX: the kernels' ``MUFU`` forms are off there.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

CHUNK = 256  # steps between saved states: B*D*N*4 bytes per CHUNK steps, ~1/8 of a bf16 (b, l, d) tensor
# Time is cut into segments when fewer than ``cut_below`` (batch, channel block) programs would run, into as many as
# make about ``programs`` programs; the forward's cut costs a second pass over the exps, the backward's does not.
# U: steps per prefetched block. mufu: softplus' log2 and the sigmoid's reciprocal as single MUFU instructions
# instead of FMA-pipe sequences. From ``busy`` forward programs on (several warps per SM sub-partition) the forward is
# issue-bound and fewer instructions win (U 4, mufu); with fewer it is latency-bound: the FMA-pipe forms and, without
# saved states, the deeper prefetch of U 8 (which spills; with the state stores it measured slower) win ("_idle" keys).
# See BENCHMARKS.md, GPU (H100).
FWD_CONFIG = {"BD": 16, "num_warps": 1, "cut_below": 512, "programs": 4096, "busy": 2048, "U": 4, "mufu": True,
              "U_idle": 8, "U_idle_save": 4, "mufu_idle": False}
BWD_CONFIG = {"BD": 16, "SUB": 4, "num_warps": 1, "cut_below": 2048, "programs": 4096, "mufu": True}


@triton.jit
def _log2(x, MUFU: tl.constexpr):
    """log2 for x >= 1. tl.log2 compiles to a ~25-instruction FMA polynomial; ``MUFU``: lg2.approx (one MUFU op,
    relative error ~2^-22), which competes with the decays' exp2 for the MUFU pipe."""
    if MUFU:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _rcp(x, MUFU: tl.constexpr):
    """1 / x for x >= 1: ``MUFU``: rcp.approx (one MUFU op, ~1 ulp) instead of the full-range division."""
    if MUFU:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return 1.0 / x


@triton.jit
def _softplus(x, MUFU: tl.constexpr):
    """log(1 + e^x) through exp2/log2, identity above 20 like the CUDA kernel."""
    return tl.where(x <= 20.0, _log2(1.0 + tl.exp2(x * LOG2E), MUFU) * LN2, x)


@triton.jit
def _sigmoid(x, MUFU: tl.constexpr):
    return _rcp(1.0 + tl.exp2(-x * LOG2E), MUFU)


@triton.jit
def _rows(ptr, base, step, i0, end, offs, mask, U: tl.constexpr, HAS_MASK: tl.constexpr = True):
    """Load U consecutive walk steps i0..i0+U-1 (row ``base + j*step``); steps from ``end`` on read as 0. The B/C rows
    need no column mask (an all-true one would also stop Triton from vectorising them)."""
    rows = ()
    for j in tl.static_range(U):
        ok = (i0 + j < end) & mask if HAS_MASK else i0 + j < end
        rows = rows + (tl.load(ptr + base + j * step + offs, mask=ok, other=0.0),)
    return rows


@triton.jit
def _row_base(pid_b, i0, L, s_b, s_l, REVERSE: tl.constexpr):
    """Offset of walk step i0 (time i0, or L-1-i0 when reverse) and the offset between walk steps."""
    t0 = (L - 1 - i0) if REVERSE else i0
    step = -s_l if REVERSE else s_l
    return pid_b.to(tl.int64) * s_b + t0.to(tl.int64) * s_l, step


@triton.jit
def _load_block(u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, pid_b, i0, L, end, offs_d, offs_bc, mask_d,
                s_ub, s_ul, s_tb, s_tl, s_zb, s_zl, s_Bb, s_Bl, s_Cb, s_Cl,
                HAS_Z: tl.constexpr, LOAD_C: tl.constexpr, REVERSE: tl.constexpr, U: tl.constexpr):
    """The inputs of U walk steps starting at i0: tuples of u, delta, z (BD,) and B, C (NV, NH, BD). B and C are
    loaded already broadcast over the channels: as (NV, NH, 1) tiles Triton would spread them one element per
    lane and make that the layout of the whole loop."""
    base, step = _row_base(pid_b, i0, L, s_ub, s_ul, REVERSE)
    us = _rows(u_ptr, base, step, i0, end, offs_d, mask_d, U)
    base, step = _row_base(pid_b, i0, L, s_tb, s_tl, REVERSE)
    dts = _rows(dt_ptr, base, step, i0, end, offs_d, mask_d, U)
    base, step = _row_base(pid_b, i0, L, s_Bb, s_Bl, REVERSE)
    Bs = _rows(B_ptr, base, step, i0, end, offs_bc, None, U, False)
    zs = us
    Cs = Bs
    if HAS_Z:
        base, step = _row_base(pid_b, i0, L, s_zb, s_zl, REVERSE)
        zs = _rows(z_ptr, base, step, i0, end, offs_d, mask_d, U)
    if LOAD_C:
        base, step = _row_base(pid_b, i0, L, s_Cb, s_Cl, REVERSE)
        Cs = _rows(C_ptr, base, step, i0, end, offs_bc, None, U, False)
    return us, dts, zs, Bs, Cs


@triton.jit
def _dt(raw, bias, valid, SOFTPLUS: tl.constexpr, MUFU: tl.constexpr):
    """Discretisation step softplus(raw + bias); 0 on steps past the end so that they leave the state unchanged."""
    x = raw + bias
    if SOFTPLUS:
        x = _softplus(x, MUFU)
    return tl.where(valid, x, 0.0)


@triton.jit
def _sum_n(x):
    """Sum an (NV, NH, BD) tile over the states: NV within a thread, then NH across lanes."""
    return tl.sum(tl.sum(x, axis=0), axis=0)


@triton.jit
def _state_offsets(N: tl.constexpr, NV: tl.constexpr):
    """State index n = h*NV + v as an (NV, NH, 1) tile. Triton's default layout puts the last axis (channels) and
    then NH on lanes and keeps the NV contiguous states of the first axis in one thread, so that the B/C row loads
    are vector loads and most of the sum over states stays within a thread. Accesses to (d, n)-contiguous arrays
    (A, saved states) multiply n by a runtime ``one`` so that their coalescing does not override that layout."""
    n2 = tl.arange(0, NV)[:, None] + tl.arange(0, N // NV)[None, :] * NV
    return n2[:, :, None]


@triton.jit(do_not_specialize=["one"])
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, state_ptr, seg_state_ptr, seg_dt_ptr,
    L, DIM, SEG, one,
    s_ub, s_ul, s_tb, s_tl, s_zb, s_zl, s_Bb, s_Bl, s_Cb, s_Cl, s_ob, s_ol,
    N: tl.constexpr, NV: tl.constexpr, BD: tl.constexpr, U: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, SAVE_STATES: tl.constexpr, STATE_ONLY: tl.constexpr, HAS_INIT: tl.constexpr,
    MUFU: tl.constexpr,
):
    """out = scan(...) for one (batch row, channel block, segment of SEG walk steps); states[b, c] = the state
    before walk step c*CHUNK. With several segments the scan runs twice: first ``STATE_ONLY``, each segment from a
    zero state, writing its end state and sum of dt into seg_state/seg_dt; after the host chains those, again with
    ``HAS_INIT``, each segment starting from its true state read from seg_state."""
    pid_b = tl.program_id(0)
    seg = pid_b * tl.num_programs(2) + tl.program_id(2)
    start = tl.program_id(2) * SEG
    end = tl.minimum(L, start + SEG)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    mask_d = offs_d < DIM
    offs_n = _state_offsets(N, NV)
    offs_bc = tl.broadcast_to(offs_n, (NV, N // NV, BD))
    dn = offs_d[None, None, :] * N + offs_n * one  # `one` hides the contiguity over n: see _state_offsets
    mask_dn = mask_d[None, None, :] & (offs_n >= 0)
    A2 = tl.load(A_ptr + dn, mask=mask_dn, other=0.0) * LOG2E
    Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0) if HAS_D else tl.zeros([BD], tl.float32)
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0) if HAS_BIAS else tl.zeros([BD], tl.float32)
    st_base = state_ptr + (pid_b * tl.cdiv(L, CHUNK)).to(tl.int64) * DIM * N + dn
    seg_state = seg_state_ptr + seg.to(tl.int64) * DIM * N + dn
    if HAS_INIT:
        h = tl.load(seg_state, mask=mask_dn, other=0.0)
    else:
        h = tl.zeros([NV, N // NV, BD], tl.float32)
    dt_sum = tl.zeros([BD], tl.float32)
    nxt = _load_block(u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, pid_b, start, L, end, offs_d, offs_bc, mask_d,
                      s_ub, s_ul, s_tb, s_tl, s_zb, s_zl, s_Bb, s_Bl, s_Cb, s_Cl, HAS_Z and not STATE_ONLY,
                      not STATE_ONLY, REVERSE, U)
    for i0 in range(start, end, U):
        us, dts, zs, Bs, Cs = nxt
        nxt = _load_block(u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, pid_b, i0 + U, L, end, offs_d, offs_bc, mask_d,
                          s_ub, s_ul, s_tb, s_tl, s_zb, s_zl, s_Bb, s_Bl, s_Cb, s_Cl, HAS_Z and not STATE_ONLY,
                          not STATE_ONLY, REVERSE, U)
        if SAVE_STATES:
            if i0 % CHUNK == 0:
                tl.store(st_base + (i0 // CHUNK) * DIM * N, h, mask=mask_dn)
        out_base, out_step = _row_base(pid_b, i0, L, s_ob, s_ol, REVERSE)
        for j in tl.static_range(U):
            valid = i0 + j < end
            u = us[j].to(tl.float32)
            dt = _dt(dts[j].to(tl.float32), bias, valid, SOFTPLUS, MUFU)
            h = tl.exp2(dt[None, None, :] * A2) * h + (dt * u)[None, None, :] * Bs[j].to(tl.float32)
            if STATE_ONLY:
                dt_sum += dt
            else:
                y = _sum_n(h * Cs[j].to(tl.float32)) + Dv * u
                if HAS_Z:
                    z = zs[j].to(tl.float32)
                    y = y * z * _sigmoid(z, MUFU)
                tl.store(out_ptr + out_base + j * out_step + offs_d, y.to(out_ptr.dtype.element_ty),
                         mask=mask_d & valid)
    if STATE_ONLY:
        tl.store(seg_state, h, mask=mask_dn)
        tl.store(seg_dt_ptr + seg * DIM + offs_d, dt_sum, mask=mask_d)


@triton.jit
def _gate(g, z, HAS_Z: tl.constexpr, MUFU: tl.constexpr):
    """The output gradient seen by the scan: dout * z * sigmoid(z) under the SiLU(z) gate."""
    if HAS_Z:
        g = g * z * _sigmoid(z, MUFU)
    return g


@triton.jit(do_not_specialize=["one"])
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, state_ptr, scratch_ptr,
    seg_adj_ptr, seg_dt_ptr, du_ptr, ddt_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
    L, DIM, SEG, one,
    s_ub, s_ul, s_tb, s_tl, s_zb, s_zl, s_Bb, s_Bl, s_Cb, s_Cl, s_gb, s_gl,
    N: tl.constexpr, NV: tl.constexpr, BD: tl.constexpr, SUB: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, ADJ_ONLY: tl.constexpr, HAS_INIT: tl.constexpr, MUFU: tl.constexpr,
):
    """Gradients for one (batch row, channel block, segment of SEG walk steps, a multiple of CHUNK). du, ddt, dz share
    dout's (b, l, d) strides; dB/dC partials are (b, channel block, l, n); dA (b, segment, d, n), dD and dbias
    (b, segment, d) are summed over the segment's steps here. With several segments the adjoint runs twice: first
    ``ADJ_ONLY`` (no states, no gradients), each segment from a zero adjoint at its end, writing the adjoint at its
    start and its sum of dt into seg_adj/seg_dt; after those are chained, again with ``HAS_INIT``, each segment
    starting from the true adjoint read from seg_adj."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    n_blocks = tl.num_programs(1)
    seg = pid_b * tl.num_programs(2) + tl.program_id(2)
    start = tl.program_id(2) * SEG
    end = tl.minimum(L, start + SEG)
    offs_d = pid_d * BD + tl.arange(0, BD)
    mask_d = offs_d < DIM
    offs_n = _state_offsets(N, NV)
    offs_bc = tl.broadcast_to(offs_n, (NV, N // NV, BD))
    dn = offs_d[None, None, :] * N + offs_n * one  # `one` hides the contiguity over n: see _state_offsets
    mask_dn = mask_d[None, None, :] & (offs_n >= 0)
    A = tl.load(A_ptr + dn, mask=mask_dn, other=0.0)
    A2 = A * LOG2E
    Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0) if HAS_D else tl.zeros([BD], tl.float32)
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0) if HAS_BIAS else tl.zeros([BD], tl.float32)
    seg_adj = seg_adj_ptr + seg.to(tl.int64) * DIM * N + dn
    if HAS_INIT:
        dh = tl.load(seg_adj, mask=mask_dn, other=0.0)
    else:
        dh = tl.zeros([NV, N // NV, BD], tl.float32)
    if ADJ_ONLY:
        # dh <- a_t * (dh + g_t C_t) back over the segment; needs neither the states nor u and B.
        dt_sum = tl.zeros([BD], tl.float32)
        n_sub = tl.cdiv(end - start, SUB)
        for s_rev in range(n_sub):
            i0 = start + (n_sub - 1 - s_rev) * SUB
            base, step = _row_base(pid_b, i0, L, s_tb, s_tl, REVERSE)
            dts = _rows(dt_ptr, base, step, i0, L, offs_d, mask_d, SUB)
            base, step = _row_base(pid_b, i0, L, s_gb, s_gl, REVERSE)
            gs = _rows(dout_ptr, base, step, i0, L, offs_d, mask_d, SUB)
            base, step = _row_base(pid_b, i0, L, s_Cb, s_Cl, REVERSE)
            Cs = _rows(C_ptr, base, step, i0, L, offs_bc, None, SUB, False)
            zs = gs
            if HAS_Z:
                base, step = _row_base(pid_b, i0, L, s_zb, s_zl, REVERSE)
                zs = _rows(z_ptr, base, step, i0, L, offs_d, mask_d, SUB)
            for j in tl.static_range(SUB - 1, -1, -1):
                dt = _dt(dts[j].to(tl.float32), bias, i0 + j < L, SOFTPLUS, MUFU)
                g = _gate(gs[j].to(tl.float32), zs[j].to(tl.float32), HAS_Z, MUFU)
                dh = (dh + g[None, None, :] * Cs[j].to(tl.float32)) * tl.exp2(dt[None, None, :] * A2)
                dt_sum += dt
        tl.store(seg_adj, dh, mask=mask_dn)
        tl.store(seg_dt_ptr + seg * DIM + offs_d, dt_sum, mask=mask_d)
    else:
        n_chunks = tl.cdiv(L, CHUNK)
        st_base = state_ptr + (pid_b * n_chunks).to(tl.int64) * DIM * N + dn
        scratch = scratch_ptr + ((pid_b * n_blocks + pid_d) * tl.num_programs(2) + tl.program_id(2)).to(tl.int64) \
            * (CHUNK // SUB) * BD * N + tl.arange(0, BD)[None, None, :] * N + offs_n * one
        part_base = (pid_b * n_blocks + pid_d).to(tl.int64) * L * N + tl.reshape(offs_n, [NV, N // NV])
        dA_acc = tl.zeros([NV, N // NV, BD], tl.float32)
        dD_acc = tl.zeros([BD], tl.float32)
        dbias_acc = tl.zeros([BD], tl.float32)
        c_first = start // CHUNK
        n_seg_chunks = tl.cdiv(end - start, CHUNK)
        for c_rev in range(n_seg_chunks):
            c = c_first + n_seg_chunks - 1 - c_rev
            # The state at the start of each SUB-step piece of this chunk, into a small L2-resident scratch.
            h = tl.load(st_base + c * DIM * N, mask=mask_dn, other=0.0)
            n_sub = tl.cdiv(tl.minimum(CHUNK, L - c * CHUNK), SUB)
            for s in range(n_sub):
                i0 = c * CHUNK + s * SUB
                tl.store(scratch + s * BD * N, h)
                us, dts, _, Bs, _ = _load_block(u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, pid_b, i0, L, L, offs_d, offs_bc,
                                                mask_d, s_ub, s_ul, s_tb, s_tl, s_zb, s_zl, s_Bb, s_Bl, s_Cb, s_Cl,
                                                False, False, REVERSE, SUB)
                for j in tl.static_range(SUB):
                    dt = _dt(dts[j].to(tl.float32), bias, i0 + j < L, SOFTPLUS, MUFU)
                    h = tl.exp2(dt[None, None, :] * A2) * h + (dt * us[j].to(tl.float32))[None, None, :] * Bs[j]
            # Walk the pieces backwards: the piece's states and decays in registers, then the adjoint step by step.
            for s_rev in range(n_sub):
                s = n_sub - 1 - s_rev
                i0 = c * CHUNK + s * SUB
                us, dts, zs, Bs, Cs = _load_block(u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, pid_b, i0, L, L, offs_d,
                                                  offs_bc, mask_d, s_ub, s_ul, s_tb, s_tl, s_zb, s_zl, s_Bb, s_Bl,
                                                  s_Cb, s_Cl, HAS_Z, True, REVERSE, SUB)
                base, step = _row_base(pid_b, i0, L, s_gb, s_gl, REVERSE)
                gs = _rows(dout_ptr, base, step, i0, L, offs_d, mask_d, SUB)
                h = tl.load(scratch + s * BD * N)
                hs = (h,)
                decays = ()
                steps = ()
                for j in tl.static_range(SUB):
                    dt = _dt(dts[j].to(tl.float32), bias, i0 + j < L, SOFTPLUS, MUFU)
                    a = tl.exp2(dt[None, None, :] * A2)
                    h = a * h + (dt * us[j].to(tl.float32))[None, None, :] * Bs[j]
                    hs = hs + (h,)
                    decays = decays + (a,)
                    steps = steps + (dt,)
                for j in tl.static_range(SUB - 1, -1, -1):
                    valid = i0 + j < L
                    u = us[j].to(tl.float32)
                    Bj = Bs[j].to(tl.float32)
                    Cj = Cs[j].to(tl.float32)
                    dt = steps[j]
                    g = gs[j].to(tl.float32)
                    if HAS_Z:
                        z = zs[j].to(tl.float32)
                        sig = _sigmoid(z, MUFU)
                        y = _sum_n(hs[j + 1] * Cj) + Dv * u
                        dz = g * y * sig * (1.0 + z * (1.0 - sig))
                        tl.store(dz_ptr + base + j * step + offs_d, dz.to(dz_ptr.dtype.element_ty),
                                 mask=mask_d & valid)
                        g = g * z * sig
                    dh += g[None, None, :] * Cj
                    dhB = _sum_n(dh * Bj)
                    w = dh * decays[j] * hs[j]
                    ddt = _sum_n(w * A) + u * dhB
                    if SOFTPLUS:
                        x = dts[j].to(tl.float32) + bias
                        ddt = tl.where(x <= 20.0, ddt * _sigmoid(x, MUFU), ddt)
                    du = dt * dhB + Dv * g
                    dA_acc += w * dt[None, None, :]
                    dD_acc += g * u
                    dbias_acc += tl.where(valid, ddt, 0.0)
                    tl.store(du_ptr + base + j * step + offs_d, du.to(du_ptr.dtype.element_ty), mask=mask_d & valid)
                    tl.store(ddt_ptr + base + j * step + offs_d, ddt.to(ddt_ptr.dtype.element_ty),
                             mask=mask_d & valid)
                    part = part_base + ((L - 1 - i0 - j) if REVERSE else (i0 + j)) * N
                    tl.store(dB_ptr + part, tl.sum(dh * (dt * u)[None, None, :], axis=2), mask=valid)
                    tl.store(dC_ptr + part, tl.sum(hs[j + 1] * g[None, None, :], axis=2), mask=valid)
                    dh = dh * decays[j]
        tl.store(dA_ptr + seg.to(tl.int64) * DIM * N + dn, dA_acc, mask=mask_dn)
        tl.store(dD_ptr + seg * DIM + offs_d, dD_acc, mask=mask_d)
        tl.store(dbias_ptr + seg * DIM + offs_d, dbias_acc, mask=mask_d)


@triton.jit
def _chain_kernel(seg_ptr, seg_dt_ptr, A_ptr, S, DIM, N: tl.constexpr, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """In place over one batch row's S segments (b, S, d, n): seg[k] holds what segment k passes on from a zero start
    (its end state, or with ``REVERSE`` the adjoint at its start); it becomes what segment k receives. A segment
    decays what passes through it by exp(A * its sum of dt), so in walk order r_next = decay[k] * r[k] + seg[k]."""
    pid_b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # d * N + n
    mask = offs < DIM * N
    A2 = tl.load(A_ptr + offs, mask=mask, other=0.0) * LOG2E
    r = tl.zeros([BLOCK], tl.float32)
    for i in range(S):
        k = (S - 1 - i) if REVERSE else i
        row = pid_b * S + k
        ptr = seg_ptr + row.to(tl.int64) * DIM * N + offs
        passed = tl.load(ptr, mask=mask, other=0.0)
        dt_sum = tl.load(seg_dt_ptr + row * DIM + offs // N, mask=mask, other=0.0)
        tl.store(ptr, r, mask=mask)
        r = tl.exp2(dt_sum * A2) * r + passed


def _chain_segments(seg: torch.Tensor, seg_dt: torch.Tensor, A: torch.Tensor, reverse: bool) -> None:
    batch, n_seg, dim, n = seg.shape
    block = 1024
    _chain_kernel[(batch, triton.cdiv(dim * n, block))](seg, seg_dt, A, n_seg, dim, N=n, BLOCK=block, REVERSE=reverse)


def _segments(length: int, programs: int, cfg: dict) -> tuple[int, int]:
    """Segment length (a multiple of CHUNK) and count: one segment from ``cfg["cut_below"]`` programs on, else such
    that programs * count reaches about ``cfg["programs"]``."""
    target = cfg["programs"] if programs < cfg["cut_below"] else 1
    seg_len = max(CHUNK, triton.cdiv(triton.cdiv(length, triton.cdiv(target, programs)), CHUNK) * CHUNK)
    return seg_len, triton.cdiv(length, seg_len)


def _rowwise(t: torch.Tensor) -> torch.Tensor:
    """The kernels index (b, l, c) tensors through (b, l) strides and need unit stride over the last axis."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """B and C rows must be provably 16-byte aligned (base and (b, l) strides multiples of 16 elements): otherwise
    Triton cannot vectorise their loads and picks a layout for the whole loop that spills (x_proj outputs of
    width dt_rank + 2N, such as 40 for d_model 118, are not)."""
    t = _rowwise(t)
    ok = t.stride(0) % 16 == 0 and t.stride(1) % 16 == 0 and t.data_ptr() % 16 == 0
    return t if ok else t.contiguous()


def _strides(*ts: torch.Tensor) -> list[int]:
    return [s for t in ts for s in (t.stride(0), t.stride(1))]


class SelectiveScanFn(torch.autograd.Function):
    """Fused selective scan with chunk-boundary states saved for a recomputing backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
        u, delta = _rowwise(u), _rowwise(delta)
        B, C = _aligned(B), _aligned(C)
        z = _rowwise(z) if z is not None else None
        batch, length, dim = u.shape
        n = A.shape[1]
        A = A.float().contiguous()
        D_ = D.float().contiguous() if D is not None else None
        bias = delta_bias.float().contiguous() if delta_bias is not None else None
        out = torch.empty_like(u, memory_format=torch.contiguous_format)
        save = any(ctx.needs_input_grad)
        states = u.new_empty((batch, triton.cdiv(length, CHUNK), dim, n) if save else (1,), dtype=torch.float32)
        cfg = FWD_CONFIG
        n_blocks = triton.cdiv(dim, cfg["BD"])
        # Few (batch, channel block) programs leave most SMs idle: cut time into segments run in parallel.
        seg_len, n_seg = _segments(length, batch * n_blocks, cfg)
        if batch * n_blocks * n_seg >= cfg["busy"]:
            steps, mufu = cfg["U"], cfg["mufu"]
        else:
            steps, mufu = cfg["U_idle_save"] if save else cfg["U_idle"], cfg["mufu_idle"]
        seg_state = torch.empty(batch, n_seg, dim, n, dtype=torch.float32, device=u.device)
        seg_dt = torch.empty(batch, n_seg, dim, dtype=torch.float32, device=u.device)

        def launch(save_states: bool, state_only: bool, has_init: bool) -> None:
            _scan_fwd_kernel[(batch, n_blocks, n_seg)](
                u, delta, A, B, C, D_ if D_ is not None else A, z if z is not None else u,
                bias if bias is not None else A, out, states, seg_state, seg_dt, length, dim, seg_len, 1,
                *_strides(u, delta, z if z is not None else u, B, C, out),
                N=n, NV=min(n, 8), BD=cfg["BD"], U=steps, CHUNK=CHUNK, HAS_D=D is not None, HAS_Z=z is not None,
                HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), REVERSE=bool(reverse),
                SAVE_STATES=save_states, STATE_ONLY=state_only, HAS_INIT=has_init,
                MUFU=mufu and not INTERPRET, num_warps=cfg["num_warps"],
            )

        if length > 0:
            if n_seg > 1:
                launch(False, True, False)
                _chain_segments(seg_state, seg_dt, A, reverse=False)
            launch(save, False, n_seg > 1)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D_, z, bias, states)
            ctx.flags = (D is not None, z is not None, delta_bias is not None, bool(delta_softplus), bool(reverse))
            ctx.dtypes = (D.dtype if D is not None else None, delta_bias.dtype if delta_bias is not None else None)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D_, z, bias, states = ctx.saved_tensors
        has_d, has_z, has_bias, softplus, reverse = ctx.flags
        batch, length, dim = u.shape
        n = A.shape[1]
        dout = dout.contiguous()
        cfg = BWD_CONFIG
        n_blocks = triton.cdiv(dim, cfg["BD"])
        f32 = {"dtype": torch.float32, "device": u.device}
        du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
        ddelta = torch.empty(u.shape, dtype=delta.dtype, device=u.device)
        dz = torch.empty(u.shape, dtype=z.dtype, device=u.device) if has_z else None
        seg_len, n_seg = _segments(length, batch * n_blocks, cfg)
        dA = torch.empty(batch, n_seg, dim, n, **f32)
        dD = torch.empty(batch, n_seg, dim, **f32)
        dbias = torch.empty(batch, n_seg, dim, **f32)
        dB = torch.empty(batch, n_blocks, length, n, **f32)
        dC = torch.empty(batch, n_blocks, length, n, **f32)
        seg_adj = torch.empty(batch, n_seg, dim, n, **f32)
        seg_dt = torch.empty(batch, n_seg, dim, **f32)
        scratch = torch.empty(batch * n_blocks * n_seg * (CHUNK // cfg["SUB"]) * cfg["BD"] * n, **f32)

        def launch(adj_only: bool, has_init: bool) -> None:
            _scan_bwd_kernel[(batch, n_blocks, n_seg)](
                u, delta, A, B, C, D_ if has_d else A, z if has_z else u, bias if has_bias else A, dout, states,
                scratch, seg_adj, seg_dt, du, ddelta, dz if has_z else du, dA, dD, dbias, dB, dC,
                length, dim, seg_len, 1, *_strides(u, delta, z if has_z else u, B, C, dout),
                N=n, NV=min(n, 8), BD=cfg["BD"], SUB=cfg["SUB"], CHUNK=CHUNK, HAS_D=has_d, HAS_Z=has_z,
                HAS_BIAS=has_bias, SOFTPLUS=softplus, REVERSE=reverse, ADJ_ONLY=adj_only, HAS_INIT=has_init,
                MUFU=cfg["mufu"] and not INTERPRET, num_warps=cfg["num_warps"],
            )

        if length > 0:
            if n_seg > 1:
                launch(True, False)
                _chain_segments(seg_adj, seg_dt, A, reverse=True)
            launch(False, n_seg > 1)
        else:
            for t in (dA, dD, dbias, dB, dC):
                t.zero_()
        d_dtype, bias_dtype = ctx.dtypes
        return (
            du,
            ddelta,
            dA.sum((0, 1)),
            dB.sum(1).to(B.dtype),
            dC.sum(1).to(C.dtype),
            dD.sum((0, 1)).to(d_dtype) if has_d else None,
            dz,
            dbias.sum((0, 1)).to(bias_dtype) if has_bias else None,
            None,
            None,
        )


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    reverse: bool = False,
) -> torch.Tensor:
    """Same function as ``reference.selective_scan_reference``; differentiable in every tensor argument."""
    return SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
