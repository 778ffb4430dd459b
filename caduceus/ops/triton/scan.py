"""Mamba-1 selective scan in Triton, (batch, length, channels) layout.

One program owns a batch row and a block of ``BD`` channels; its state ``h[N, BD]`` stays in registers while it
walks time sequentially (work-efficient: one exp2 per state element). Inputs are loaded in blocks of ``U`` steps,
``DEPTH`` blocks ahead of use, because Triton does not software-pipeline a sequential loop and a step would
otherwise wait for its own loads. A channel's N states are spread over N / NV lanes, which share its per-channel
work (softplus, output, gate) step by step in the forward (``_fwd_group``). ``reverse`` only changes the index
arithmetic. The forward saves the state every ``chunk`` steps; the backward walks the chunks in reverse, recomputes
each ``SUB``-step piece into registers (states and decays, so the reverse step needs no exp of its own) and runs the
adjoint back over it. dB and dC are summed over the program's channels (through shared memory, or a shuffle
reduce-scatter), written per channel block and summed in a fixed order. Both directions cut time into segments run in
parallel when (batch, channel block) programs are too few: state (forward) or adjoint (backward) is passed between
segments by a small chaining kernel (a parallel scan over the segments).

Per-step instruction count is what the kernels are tuned on (read from the sm_90 SASS): the time strides are
constexprs (row offsets within a block become immediates), only the last blocks carry step masks, every per-channel
value is loaded and computed once (one layout, see ``_bc``), bf16 B/C widen in one instruction per value (``_wide``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime import driver

from caduceus.ops import needs_grad

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# The CPU interpreter (TRITON_INTERPRET=1) runs no PTX: the kernels' inline assembly is off there.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
PTX = tl.constexpr(not INTERPRET)

# Time is cut into segments when fewer than ``cut_below`` (batch, channel block) programs would run, into as many as
# make about ``programs`` programs; the forward's cut costs a second pass over the exps, the backward's does not.
# U: steps per prefetched block; depth: blocks copied ahead. mufu: softplus' log2 and the sigmoid's reciprocal as
# single MUFU instructions instead of FMA-pipe sequences. From ``busy`` forward programs on (several warps per SM
# sub-partition) other warps share the hiding of the loads' latency (depth 3); with fewer programs (about one warp per
# sub-partition) each warp must hide it itself: depth 5 ("_idle" keys). The backward's registers are at the cap; it
# copies the rows ``prefetch`` pieces ahead into the ring (without it: asks L2 for them that far ahead).
# BD channels per program, NV states per thread (a warp holds BD * N / NV lanes' worth); in one time segment with
# fewer than ``busy`` programs the forward takes the "_idle" tiles, now the same as the others (the former BD_idle 8,
# NV_idle 4, twice the warps, won while the blocks were held in registers; with the ring they lose 6% at 16 x 131k).
# pred_store: the forward's state store before each block predicated within its assembly rather than under a branch,
# so that the loop body is one basic block for ptxas to schedule. group: the per-channel work of G steps
# (softplus, output, gate) shared among the G = N / NV lanes of a channel (see _fwd_group). smem_sums: the backward's
# dB/dC sums over a block's channels through shared memory rather than a shuffle butterfly (_SUM_CHANNELS_SMEM_ASM:
# 5% faster backward on the H200).
# ring (both directions): the rows copied ahead into a ring in shared memory (cp.async) and read from there, instead of
# loaded into registers ``depth`` blocks ahead (forward) or from L2 when due (backward's adjoint walk, ``prefetch``
# pieces ahead); bf16/fp16 rows, 16-byte aligned, the lanes layout, channels a multiple of BD (d_model 118's 236 are
# not, so the model pads them to 240: ops.channel_multiple), sm_80 or newer (cp.async); other inputs take the plain
# loads (without the ring, depths 3 and 5 held in registers cost 4.7x at 16 x 131k); see _ring_copy. ring_adj: with
# ring, the backward's adjoint-only pass (time segments) too (2% at 16 x 131k).
# maxnreg: a register cap for the backward (None: ptxas' own, 255 at the default tiles), trading spills for warps.
# chunk: steps between the states the forward saves for the backward (B*D*N*4 bytes per chunk steps: at 64 half the
# bytes of a bf16 (b, l, d) tensor); the backward recomputes a chunk's chunk / SUB piece states into a scratch meant to
# stay in L2 (16 KB per program at 64; at 256 the resident programs' 68 MB overflowed the 50 MB L2: 1-2% slower).
# See BENCHMARKS.md, GPU (H100, H200).
FWD_CONFIG = {"BD": 16, "NV": 8, "num_warps": 1, "cut_below": 512, "programs": 4096, "busy": 2048, "U": 4,
              "depth": 3, "U_idle": 4, "depth_idle": 5, "BD_idle": 16, "NV_idle": 8, "mufu": True, "pred_store": True,
              "group": True, "ring": True}
BWD_CONFIG = {"BD": 16, "NV": 8, "SUB": 4, "num_warps": 1, "cut_below": 2048, "programs": 4096, "mufu": True,
              "prefetch": 2, "smem_sums": True, "maxnreg": None, "chunk": 64, "ring": True, "ring_adj": True}


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
def _bc(x):
    """A (BD,) per-channel vector as a (1, 1, BD) tile. Expanding twice at the front keeps the layout that ``_sum_n``
    returns (``x[None, None, :]`` is another, equivalent one, and Triton would then load and compute every
    per-channel value twice, once in each)."""
    return tl.expand_dims(tl.expand_dims(x, 0), 0)


@triton.jit
def _wide(x):
    """x as float32. A pair of bf16 in one register widens in one instruction each (shift, mask); Triton's own
    conversion extracts the upper half first (PRMT then shift)."""
    if PTX and x.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise("shl.b32 $0, $2, 16;\nand.b32 $1, $2, -65536;", "=r,=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=2)
    else:
        return x.to(tl.float32)


@triton.jit
def _walk(pid_b, i, L, s_b, s_l, REVERSE: tl.constexpr):
    """Offset of walk step i: time i, or L-1-i when reverse."""
    t = (L - 1 - i) if REVERSE else i
    return pid_b.to(tl.int64) * s_b + t.to(tl.int64) * s_l


@triton.jit
def _prefetch_lanes(ptrs, s_bs, s_ls, firsts, lasts, pid_b, STEPS: tl.constexpr):
    """Addresses for ``_prefetch``, computed once per program: row j of array k (ptrs[k], batch stride s_bs[k], step
    stride s_ls[k], elements firsts[k] .. lasts[k] of a row) gets two lanes, its first and its last element (a row
    of 32 bytes may straddle two sectors). Returns each lane's address at walk step 0 (bytes, int64), its bytes per
    step and its step j, for 16 * STEPS lanes (up to 8 arrays; STEPS a power of 2); lanes past the last row repeat the
    first ones."""
    K: tl.constexpr = len(ptrs)
    tl.static_assert(K <= 8)
    LANES: tl.constexpr = 16 * STEPS
    e = tl.arange(0, LANES)
    k_of = (e // (2 * STEPS)) % K
    last = (e % 2) == 1
    base = tl.zeros([LANES], tl.int64)
    stride = tl.zeros([LANES], tl.int64)
    for k in tl.static_range(K):
        row = ptrs[k] + pid_b.to(tl.int64) * s_bs[k] + tl.where(last, lasts[k], firsts[k])
        at = row.to(tl.int64, bitcast=True)
        base = tl.where(k_of == k, at, base)
        stride = tl.where(k_of == k, (row + s_ls[k]).to(tl.int64, bitcast=True) - at, stride)
    return base, stride, (e // 2) % STEPS


@triton.jit
def _prefetch(lanes, i0, L, ROWS: tl.constexpr, REVERSE: tl.constexpr):
    """Ask L2 for the first ROWS rows of ``lanes`` (_prefetch_lanes) at walk steps i0 .. i0+STEPS-1, clamped to the
    sequence: one prefetch instruction per 16 rows instead of one per row (each with its own address arithmetic).
    Unlike a load, a prefetch holds no register until its data arrive, so the backward's loops, whose registers are
    spoken for, can ask pieces ahead."""
    if PTX:
        base, stride, j = lanes
        t = tl.minimum(tl.maximum(i0 + j, 0), L - 1)
        if REVERSE:
            t = L - 1 - t
        on = (tl.arange(0, base.shape[0]) < 2 * ROWS).to(tl.int32)
        tl.inline_asm_elementwise("{\n.reg .pred p;\nsetp.ne.s32 p, $2, 0;\n@p prefetch.global.L2 [$1];\n"
                                  "mov.b32 $0, 0;\n}", "=r,l,r", [base + t.to(tl.int64) * stride, on],
                                  dtype=tl.int32, is_pure=False, pack=1)


# The ring of rows copied ahead (FWD_CONFIG["ring"], BWD_CONFIG["ring"]): a buffer in shared memory that the inline
# assembly declares itself (Triton's own shared memory is not addressable from it), in slots of one block's or piece's
# rows, one more slot than blocks or pieces in flight.
_RING_BYTES = 4096
RING_BYTES = tl.constexpr(_RING_BYTES)
_RING_ASM: tl.constexpr = tl.constexpr("{\n.shared .align 16 .b8 ring[" + str(_RING_BYTES) + "];\nmov.u32 $0, ring;\n}")


@triton.jit
def _ring_alloc():
    """Shared-window address of the ring. One element per lane, so that the declaration is emitted once per
    thread; every thread gets the same address. Under the interpreter: the program's byte offset into the
    ``ring_ptr`` buffer that stands in for shared memory."""
    if PTX:
        lane = tl.arange(0, 32)
        addr = tl.inline_asm_elementwise(_RING_ASM, "=r,r", [lane], dtype=tl.int32, is_pure=False, pack=1)
        return tl.max(addr, axis=0)
    else:
        pid = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
        return pid * RING_BYTES


@triton.jit
def _ring_lanes(ptrs, s_bs, s_ls, firsts, pid_b, STEPS: tl.constexpr, ARRAYS: tl.constexpr, NARROW: tl.constexpr):
    """The copy lanes of _ring_copy for the first ARRAYS of ``ptrs`` (rows of 32 bytes from element firsts[k], as two
    halves: _prefetch_lanes with firsts[k] + 8 as the second element) and which of them copy: the second half of a
    row only where NARROW[k] is false (rows of 16 bytes, such as 8 channels)."""
    seconds = ()
    for k in tl.static_range(len(firsts)):
        seconds = seconds + (firsts[k] + 8,)
    lanes = _prefetch_lanes(ptrs, s_bs, s_ls, firsts, seconds, pid_b, STEPS)
    e = tl.arange(0, 16 * STEPS)
    k_of = (e // (2 * STEPS)) % len(ptrs)
    half = (e % 2) == 1
    on = e < 2 * STEPS * ARRAYS
    for k in tl.static_range(len(ptrs)):
        if NARROW[k]:
            on = on & ~((k_of == k) & half)
    return lanes, on.to(tl.int32)


@triton.jit
def _ring_copy(lanes, ring, i0, L, on, REVERSE: tl.constexpr, ring_ptr):
    """cp.async the rows of ``lanes`` (_prefetch_lanes with the halves of each 32-byte row as its two elements) whose
    lanes are ``on`` (int32) at walk steps i0 .. i0+STEPS-1, clamped to the sequence, into the ring slot at ``ring``:
    lane e's 16 bytes go to ring + 16 e, so row k * STEPS + j lands at 32 (k * STEPS + j). Then commits them as one
    group (an empty one too: the wait in _ring_wait counts groups). Under the interpreter: copied into ring_ptr
    (int16)."""
    base, stride, j = lanes
    t = tl.minimum(tl.maximum(i0 + j, 0), L - 1)
    if REVERSE:
        t = L - 1 - t
    e = tl.arange(0, base.shape[0])
    src = base + t.to(tl.int64) * stride
    if PTX:
        tl.inline_asm_elementwise("{\n.reg .pred p;\nsetp.ne.s32 p, $3, 0;\n"
                                  "@p cp.async.cg.shared.global [$2], [$1], 16;\nmov.b32 $0, 0;\n}", "=r,l,r,r",
                                  [src, ring + 16 * e, on], dtype=tl.int32, is_pure=False, pack=1)
        tl.inline_asm_elementwise("cp.async.commit_group;\nmov.b32 $0, 0;", "=r,r", [tl.arange(0, 32)],
                                  dtype=tl.int32, is_pure=False, pack=1)
    else:
        words = tl.arange(0, 8)[None, :]
        ok = (on != 0)[:, None]
        values = tl.load(src.to(tl.pointer_type(tl.int16), bitcast=True)[:, None] + words, mask=ok)
        tl.store(ring_ptr + ((ring + 16 * e) // 2)[:, None] + words, values, mask=ok)


# _RING_WAIT_ASM[k]: wait until at most k copy groups are in flight (cp.async.wait_group takes k as an immediate).
_RING_WAIT_ASM = tl.constexpr(tuple(f"cp.async.wait_group {n};\nbar.warp.sync -1;\nsub.s32 $0, $1, $1;"
                                    for n in range(5)))


@triton.jit
def _ring_wait(PF: tl.constexpr, x):
    """Wait until at most PF - 1 copy groups are in flight (the oldest, the piece about to be read, has landed) and
    make every lane's copies visible to the warp. Returns 0, computed by the waiting assembly from ``x`` (any int32
    tile): added to the ring addresses it keeps the reads (pure, so that each value is read once per thread) after
    the wait."""
    if PTX:
        tl.static_assert((PF >= 1) and (PF <= 5))
        w = tl.inline_asm_elementwise(_RING_WAIT_ASM[PF - 1], "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1)
    else:
        w = x * 0
    return tl.min(w, axis=0)


@triton.jit
def _ring_drain():
    """Wait for every copy still in flight (those of the pieces past the walk's end): none may land in the shared
    memory of a program that runs on the SM after this one."""
    if PTX:
        tl.inline_asm_elementwise("cp.async.wait_all;\nmov.b32 $0, 0;", "=r,r", [tl.arange(0, 32)], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _ring_fill(lanes, on, ring, SLOT: tl.constexpr, AHEAD: tl.constexpr, i_first, step, L, REVERSE: tl.constexpr,
               ring_ptr):
    """Before a walk: the copies of its first AHEAD pieces (piece k at walk steps i_first + k * step) into slots
    0 .. AHEAD-1 of the ring."""
    for k in tl.static_range(AHEAD):
        _ring_copy(lanes, ring + k * SLOT, i_first + k * step, L, on, REVERSE, ring_ptr)


@triton.jit
def _ring_next(lanes, on, ring, q, SLOT: tl.constexpr, AHEAD: tl.constexpr, i_ahead, L, REVERSE: tl.constexpr,
               ring_d, ring_ptr):
    """The slot of the walk's piece q (of AHEAD + 1 slots), once its copies have landed; then the copies of piece
    q + AHEAD (walk steps from i_ahead) go out into the slot that piece q - 1 freed."""
    slot = ring + (q % (AHEAD + 1)) * SLOT + _ring_wait(AHEAD, ring_d)
    _ring_copy(lanes, ring + ((q + AHEAD) % (AHEAD + 1)) * SLOT, i_ahead, L, on, REVERSE, ring_ptr)
    return slot


@triton.jit
def _ring_rows(ring, k: tl.constexpr, offs, ptr, U: tl.constexpr, VEC: tl.constexpr, ring_ptr):
    """Rows k * U .. k * U + U-1 of the ring slot at ``ring`` (32 bytes each, copied from ``ptr``'s array) as U
    tiles of byte offsets ``offs`` within a row: 2-byte values one by one, or with VEC = 8 or 4 runs of VEC (an
    (NV, NH, BD) tile of B or C) as one read from the address of the run's first element."""
    rows = ()
    for j in tl.static_range(U):
        at = ring + 32 * (k * U + j) + offs
        if not PTX:
            rows = rows + (tl.load(ring_ptr + at // 2).to(ptr.dtype.element_ty, bitcast=True),)
        elif VEC == 8:
            rows = rows + (tl.inline_asm_elementwise("ld.shared.v4.b32 {$0, $1, $2, $3}, [$4];",
                                                     "=r,=r,=r,=r,r,r,r,r,r,r,r,r", [at],
                                                     dtype=ptr.dtype.element_ty, is_pure=True, pack=8),)
        elif VEC == 4:
            rows = rows + (tl.inline_asm_elementwise("ld.shared.v2.b32 {$0, $1}, [$2];", "=r,=r,r,r,r,r", [at],
                                                     dtype=ptr.dtype.element_ty, is_pure=True, pack=4),)
        else:
            rows = rows + (tl.inline_asm_elementwise("ld.shared.b16 $0, [$1];", "=h,r", [at],
                                                     dtype=ptr.dtype.element_ty, is_pure=True, pack=1),)
    return rows


@triton.jit
def _ring_read(ring, ptrs, STATES: tl.constexpr, ring_d, offs_bc, U: tl.constexpr, NV: tl.constexpr, ring_ptr):
    """The U rows of each array of ``ptrs`` (array k in rows k * U ..) from the ring slot at ``ring``: channel rows
    at the byte offsets ``ring_d``, rows over the states (STATES[k]: B, C) as (NV, NH, BD) tiles. Rows that were not
    copied (z without a gate) read garbage that nothing uses."""
    out = ()
    for k in tl.static_range(len(ptrs)):
        if STATES[k]:
            out = out + (_ring_rows(ring, k, offs_bc * 2, ptrs[k], U, NV, ring_ptr),)
        else:
            out = out + (_ring_rows(ring, k, ring_d, ptrs[k], U, 0, ring_ptr),)
    return out


@triton.jit
def _load(ptr, cols, ok, COLS: tl.constexpr, MASKED: tl.constexpr):
    """Masks only where needed: ``cols`` (channels past DIM) where COLS, ``ok`` (the step is before the end) where
    MASKED. Masked-off elements read as 0."""
    if MASKED:
        if COLS:
            return tl.load(ptr, mask=cols & ok, other=0.0)
        else:
            return tl.load(ptr, mask=ok, other=0.0)
    elif COLS:
        return tl.load(ptr, mask=cols, other=0.0)
    else:
        return tl.load(ptr)


@triton.jit
def _store(ptr, value, cols, ok, COLS: tl.constexpr, MASKED: tl.constexpr):
    value = value.to(ptr.dtype.element_ty)
    if MASKED:
        if COLS:
            tl.store(ptr, value, mask=cols & ok)
        else:
            tl.store(ptr, value, mask=ok)
    elif COLS:
        tl.store(ptr, value, mask=cols)
    else:
        tl.store(ptr, value)


@triton.jit
def _rows(ptr, row, step, i0, end, offs, cols, U: tl.constexpr, COLS: tl.constexpr, MASKED: tl.constexpr):
    """U consecutive walk steps i0..i0+U-1 (rows ``row + j*step``); with MASKED steps from ``end`` on read as 0."""
    rows = ()
    for j in tl.static_range(U):
        rows = rows + (_load(ptr + row + j * step + offs, cols, i0 + j < end, COLS, MASKED),)
    return rows


@triton.jit
def _load_block(u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, pid_b, i0, L, end, offs_d, offs_bc, cols,
                s_ub, s_ul, s_tb, s_tl, s_zb, s_zl, s_Bb, s_Bl, s_Cb, s_Cl,
                HAS_Z: tl.constexpr, LOAD_C: tl.constexpr, REVERSE: tl.constexpr, U: tl.constexpr,
                COLS: tl.constexpr, MASKED: tl.constexpr):
    """The inputs of U walk steps starting at i0: tuples of u, delta, z (BD,) and B, C (NV, NH, BD). B and C are
    loaded already broadcast over the channels: as (NV, NH, 1) tiles Triton would spread them one element per
    lane and make that the layout of the whole loop. Their rows need no column mask (an all-true one would also
    stop Triton from vectorising them)."""
    sgn = -1 if REVERSE else 1
    us = _rows(u_ptr, _walk(pid_b, i0, L, s_ub, s_ul, REVERSE), sgn * s_ul, i0, end, offs_d, cols, U, COLS, MASKED)
    dts = _rows(dt_ptr, _walk(pid_b, i0, L, s_tb, s_tl, REVERSE), sgn * s_tl, i0, end, offs_d, cols, U, COLS,
                MASKED)
    Bs = _rows(B_ptr, _walk(pid_b, i0, L, s_Bb, s_Bl, REVERSE), sgn * s_Bl, i0, end, offs_bc, cols, U, False,
               MASKED)
    zs = us
    Cs = Bs
    if HAS_Z:
        zs = _rows(z_ptr, _walk(pid_b, i0, L, s_zb, s_zl, REVERSE), sgn * s_zl, i0, end, offs_d, cols, U, COLS,
                   MASKED)
    if LOAD_C:
        Cs = _rows(C_ptr, _walk(pid_b, i0, L, s_Cb, s_Cl, REVERSE), sgn * s_Cl, i0, end, offs_bc, cols, U, False,
                   MASKED)
    return us, dts, zs, Bs, Cs


@triton.jit
def _dt(raw, bias, valid, SOFTPLUS: tl.constexpr, MUFU: tl.constexpr, MASKED: tl.constexpr):
    """Discretisation step softplus(raw + bias); with MASKED 0 on steps past the end, so that they leave the state
    unchanged."""
    x = raw + bias
    if SOFTPLUS:
        x = _softplus(x, MUFU)
    if MASKED:
        x = tl.where(valid, x, 0.0)
    return x


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


@triton.jit
def _store_states(ptrs, h, flags, VEC: tl.constexpr):
    """tl.store(ptrs, h, mask=flags != 0); with VEC (the tile is in the layout that bf16/fp16 B and C give, see
    _lanes_known, so each thread holds runs of 4 consecutive, 16-byte aligned states) as 16-byte
    stores straight from registers: Triton would move the tile to the store's own layout through shared memory
    first, and hold registers for that across the loop it sits in."""
    if not VEC:
        tl.store(ptrs, h, mask=flags != 0)
        return
    tl.inline_asm_elementwise("{\n.reg .pred p;\nsetp.ne.s32 p, $12, 0;\n@p st.global.v4.f32 [$8], {$4, $5, $6, $7};\n"
                              "mov.b32 $0, 0;\nmov.b32 $1, 0;\nmov.b32 $2, 0;\nmov.b32 $3, 0;\n}",
                              "=r,=r,=r,=r,r,r,r,r,l,l,l,l,r,r,r,r", [h, ptrs.to(tl.int64, bitcast=True), flags],
                              dtype=tl.int32, is_pure=False, pack=4)


@triton.jit
def _save_state(st_base, h, i0, mask_dn, save, DIM, N: tl.constexpr, CHUNK: tl.constexpr, LANES: tl.constexpr,
                PREDICATED: tl.constexpr):
    """If ``save`` and i0 starts a chunk, the state before walk step i0 into its chunk's row of the saved states:
    under a branch, or with PREDICATED (and LANES) as a store predicated within its assembly, so that no branch
    cuts the loop body around it into pieces."""
    if PREDICATED and LANES:
        saved = mask_dn & (save != 0) & (i0 % CHUNK == 0)
        _store_states(st_base + (i0 // CHUNK) * DIM * N, h, saved.to(tl.int32), LANES)
    elif (save != 0) & (i0 % CHUNK == 0):
        _store_states(st_base + (i0 // CHUNK) * DIM * N, h, mask_dn.to(tl.int32), LANES)


@triton.jit
def _lanes_xor(x, S: tl.constexpr):
    """x (G, BD) with row r replaced by row r ^ S: on the GPU, the value that lane ^ S holds, as the lanes of channel
    d are G*d .. G*d + G-1 (the layout _lanes_known checks)."""
    if PTX:
        if S == 1:
            return tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 1, 31, -1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            tl.static_assert(S == 2)
            return tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 2, 31, -1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
    else:
        G: tl.constexpr = x.shape[0]
        BD: tl.constexpr = x.shape[1]
        return tl.reshape(tl.flip(tl.reshape(x, (G // (2 * S), 2, S, BD)), 1), (G, BD))


@triton.jit
def _from_lane(x, K: tl.constexpr):
    """Row K of x (G, BD) in every row: on the GPU, the value that lane G*d + K holds (see _lanes_xor). For G = 2 one
    butterfly shuffle, shared by both rows (it is pure, so computed once), and a select."""
    G: tl.constexpr = x.shape[0]
    rows = tl.arange(0, G)[:, None]
    if G == 2:
        return tl.where(rows == K, x, _lanes_xor(x, 1))
    elif PTX:
        src = K + G * tl.arange(0, x.shape[1])[None, :] + tl.zeros(x.shape, tl.int32)
        return tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 31, -1;", "=r,r,r", [x, src],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.broadcast_to(tl.sum(tl.where(rows == K, x, 0.0), 0)[None, :], x.shape)


@triton.jit
def _own(xs, j, rows, G: tl.constexpr):
    """Step j + r of the (BD,) tuple xs in row r of a (G, BD) tile, as float32."""
    x = xs[j + G - 1].to(tl.float32)[None, :]
    for k in tl.static_range(G - 2, -1, -1):
        x = tl.where(rows == k, xs[j + k].to(tl.float32)[None, :], x)
    return x


@triton.jit
def _reduce_scatter(parts, rows, G: tl.constexpr):
    """Row r of the sum over the G rows of parts[r], a tuple of G (G, BD) tiles: on the GPU each of the G lanes of a
    channel holds its states' share of G steps' outputs and ends with the whole output of its own step. A butterfly:
    each round keeps the half of the steps that matches a bit of the row and receives the other half's share."""
    S: tl.constexpr = G // 2
    if S == 2:
        bit = (rows & 2) != 0
        parts = (tl.where(bit, parts[2], parts[0]) + _lanes_xor(tl.where(bit, parts[0], parts[2]), 2),
                 tl.where(bit, parts[3], parts[1]) + _lanes_xor(tl.where(bit, parts[1], parts[3]), 2))
    bit = (rows & 1) != 0
    return tl.where(bit, parts[1], parts[0]) + _lanes_xor(tl.where(bit, parts[0], parts[1]), 1)


@triton.jit
def _fwd_group(h, dt_sum, blk, j, i0, end, A2, Dv, bias, out_ptr, o_row, o_step, offs_dh, cols,
               G: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, STATE_ONLY: tl.constexpr,
               MUFU: tl.constexpr, COLS: tl.constexpr, MASKED: tl.constexpr):
    """Steps j .. j+G-1 of a block with the per-channel work shared by the G lanes of each channel: lane r computes
    softplus, the output and the gate of step j + r only and the others read dt from it, so that each lane evaluates
    one softplus and one sigmoid per G steps instead of G. (G, BD) tiles hold a value per lane (``dt_sum`` too: each
    lane sums its own steps). The output is stored through ``offs_dh``, the channel offsets with their contiguity
    hidden: otherwise Triton would give the store a layout of consecutive channels on consecutive lanes and move the
    values there first."""
    us, dts, zs, Bs, Cs = blk
    rows = tl.arange(0, G)[:, None]
    valid = i0 + j + rows < end
    dt = _dt(_own(dts, j, rows, G), bias[None, :], valid, SOFTPLUS, MUFU, MASKED)
    parts = ()
    for k in tl.static_range(G):
        dt_k = _from_lane(dt, k)
        h = tl.exp2(dt_k[None] * A2) * h + (dt_k * us[j + k].to(tl.float32)[None, :])[None] * _wide(Bs[j + k])
        if not STATE_ONLY:
            parts = parts + (tl.sum(h * _wide(Cs[j + k]), axis=0),)
    if STATE_ONLY:
        dt_sum += dt
    else:
        y = _reduce_scatter(parts, rows, G) + Dv[None, :] * _own(us, j, rows, G)
        if HAS_Z:
            z = _own(zs, j, rows, G)
            y = y * z * _sigmoid(z, MUFU)
        _store(out_ptr + o_row + (j + rows) * o_step + offs_dh[None, :], y, cols[None, :], valid, COLS, MASKED)
    return h, dt_sum


@triton.jit
def _fwd_steps(h, dt_sum, blk, i0, end, A2, Dv, bias, out_ptr, o_row, o_step, offs_d, offs_dh, cols,
               U: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, STATE_ONLY: tl.constexpr,
               MUFU: tl.constexpr, COLS: tl.constexpr, MASKED: tl.constexpr, GROUP: tl.constexpr):
    """U steps of the scan from walk step i0 (inputs ``blk`` from _load_block), writing y unless STATE_ONLY."""
    if GROUP > 1:
        for j in tl.static_range(0, U, GROUP):
            h, dt_sum = _fwd_group(h, dt_sum, blk, j, i0, end, A2, Dv, bias, out_ptr, o_row, o_step, offs_dh, cols,
                                   GROUP, HAS_Z, SOFTPLUS, STATE_ONLY, MUFU, COLS, MASKED)
    else:
        us, dts, zs, Bs, Cs = blk
        for j in tl.static_range(U):
            valid = i0 + j < end
            u = us[j].to(tl.float32)
            dt = _dt(dts[j].to(tl.float32), bias, valid, SOFTPLUS, MUFU, MASKED)
            h = tl.exp2(_bc(dt) * A2) * h + _bc(dt * u) * _wide(Bs[j])
            if STATE_ONLY:
                dt_sum += dt
            else:
                y = _sum_n(h * _wide(Cs[j])) + Dv * u
                if HAS_Z:
                    z = zs[j].to(tl.float32)
                    y = y * z * _sigmoid(z, MUFU)
                _store(out_ptr + o_row + j * o_step + offs_d, y, cols, valid, COLS, MASKED)
    return h, dt_sum


@triton.jit(do_not_specialize=["one", "save"])
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, state_ptr, seg_state_ptr, seg_dt_ptr,
    ring_ptr, L, DIM, SEG, one, save,
    s_ub, s_ul: tl.constexpr, s_tb, s_tl: tl.constexpr, s_zb, s_zl: tl.constexpr, s_Bb, s_Bl: tl.constexpr, s_Cb,
    s_Cl: tl.constexpr, s_ob, s_ol: tl.constexpr,
    N: tl.constexpr, NV: tl.constexpr, BD: tl.constexpr, U: tl.constexpr, DEPTH: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, STATE_ONLY: tl.constexpr, HAS_INIT: tl.constexpr, MUFU: tl.constexpr,
    COLS: tl.constexpr, LANES: tl.constexpr, PRED_STORE: tl.constexpr, GROUP: tl.constexpr, RING: tl.constexpr,
):
    """out = scan(...) for one (batch row, channel block, segment of SEG walk steps); if ``save``, states[b, c] =
    the state before walk step c*CHUNK. With several segments the scan runs twice: first ``STATE_ONLY``, each
    segment from a zero state, writing its end state and sum of dt into seg_state/seg_dt; after the host chains
    those, again with ``HAS_INIT``, each segment starting from its true state read from seg_state. COLS: DIM is not
    a multiple of BD (channel masks needed). LANES: the tiles are in the layout _store_states can use (see
    _lanes_known). ``save`` is a run-time flag, not a constexpr: the state store before every block (under a
    branch, or with PRED_STORE and LANES predicated) also keeps ptxas from sinking the loads that refill the ring of
    prefetched blocks past it (ptxas otherwise schedules them at the end of the loop body, just before their use in
    the next iteration)."""
    pid_b = tl.program_id(0)
    seg = pid_b * tl.num_programs(2) + tl.program_id(2)
    start = tl.program_id(2) * SEG
    end = tl.minimum(L, start + SEG)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    cols = offs_d < DIM
    offs_dh = offs_d * one  # `one` hides the contiguity over the channels: see _fwd_group
    offs_n = _state_offsets(N, NV)
    offs_bc = tl.broadcast_to(offs_n, (NV, N // NV, BD))
    dn = _bc(offs_d) * N + offs_n * one  # `one` hides the contiguity over n: see _state_offsets
    mask_dn = _bc(cols) & (offs_n >= 0)
    A2 = tl.load(A_ptr + dn, mask=mask_dn, other=0.0) * LOG2E
    Dv = tl.load(D_ptr + offs_d, mask=cols, other=0.0) if HAS_D else tl.zeros([BD], tl.float32)
    bias = tl.load(bias_ptr + offs_d, mask=cols, other=0.0) if HAS_BIAS else tl.zeros([BD], tl.float32)
    st_base = state_ptr + (pid_b * tl.cdiv(L, CHUNK)).to(tl.int64) * DIM * N + dn
    seg_state = seg_state_ptr + seg.to(tl.int64) * DIM * N + dn
    if HAS_INIT:
        h = tl.load(seg_state, mask=mask_dn, other=0.0)
    else:
        h = tl.zeros([NV, N // NV, BD], tl.float32)
    dt_sum = tl.zeros([GROUP, BD], tl.float32) if GROUP > 1 else tl.zeros([BD], tl.float32)
    o_step = -s_ol if REVERSE else s_ol
    if RING:
        # Blocks of U steps copied DEPTH blocks ahead into a ring of DEPTH + 1 slots in shared memory (cp.async, see
        # _ring_copy; rows u, dt, B, C, z) and read from there when due: no registers held for blocks in flight.
        # The main loop runs one full block an iteration, the rest is left to the masked loop below.
        SLOT: tl.constexpr = 5 * U * 32
        tl.static_assert((DEPTH + 1) * SLOT <= RING_BYTES)
        ring = _ring_alloc()
        first_d = tl.program_id(1) * BD
        narrow: tl.constexpr = BD == 8  # channel rows of 16 bytes; B and C rows are 32
        lanes, on = _ring_lanes((u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr), (s_ub, s_tb, s_Bb, s_Cb, s_zb),
                                (s_ul, s_tl, s_Bl, s_Cl, s_zl), (first_d, first_d, 0, 0, first_d), pid_b, U,
                                3 if STATE_ONLY else (5 if HAS_Z else 4), (narrow, narrow, False, False, narrow))
        ring_d = (offs_d % BD) * 2
        _ring_fill(lanes, on, ring, SLOT, DEPTH, start, U, L, REVERSE, ring_ptr)
        i_rest = start + ((end - start) // U) * U
        for i0 in range(start, i_rest, U):
            slot = _ring_next(lanes, on, ring, (i0 - start) // U, SLOT, DEPTH, i0 + DEPTH * U, L, REVERSE, ring_d,
                              ring_ptr)
            us, dts, Bs, Cs, zs = _ring_read(slot, (u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr),
                                             (False, False, True, True, False), ring_d, offs_bc, U, NV, ring_ptr)
            _save_state(st_base, h, i0, mask_dn, save, DIM, N, CHUNK, LANES, PRED_STORE)
            h, dt_sum = _fwd_steps(h, dt_sum, (us, dts, zs, Bs, Cs), i0, end, A2, Dv, bias, out_ptr,
                                   _walk(pid_b, i0, L, s_ob, s_ol, REVERSE), o_step, offs_d, offs_dh, cols, U, HAS_Z,
                                   SOFTPLUS, STATE_ONLY, MUFU, COLS, False, GROUP)
        _ring_drain()
    else:
        # Blocks of U steps, each loaded DEPTH blocks ahead of its use, in a ring of DEPTH blocks in registers (a
        # shifting queue would cost register moves). The main loop runs DEPTH full blocks an iteration, without masks,
        # as long as the blocks it loads are full too.
        ahead = ()
        for k in tl.static_range(DEPTH):
            ahead = ahead + (_load_block(u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, pid_b, start + k * U, L, end, offs_d,
                                         offs_bc, cols, s_ub, s_ul, s_tb, s_tl, s_zb, s_zl, s_Bb, s_Bl, s_Cb, s_Cl,
                                         HAS_Z and not STATE_ONLY, not STATE_ONLY, REVERSE, U, COLS, True),)
        i_rest = start + tl.maximum((end - start) // (DEPTH * U) - 1, 0) * (DEPTH * U)
        for i in range(start, i_rest, DEPTH * U):
            for k in tl.static_range(DEPTH):
                i0 = i + k * U
                _save_state(st_base, h, i0, mask_dn, save, DIM, N, CHUNK, LANES, PRED_STORE)
                h, dt_sum = _fwd_steps(h, dt_sum, ahead[k], i0, end, A2, Dv, bias, out_ptr,
                                       _walk(pid_b, i0, L, s_ob, s_ol, REVERSE), o_step, offs_d, offs_dh, cols, U,
                                       HAS_Z, SOFTPLUS, STATE_ONLY, MUFU, COLS, False, GROUP)
                # Refill the slot just used, after its block: into registers free from here on, the loads issue while
                # the next DEPTH - 1 blocks compute (the store before the next block keeps ptxas from sinking them
                # further).
                ahead = ahead[:k] + (_load_block(u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, pid_b, i0 + DEPTH * U, L, end,
                                                 offs_d, offs_bc, cols, s_ub, s_ul, s_tb, s_tl, s_zb, s_zl, s_Bb,
                                                 s_Bl, s_Cb, s_Cl, HAS_Z and not STATE_ONLY, not STATE_ONLY, REVERSE,
                                                 U, COLS, False),) + ahead[k + 1:]
    # What is left (fewer than 2 * DEPTH blocks, the last one possibly partial, possibly none), loaded again with
    # masks: values carried out of the loop would be laid out for both uses and loaded twice. A loop rather than
    # 2 * DEPTH unrolled blocks: Triton's coalescing pass takes time superlinear in the number of loads.
    for i0 in range(i_rest, end, U):
        blk = _load_block(u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, pid_b, i0, L, end, offs_d, offs_bc, cols, s_ub, s_ul,
                          s_tb, s_tl, s_zb, s_zl, s_Bb, s_Bl, s_Cb, s_Cl, HAS_Z and not STATE_ONLY, not STATE_ONLY,
                          REVERSE, U, COLS, True)
        _save_state(st_base, h, i0, mask_dn, save, DIM, N, CHUNK, LANES, False)
        h, dt_sum = _fwd_steps(h, dt_sum, blk, i0, end, A2, Dv, bias, out_ptr,
                               _walk(pid_b, i0, L, s_ob, s_ol, REVERSE),
                               o_step, offs_d, offs_dh, cols, U, HAS_Z, SOFTPLUS, STATE_ONLY, MUFU, COLS, True, GROUP)
    if STATE_ONLY:
        tl.store(seg_state, h, mask=mask_dn)
        tl.store(seg_dt_ptr + seg * DIM + offs_d, tl.sum(dt_sum, 0) if GROUP > 1 else dt_sum, mask=cols)


@triton.jit
def _gate(g, z, HAS_Z: tl.constexpr, MUFU: tl.constexpr):
    """The output gradient seen by the scan: dout * z * sigmoid(z) under the SiLU(z) gate."""
    if HAS_Z:
        g = g * z * _sigmoid(z, MUFU)
    return g


# dB and dC rows of one step, summed over a channel block's 16 channels and stored: a butterfly reduce-scatter of the
# two (8, 2, 16) tiles over their 16 channel lanes (lane = nh + 2*d, the 8 states v of n = nh*8 + v in registers).
# Each round sends half of a lane's values to the lane whose channel differs in one bit and adds the half it keeps to
# what it receives: 8 + 4 + 2 + 1 shuffles for the 2 x 16 sums instead of a shuffle tree per value (2 x 8 x 4), in a
# fixed order (deterministic). Lane (nh, d) ends with the sum for state n = nh*8 + d % 8 of dB (d < 8) or dC and
# stores it at the address of its element v = 0 (if that element's flag is set). The store is part of the assembly:
# a Triton store would move the values to its own layout through shared memory first.
_SUM_CHANNELS_ASM: tl.constexpr = tl.constexpr("""{
.reg .pred p;
.reg .b32 lane, bit, k<8>, s<8>, r<8>;
mov.u32 lane, %laneid;
and.b32 bit, lane, 16;
setp.ne.u32 p, bit, 0;
""" + "".join(f"selp.b32 k{i}, ${16 + i}, ${8 + i}, p;\nselp.b32 s{i}, ${8 + i}, ${16 + i}, p;\n" for i in range(8))
    + "".join(f"shfl.sync.bfly.b32 r{i}, s{i}, 16, 31, -1;\n" for i in range(8))
    + "".join(f"add.f32 k{i}, k{i}, r{i};\n" for i in range(8))
    + "".join(
        f"and.b32 bit, lane, {m};\nsetp.ne.u32 p, bit, 0;\n"
        + "".join(f"selp.b32 s{i}, k{i}, k{i + h}, p;\nselp.b32 k{i}, k{i + h}, k{i}, p;\n" for i in range(h))
        + "".join(f"shfl.sync.bfly.b32 r{i}, s{i}, {m}, 31, -1;\n" for i in range(h))
        + "".join(f"add.f32 k{i}, k{i}, r{i};\n" for i in range(h))
        for m, h in ((8, 4), (4, 2), (2, 1)))
    + "setp.ne.s32 p, $32, 0;\n@p st.global.f32 [$24], k0;\n" + "".join(f"mov.b32 ${i}, 0;\n" for i in range(8)) + "}")

# The same sums and stores through shared memory: each lane writes its 16 values as 4 vectors into its channel's row
# (16 rows of 36 words: 32 sums and a pad that keeps both the vector writes and the column reads free of bank
# conflicts), then lane (nh, d) reads its column from the 16 rows and adds them in a fixed tree: 4 + 16 shared
# memory accesses and 15 adds against the butterfly's 30 selects, 15 shuffles and 15 adds. Each use declares its own
# buffer; the barrier at the end keeps the next write to it behind every lane's reads.
_SUM_CHANNELS_SMEM_ASM: tl.constexpr = tl.constexpr("""{
.shared .align 16 .b32 sums[576];
.reg .pred p;
.reg .b32 lane, a, b, t<16>;
mov.u32 lane, %laneid;
mov.u32 a, sums;
shr.b32 b, lane, 1;
mad.lo.u32 a, b, 144, a;
and.b32 b, lane, 1;
mad.lo.u32 a, b, 64, a;
""" + "".join(f"st.shared.v4.b32 [a+{16 * q}], {{${8 + 4 * q}, ${9 + 4 * q}, ${10 + 4 * q}, ${11 + 4 * q}}};\n"
              for q in range(4))
    + """bar.warp.sync -1;
mov.u32 a, sums;
and.b32 b, lane, 1;
mad.lo.u32 a, b, 64, a;
shr.b32 b, lane, 1;
mad.lo.u32 a, b, 4, a;
""" + "".join(f"ld.shared.b32 t{r}, [a+{144 * r}];\n" for r in range(16))
    + "".join(f"add.f32 t{i}, t{i}, t{i + w};\n" for w in (1, 2, 4, 8) for i in range(0, 16, 2 * w))
    + "setp.ne.s32 p, $32, 0;\n@p st.global.f32 [$24], t0;\nbar.warp.sync -1;\n"
    + "".join(f"mov.b32 ${i}, 0;\n" for i in range(8)) + "}")


@triton.jit
def _store_channel_sums(ptrs, dB, dC, flags, SMEM: tl.constexpr):
    """_SUM_CHANNELS_ASM (or with SMEM _SUM_CHANNELS_SMEM_ASM) on (8, 2, 16) tiles: ``ptrs`` and ``flags`` (int32)
    give each lane's address and whether to store, in its element v = 0."""
    tl.inline_asm_elementwise(_SUM_CHANNELS_SMEM_ASM if SMEM else _SUM_CHANNELS_ASM,
                              "=r," * 8 + "r," * 16 + "l," * 8 + "r," * 7 + "r",
                              [dB, dC, ptrs.to(tl.int64, bitcast=True), flags], dtype=tl.int32, is_pure=False, pack=8)


@triton.jit
def _adj_piece(dh, dt_sum, pid_b, i0, L, dt_ptr, dout_ptr, z_ptr, C_ptr, s_tb, s_tl, s_gb, s_gl, s_zb, s_zl,
               s_Cb, s_Cl, offs_d, offs_bc, cols, bias, A2, NV: tl.constexpr, SUB: tl.constexpr, HAS_Z: tl.constexpr,
               SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, MUFU: tl.constexpr, COLS: tl.constexpr,
               MASKED: tl.constexpr, ring, ring_d, ring_ptr, RING: tl.constexpr):
    """dh <- a_t * (dh + g_t C_t) back over walk steps i0+SUB-1..i0; needs neither the states nor u and B. With RING
    (and not MASKED) the rows come from the ring slot at ``ring`` (dt, dout, C, z; see _bwd_piece)."""
    if RING and not MASKED:
        dts, gs, Cs, zs = _ring_read(ring, (dt_ptr, dout_ptr, C_ptr, z_ptr), (False, False, True, False), ring_d,
                                     offs_bc, SUB, NV, ring_ptr)
    else:
        sgn = -1 if REVERSE else 1
        dts = _rows(dt_ptr, _walk(pid_b, i0, L, s_tb, s_tl, REVERSE), sgn * s_tl, i0, L, offs_d, cols, SUB, COLS,
                    MASKED)
        gs = _rows(dout_ptr, _walk(pid_b, i0, L, s_gb, s_gl, REVERSE), sgn * s_gl, i0, L, offs_d, cols, SUB, COLS,
                   MASKED)
        Cs = _rows(C_ptr, _walk(pid_b, i0, L, s_Cb, s_Cl, REVERSE), sgn * s_Cl, i0, L, offs_bc, cols, SUB, False,
                   MASKED)
        zs = gs
        if HAS_Z:
            zs = _rows(z_ptr, _walk(pid_b, i0, L, s_zb, s_zl, REVERSE), sgn * s_zl, i0, L, offs_d, cols, SUB, COLS,
                       MASKED)
    for j in tl.static_range(SUB - 1, -1, -1):
        dt = _dt(dts[j].to(tl.float32), bias, i0 + j < L, SOFTPLUS, MUFU, MASKED)
        g = _gate(gs[j].to(tl.float32), zs[j].to(tl.float32), HAS_Z, MUFU)
        dh = (dh + _bc(g) * _wide(Cs[j])) * tl.exp2(_bc(dt) * A2)
        dt_sum += dt
    return dh, dt_sum


@triton.jit
def _recompute_piece(h, pid_b, i0, L, u_ptr, dt_ptr, B_ptr, s_ub, s_ul, s_tb, s_tl, s_Bb, s_Bl, offs_d, offs_bc,
                     cols, bias, A2, SUB: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
                     MUFU: tl.constexpr, COLS: tl.constexpr, MASKED: tl.constexpr):
    """The state after walk steps i0..i0+SUB-1, from the state before them."""
    us, dts, _, Bs, _ = _load_block(u_ptr, dt_ptr, u_ptr, B_ptr, B_ptr, pid_b, i0, L, L, offs_d, offs_bc, cols,
                                    s_ub, s_ul, s_tb, s_tl, s_ub, s_ul, s_Bb, s_Bl, s_Bb, s_Bl, False, False,
                                    REVERSE, SUB, COLS, MASKED)
    for j in tl.static_range(SUB):
        dt = _dt(dts[j].to(tl.float32), bias, i0 + j < L, SOFTPLUS, MUFU, MASKED)
        h = tl.exp2(_bc(dt) * A2) * h + _bc(dt * us[j].to(tl.float32)) * _wide(Bs[j])
    return h


@triton.jit
def _bwd_piece(dh, dA_acc, dD_acc, dbias_acc, h, pid_b, i0, L, part_row,
               u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, dout_ptr, du_ptr, ddt_ptr, dz_ptr, dBC_ptr,
               s_ub, s_ul, s_tb, s_tl, s_zb, s_zl, s_Bb, s_Bl, s_Cb, s_Cl, s_gb, s_gl,
               offs_d, offs_bc, cols, bc_offs, bc_first, A, A2, Dv, bias,
               N: tl.constexpr, NV: tl.constexpr, BD: tl.constexpr, SUB: tl.constexpr, HAS_Z: tl.constexpr,
               SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, MUFU: tl.constexpr, COLS: tl.constexpr,
               MASKED: tl.constexpr, SHFL: tl.constexpr, SMEM_SUMS: tl.constexpr, ring, ring_d, ring_ptr,
               RING: tl.constexpr):
    """Walk steps i0+SUB-1..i0 backwards from the state ``h`` before i0: the piece's states and decays into
    registers, then the adjoint step by step, writing du, ddt, dz and the channel block's dB/dC rows. With RING (and
    not MASKED) the rows come from the ring slot at ``ring`` (see _ring_copy: u, dt, B, dout, C, z); ``ring_d``: each
    channel's byte offset within a row, in the layout of the per-channel values."""
    g_row = _walk(pid_b, i0, L, s_gb, s_gl, REVERSE)
    g_step = -s_gl if REVERSE else s_gl
    if RING and not MASKED:
        us, dts, Bs, gs, Cs, zs = _ring_read(ring, (u_ptr, dt_ptr, B_ptr, dout_ptr, C_ptr, z_ptr),
                                             (False, False, True, False, True, False), ring_d, offs_bc, SUB, NV,
                                             ring_ptr)
    else:
        us, dts, zs, Bs, Cs = _load_block(u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, pid_b, i0, L, L, offs_d, offs_bc, cols,
                                          s_ub, s_ul, s_tb, s_tl, s_zb, s_zl, s_Bb, s_Bl, s_Cb, s_Cl, HAS_Z, True,
                                          REVERSE, SUB, COLS, MASKED)
        gs = _rows(dout_ptr, g_row, g_step, i0, L, offs_d, cols, SUB, COLS, MASKED)
    hs = (h,)
    decays = ()
    steps = ()
    for j in tl.static_range(SUB):
        dt = _dt(dts[j].to(tl.float32), bias, i0 + j < L, SOFTPLUS, MUFU, MASKED)
        a = tl.exp2(_bc(dt) * A2)
        h = a * h + _bc(dt * us[j].to(tl.float32)) * _wide(Bs[j])
        hs = hs + (h,)
        decays = decays + (a,)
        steps = steps + (dt,)
    for j in tl.static_range(SUB - 1, -1, -1):
        valid = i0 + j < L
        u = us[j].to(tl.float32)
        Bj = _wide(Bs[j])
        Cj = _wide(Cs[j])
        dt = steps[j]
        g = gs[j].to(tl.float32)
        row = g_row + j * g_step
        if HAS_Z:
            z = zs[j].to(tl.float32)
            sig = _sigmoid(z, MUFU)
            y = _sum_n(hs[j + 1] * Cj) + Dv * u
            _store(dz_ptr + row + offs_d, g * y * sig * (1.0 + z * (1.0 - sig)), cols, valid, COLS, MASKED)
            g = g * z * sig
        dh += _bc(g) * Cj
        dhB = _sum_n(dh * Bj)
        w = dh * decays[j] * hs[j]
        ddt = _sum_n(w * A) + u * dhB
        if SOFTPLUS:
            x = dts[j].to(tl.float32) + bias
            ddt = tl.where(x <= 20.0, ddt * _sigmoid(x, MUFU), ddt)
        dA_acc += w * _bc(dt)
        dD_acc += g * u
        dbias_acc += tl.where(valid, ddt, 0.0) if MASKED else ddt
        _store(du_ptr + row + offs_d, dt * dhB + Dv * g, cols, valid, COLS, MASKED)
        _store(ddt_ptr + row + offs_d, ddt, cols, valid, COLS, MASKED)
        part = dBC_ptr + part_row + ((L - 1 - i0 - j) if REVERSE else (i0 + j)).to(tl.int64) * (2 * N)
        dB = dh * _bc(dt * u)
        dC = hs[j + 1] * _bc(g)
        if SHFL:
            _store_channel_sums(part + bc_offs, dB, dC, (bc_first & valid).to(tl.int32), SMEM_SUMS)
        else:
            _store(part + bc_offs, tl.sum(dB, axis=2), bc_first, valid, False, MASKED)
            _store(part + N + bc_offs, tl.sum(dC, axis=2), bc_first, valid, False, MASKED)
        dh = dh * decays[j]
    return dh, dA_acc, dD_acc, dbias_acc


@triton.jit(do_not_specialize=["one"])
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, state_ptr, scratch_ptr,
    seg_adj_ptr, seg_dt_ptr, du_ptr, ddt_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dBC_ptr, ring_ptr,
    L, DIM, SEG, one,
    s_ub, s_ul: tl.constexpr, s_tb, s_tl: tl.constexpr, s_zb, s_zl: tl.constexpr, s_Bb, s_Bl: tl.constexpr, s_Cb,
    s_Cl: tl.constexpr, s_gb, s_gl: tl.constexpr,
    N: tl.constexpr, NV: tl.constexpr, BD: tl.constexpr, SUB: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, ADJ_ONLY: tl.constexpr, HAS_INIT: tl.constexpr, MUFU: tl.constexpr,
    COLS: tl.constexpr, SHFL: tl.constexpr, SMEM_SUMS: tl.constexpr, PF: tl.constexpr, RING: tl.constexpr,
):
    """Gradients for one (batch row, channel block, segment of SEG walk steps, a multiple of CHUNK). du, ddt, dz share
    dout's (b, l, d) strides; the dB and dC partials are (b, channel block, l, 2N) (dB then dC); dA (b, segment, d,
    n), dD and dbias (b, segment, d) are summed over the segment's steps here. With several segments the adjoint runs
    twice: first ``ADJ_ONLY`` (no states, no gradients), each segment from a zero adjoint at its end, writing the
    adjoint at its start and its sum of dt into seg_adj/seg_dt; after those are chained, again with ``HAS_INIT``,
    each segment starting from the true adjoint read from seg_adj. Pieces of SUB steps that end before L run without
    step masks; COLS: DIM is not a multiple of BD. SHFL: the tiles are in the layout _SUM_CHANNELS_ASM and
    _store_states need (see _lanes_known), else dB and dC are summed with tl.sum."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    n_blocks = tl.num_programs(1)
    seg = pid_b * tl.num_programs(2) + tl.program_id(2)
    start = tl.program_id(2) * SEG
    end = tl.minimum(L, start + SEG)
    offs_d = pid_d * BD + tl.arange(0, BD)
    cols = offs_d < DIM
    offs_n = _state_offsets(N, NV)
    offs_bc = tl.broadcast_to(offs_n, (NV, N // NV, BD))
    dn = _bc(offs_d) * N + offs_n * one  # `one` hides the contiguity over n: see _state_offsets
    mask_dn = _bc(cols) & (offs_n >= 0)
    A = tl.load(A_ptr + dn, mask=mask_dn, other=0.0)
    A2 = A * LOG2E
    Dv = tl.load(D_ptr + offs_d, mask=cols, other=0.0) if HAS_D else tl.zeros([BD], tl.float32)
    bias = tl.load(bias_ptr + offs_d, mask=cols, other=0.0) if HAS_BIAS else tl.zeros([BD], tl.float32)
    seg_adj = seg_adj_ptr + seg.to(tl.int64) * DIM * N + dn
    if HAS_INIT:
        dh = tl.load(seg_adj, mask=mask_dn, other=0.0)
    else:
        dh = tl.zeros([NV, N // NV, BD], tl.float32)
    first_d = pid_d * BD
    last_d = first_d + BD - 1
    # RING: the adjoint walks' rows (both passes) are copied PF pieces ahead into a ring of PF + 1 slots in shared
    # memory (cp.async; see _ring_copy) instead of only asked of L2: piece q of a walk (q = last - i0 // SUB) is read
    # from slot q % (PF + 1). The first PF pieces' copies go out before the walk (in the main pass, to land during the
    # first recompute walk).
    ring = 0
    ring_d = tl.arange(0, BD)
    if RING:
        tl.static_assert(PF >= 1)
        tl.static_assert((BD == 16) and (N == 16))
        ring = _ring_alloc()
        # Reduced from an (NV, NH, BD) tile, so that the reads from the ring come out in the layout the per-channel
        # values are used in (their inline assembly cannot be recomputed in another layout, as loads are).
        ring_d = tl.max(tl.max(_bc(tl.arange(0, BD) * 2) + offs_n * 0, axis=0), axis=0)
    if ADJ_ONLY:
        dt_sum = tl.zeros([BD], tl.float32)
        n_sub = tl.cdiv(end - start, SUB)
        pf = _prefetch_lanes((dt_ptr, dout_ptr, C_ptr, z_ptr), (s_tb, s_gb, s_Cb, s_zb), (s_tl, s_gl, s_Cl, s_zl),
                             (first_d, first_d, 0, first_d), (last_d, last_d, N - 1, last_d), pid_b, SUB)
        SLOT_ADJ: tl.constexpr = 4 * SUB * 32
        if RING:
            tl.static_assert((PF + 1) * SLOT_ADJ <= RING_BYTES)
            cp, cp_on = _ring_lanes((dt_ptr, dout_ptr, C_ptr, z_ptr), (s_tb, s_gb, s_Cb, s_zb),
                                    (s_tl, s_gl, s_Cl, s_zl), (first_d, first_d, 0, first_d), pid_b, SUB, 3 + HAS_Z,
                                    (False,) * 4)
            _ring_fill(cp, cp_on, ring, SLOT_ADJ, PF, start + (n_sub - 1) * SUB, -SUB, L, REVERSE, ring_ptr)
        for s_rev in range(n_sub):
            i0 = start + (n_sub - 1 - s_rev) * SUB
            slot = ring
            if RING:
                slot = _ring_next(cp, cp_on, ring, s_rev, SLOT_ADJ, PF, i0 - PF * SUB, L, REVERSE, ring_d, ring_ptr)
            elif PF > 0:
                _prefetch(pf, i0 - PF * SUB, L, (3 + HAS_Z) * SUB, REVERSE)
            if i0 + SUB <= L:
                dh, dt_sum = _adj_piece(dh, dt_sum, pid_b, i0, L, dt_ptr, dout_ptr, z_ptr, C_ptr, s_tb, s_tl, s_gb,
                                        s_gl, s_zb, s_zl, s_Cb, s_Cl, offs_d, offs_bc, cols, bias, A2, NV, SUB, HAS_Z,
                                        SOFTPLUS, REVERSE, MUFU, COLS, False, slot, ring_d, ring_ptr, RING)
            else:
                dh, dt_sum = _adj_piece(dh, dt_sum, pid_b, i0, L, dt_ptr, dout_ptr, z_ptr, C_ptr, s_tb, s_tl, s_gb,
                                        s_gl, s_zb, s_zl, s_Cb, s_Cl, offs_d, offs_bc, cols, bias, A2, NV, SUB, HAS_Z,
                                        SOFTPLUS, REVERSE, MUFU, COLS, True, slot, ring_d, ring_ptr, RING)
        if RING:
            _ring_drain()
        tl.store(seg_adj, dh, mask=mask_dn)
        tl.store(seg_dt_ptr + seg * DIM + offs_d, dt_sum, mask=cols)
    else:
        n_chunks = tl.cdiv(L, CHUNK)
        st_base = state_ptr + (pid_b * n_chunks).to(tl.int64) * DIM * N + dn
        scratch = scratch_ptr + ((pid_b * n_blocks + pid_d) * tl.num_programs(2) + tl.program_id(2)).to(tl.int64) \
            * (CHUNK // SUB) * BD * N + _bc(tl.arange(0, BD)) * N + offs_n * one
        part_row = (pid_b * n_blocks + pid_d).to(tl.int64) * L * (2 * N)
        ones = tl.full([NV, N // NV, BD], 1, tl.int32)
        if SHFL:
            # _sum_channels leaves the sum for state n = nh*8 + d % 8 of dB (d < 8) or dC in element v = 0 of lane
            # (nh, d).
            tl.static_assert((N == 16) & (NV == 8) & (BD == 16))
            lane_d = _bc(tl.arange(0, BD))
            bc_offs = (lane_d // 8) * N + tl.arange(0, 2)[None, :, None] * NV + lane_d % 8 + offs_n * 0
            bc_first = offs_bc == tl.arange(0, 2)[None, :, None] * NV
        else:
            bc_offs = tl.reshape(offs_n, [NV, N // NV])
            bc_first = bc_offs >= 0
        dA_acc = tl.zeros([NV, N // NV, BD], tl.float32)
        dD_acc = tl.zeros([BD], tl.float32)
        dbias_acc = tl.zeros([BD], tl.float32)
        # The recompute walk prefetches the first three arrays, the adjoint walk all of them.
        pf = _prefetch_lanes((u_ptr, dt_ptr, B_ptr, dout_ptr, C_ptr, z_ptr), (s_ub, s_tb, s_Bb, s_gb, s_Cb, s_zb),
                             (s_ul, s_tl, s_Bl, s_gl, s_Cl, s_zl), (first_d, first_d, 0, first_d, 0, first_d),
                             (last_d, last_d, N - 1, last_d, N - 1, last_d), pid_b, SUB)
        c_first = start // CHUNK
        n_seg_chunks = tl.cdiv(end - start, CHUNK)
        # With RING the adjoint walk's rows are copied PF pieces ahead into a ring of PF + 1 slots in shared memory
        # (cp.async; see _ring_copy) instead of only asked of L2: piece q of the walk (q = last - i0 // SUB) is read
        # from slot q % (PF + 1). The first PF pieces' copies go out now, to land during the first recompute walk.
        SLOT: tl.constexpr = 6 * SUB * 32
        p_last = (end - 1) // SUB
        if RING:
            tl.static_assert((PF + 1) * SLOT <= RING_BYTES)
            cp, cp_on = _ring_lanes((u_ptr, dt_ptr, B_ptr, dout_ptr, C_ptr, z_ptr),
                                    (s_ub, s_tb, s_Bb, s_gb, s_Cb, s_zb), (s_ul, s_tl, s_Bl, s_gl, s_Cl, s_zl),
                                    (first_d, first_d, 0, first_d, 0, first_d), pid_b, SUB, 5 + HAS_Z, (False,) * 6)
            _ring_fill(cp, cp_on, ring, SLOT, PF, p_last * SUB, -SUB, L, REVERSE, ring_ptr)
        for c_rev in range(n_seg_chunks):
            c = c_first + n_seg_chunks - 1 - c_rev
            # The state at the start of each SUB-step piece of this chunk, into a small L2-resident scratch.
            h = tl.load(st_base + c * DIM * N, mask=mask_dn, other=0.0)
            n_sub = tl.cdiv(tl.minimum(CHUNK, L - c * CHUNK), SUB)
            for s in range(n_sub):
                i0 = c * CHUNK + s * SUB
                if PF > 0:
                    _prefetch(pf, i0 + PF * SUB, L, 3 * SUB, REVERSE)
                _store_states(scratch + s * BD * N, h, ones, SHFL)
                if i0 + SUB <= L:
                    h = _recompute_piece(h, pid_b, i0, L, u_ptr, dt_ptr, B_ptr, s_ub, s_ul, s_tb, s_tl, s_Bb, s_Bl,
                                         offs_d, offs_bc, cols, bias, A2, SUB, SOFTPLUS, REVERSE, MUFU, COLS, False)
                else:
                    h = _recompute_piece(h, pid_b, i0, L, u_ptr, dt_ptr, B_ptr, s_ub, s_ul, s_tb, s_tl, s_Bb, s_Bl,
                                         offs_d, offs_bc, cols, bias, A2, SUB, SOFTPLUS, REVERSE, MUFU, COLS, True)
            # Walk the pieces backwards: the piece's states and decays in registers, then the adjoint step by step.
            for s_rev in range(n_sub):
                s = n_sub - 1 - s_rev
                i0 = c * CHUNK + s * SUB
                slot = ring
                if RING:
                    slot = _ring_next(cp, cp_on, ring, p_last - i0 // SUB, SLOT, PF, i0 - PF * SUB, L, REVERSE,
                                      ring_d, ring_ptr)
                elif PF > 0:
                    _prefetch(pf, i0 - PF * SUB, L, (5 + HAS_Z) * SUB, REVERSE)
                h = tl.load(scratch + s * BD * N)
                if i0 + SUB <= L:
                    dh, dA_acc, dD_acc, dbias_acc = _bwd_piece(
                        dh, dA_acc, dD_acc, dbias_acc, h, pid_b, i0, L, part_row, u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr,
                        dout_ptr, du_ptr, ddt_ptr, dz_ptr, dBC_ptr, s_ub, s_ul, s_tb, s_tl, s_zb, s_zl, s_Bb, s_Bl,
                        s_Cb, s_Cl, s_gb, s_gl, offs_d, offs_bc, cols, bc_offs, bc_first, A, A2, Dv, bias, N, NV, BD,
                        SUB, HAS_Z, SOFTPLUS, REVERSE, MUFU, COLS, False, SHFL, SMEM_SUMS, slot, ring_d, ring_ptr,
                        RING)
                else:
                    dh, dA_acc, dD_acc, dbias_acc = _bwd_piece(
                        dh, dA_acc, dD_acc, dbias_acc, h, pid_b, i0, L, part_row, u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr,
                        dout_ptr, du_ptr, ddt_ptr, dz_ptr, dBC_ptr, s_ub, s_ul, s_tb, s_tl, s_zb, s_zl, s_Bb, s_Bl,
                        s_Cb, s_Cl, s_gb, s_gl, offs_d, offs_bc, cols, bc_offs, bc_first, A, A2, Dv, bias, N, NV, BD,
                        SUB, HAS_Z, SOFTPLUS, REVERSE, MUFU, COLS, True, SHFL, SMEM_SUMS, slot, ring_d, ring_ptr,
                        RING)
        if RING:
            _ring_drain()
        tl.store(dA_ptr + seg.to(tl.int64) * DIM * N + dn, dA_acc, mask=mask_dn)
        tl.store(dD_ptr + seg * DIM + offs_d, dD_acc, mask=cols)
        tl.store(dbias_ptr + seg * DIM + offs_d, dbias_acc, mask=cols)


@triton.jit
def _compose(a1, b1, a2, b2):
    """The map x -> a2 * (a1 * x + b1) + b2: two segments passed through one after the other."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _chain_kernel(seg_ptr, seg_dt_ptr, recv_ptr, A_ptr, S, DIM, N: tl.constexpr, SB: tl.constexpr,
                  BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """Over one batch row's S segments (b, S, d, n): seg[k] holds what segment k passes on from a zero start (its end
    state, or with ``REVERSE`` the adjoint at its start); recv[k] gets what segment k receives. A segment decays what
    passes through it by exp(A * its sum of dt), so in walk order r[k + 1] = decay[k] * r[k] + seg[k]: a linear
    recurrence, scanned in parallel over tiles of SB segments (element i of a tile holds segment i - 1's map, so the
    scan gives what segment i receives)."""
    pid_b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # d * N + n
    mask = offs < DIM * N
    A2 = tl.load(A_ptr + offs, mask=mask, other=0.0) * LOG2E
    r = tl.zeros([BLOCK], tl.float32)  # what the tile's first segment's predecessor received
    walk = tl.arange(0, SB)
    for i0 in range(0, S, SB):
        i = i0 + walk
        prev = i - 1
        rows = pid_b * S + ((S - 1 - prev) if REVERSE else prev)
        ok = (prev >= 0)[:, None] & (i < S)[:, None] & mask[None, :]
        passed = tl.load(seg_ptr + rows.to(tl.int64)[:, None] * DIM * N + offs[None, :], mask=ok, other=0.0)
        dt_sum = tl.load(seg_dt_ptr + (rows * DIM)[:, None] + offs[None, :] // N, mask=ok, other=0.0)
        decay = tl.where(ok, tl.exp2(dt_sum * A2[None, :]), 1.0)
        a, b = tl.associative_scan((decay, passed), 0, _compose)
        recv = a * r[None, :] + b
        out_rows = pid_b * S + ((S - 1 - i) if REVERSE else i)
        tl.store(recv_ptr + out_rows.to(tl.int64)[:, None] * DIM * N + offs[None, :], recv,
                 mask=(i < S)[:, None] & mask[None, :])
        r = tl.sum(tl.where((walk == SB - 1)[:, None], recv, 0.0), axis=0)


def _chain_segments(seg: torch.Tensor, seg_dt: torch.Tensor, A: torch.Tensor, reverse: bool) -> torch.Tensor:
    """What each segment receives (see _chain_kernel), as a new (b, S, d, n) tensor."""
    batch, n_seg, dim, n = seg.shape
    recv = torch.empty_like(seg)
    block, tile = 64, 32
    _chain_kernel[(batch, triton.cdiv(dim * n, block))](seg, seg_dt, recv, A, n_seg, dim, N=n, SB=tile, BLOCK=block,
                                                         REVERSE=reverse, num_warps=4)
    return recv


def _segments(length: int, programs: int, cfg: dict, chunk: int) -> tuple[int, int]:
    """Segment length (a multiple of ``chunk``) and count: one segment from ``cfg["cut_below"]`` programs on, else
    such that programs * count reaches about ``cfg["programs"]``."""
    target = cfg["programs"] if programs < cfg["cut_below"] else 1
    seg_len = max(chunk, triton.cdiv(triton.cdiv(length, triton.cdiv(target, programs)), chunk) * chunk)
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
    return t if ok else t.clone(memory_format=torch.contiguous_format)  # a copy even of a contiguous view


def _lanes_known(B: torch.Tensor, C: torch.Tensor, n: int, dim: int, bd: int, nv: int, num_warps: int,
                 channel_sums: bool = False) -> bool:
    """Whether the kernels' (NV, NH, BD) tiles are in the layout that their inline assembly is written for: NV
    consecutive states per thread, lane = nh + NH*d, NH*BD = 32 lanes of one warp. The loads of NV two-byte B/C
    values per thread set it (float32 rows take more loads per thread and get another layout), and only without
    channel masks (with them, a misaligned state store was seen on the H100); the interpreter has no lanes. The
    state stores need runs of 4 states (NV = 4 or 8); ``channel_sums``: also the backward's dB/dC sums, written for
    8 x 2 x 16 tiles (see _SUM_CHANNELS_ASM)."""
    tile = (nv, n // nv, bd)
    shape = tile == (8, 2, 16) if channel_sums else nv in (4, 8) and tile[1] * tile[2] == 32
    return (n == 16 and shape and num_warps == 1 and B.element_size() == C.element_size() == 2 and dim % bd == 0
            and not INTERPRET)


def _ring_rows_ok(*ts: torch.Tensor | None) -> bool:
    """Whether the (b, l, d) rows can be copied into the ring in 16-byte pieces (2-byte values, 16-byte aligned) by
    the GPU Triton compiles for: cp.async needs sm_80 (Ampere) or newer, so T4s and V100s take the plain loads. The
    interpreter emulates the ring."""
    if not INTERPRET:
        target = driver.active.get_current_target()
        if target.backend != "cuda" or target.arch < 80:
            return False
    return all(t is None or (t.element_size() == 2 and t.stride(0) % 8 == 0 and t.stride(1) % 8 == 0
                             and t.data_ptr() % 16 == 0) for t in ts)


def _ring_buffer(ring: bool, programs: int, like: torch.Tensor) -> torch.Tensor:
    """What stands in for the ring's shared memory under the interpreter (one RING_BYTES row per program); on the
    GPU the kernels ignore the argument."""
    if ring and INTERPRET:
        return torch.empty(programs * _RING_BYTES // 2, dtype=torch.int16, device=like.device)
    return like


def _strides(*ts: torch.Tensor) -> list[int]:
    return [s for t in ts for s in (t.stride(0), t.stride(1))]


class SelectiveScanFn(torch.autograd.Function):
    """Fused selective scan with chunk-boundary states saved for a recomputing backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, save):
        u, delta = _rowwise(u), _rowwise(delta)
        B, C = _aligned(B), _aligned(C)
        z = _rowwise(z) if z is not None else None
        batch, length, dim = u.shape
        n = A.shape[1]
        A = A.float().contiguous()
        D_ = D.float().contiguous() if D is not None else None
        bias = delta_bias.float().contiguous() if delta_bias is not None else None
        out = torch.empty_like(u, memory_format=torch.contiguous_format)
        chunk = BWD_CONFIG["chunk"]
        states = u.new_empty((batch, triton.cdiv(length, chunk), dim, n) if save else (1,), dtype=torch.float32)
        cfg = FWD_CONFIG
        n_blocks = triton.cdiv(dim, cfg["BD"])
        # Few (batch, channel block) programs leave most SMs idle: cut time into segments run in parallel.
        seg_len, n_seg = _segments(length, batch * n_blocks, cfg, chunk)
        busy = batch * n_blocks * n_seg >= cfg["busy"]
        steps, depth = (cfg[k] if busy else cfg[k + "_idle"] for k in ("U", "depth"))
        bd, nv = cfg["BD"], min(n, cfg["NV"])
        if not busy and n_seg == 1:  # about one warp per SM sub-partition, in one segment: the "_idle" tiles
            bd, nv = cfg["BD_idle"], min(n, cfg["NV_idle"])
            n_blocks = triton.cdiv(dim, bd)
        lanes = _lanes_known(B, C, n, dim, bd, nv, cfg["num_warps"])
        ring = (cfg["ring"] and (lanes or INTERPRET) and dim % bd == 0 and 1 <= depth <= 5
                and (depth + 1) * 5 * steps * 32 <= _RING_BYTES and _ring_rows_ok(u, delta, z, B, C))
        ring_buf = _ring_buffer(ring, batch * n_blocks * n_seg, u)
        group = n // nv if cfg["group"] and (lanes or INTERPRET) and n // nv in (2, 4) else 1
        seg_state = torch.empty(batch, n_seg, dim, n, dtype=torch.float32, device=u.device)
        seg_dt = torch.empty(batch, n_seg, dim, dtype=torch.float32, device=u.device)

        def launch(seg_state: torch.Tensor, save_states: bool, state_only: bool, has_init: bool) -> None:
            _scan_fwd_kernel[(batch, n_blocks, n_seg)](
                u, delta, A, B, C, D_ if D_ is not None else A, z if z is not None else u,
                bias if bias is not None else A, out, states, seg_state, seg_dt, ring_buf, length, dim, seg_len, 1,
                int(save_states), *_strides(u, delta, z if z is not None else u, B, C, out),
                N=n, NV=nv, BD=bd, U=steps, DEPTH=depth, CHUNK=chunk, HAS_D=D is not None,
                HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
                REVERSE=bool(reverse), STATE_ONLY=state_only, HAS_INIT=has_init,
                MUFU=cfg["mufu"] and not INTERPRET, COLS=dim % bd != 0, LANES=lanes,
                PRED_STORE=cfg["pred_store"], GROUP=group if steps % group == 0 else 1, RING=ring,
                num_warps=cfg["num_warps"],
            )

        if length > 0:
            if n_seg > 1:
                launch(seg_state, False, True, False)
                seg_state = _chain_segments(seg_state, seg_dt, A, reverse=False)
            launch(seg_state, save, False, n_seg > 1)
        if save:
            SelectiveScanFn.save_context(ctx, (u, delta, A, B, C, D_, z, bias, states), D, delta_bias,
                                         delta_softplus, reverse)
        return out

    @staticmethod
    def save_context(ctx, tensors: tuple, D, delta_bias, delta_softplus: bool, reverse: bool) -> None:
        """What the backward reads: the kernels' inputs (u, delta, A, B, C, D, z, bias as float32 where they are
        parameters) and the states saved every ``BWD_CONFIG["chunk"]`` walk steps (b, chunks, d, n). The CUDA
        backend's forward (caduceus.ops.cuda) saves the same and reuses this backward."""
        ctx.save_for_backward(*tensors)
        ctx.flags = (D is not None, tensors[6] is not None, delta_bias is not None, bool(delta_softplus), bool(reverse))
        ctx.chunk = BWD_CONFIG["chunk"]
        ctx.dtypes = (D.dtype if D is not None else None, delta_bias.dtype if delta_bias is not None else None)

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
        chunk = ctx.chunk
        seg_len, n_seg = _segments(length, batch * n_blocks, cfg, chunk)
        dA = torch.empty(batch, n_seg, dim, n, **f32)
        dD = torch.empty(batch, n_seg, dim, **f32)
        dbias = torch.empty(batch, n_seg, dim, **f32)
        dBC = torch.empty(batch, n_blocks, length, 2 * n, **f32)
        seg_adj = torch.empty(batch, n_seg, dim, n, **f32)
        seg_dt = torch.empty(batch, n_seg, dim, **f32)
        scratch = torch.empty(batch * n_blocks * n_seg * (chunk // cfg["SUB"]) * cfg["BD"] * n, **f32)

        shfl = _lanes_known(B, C, n, dim, cfg["BD"], min(n, cfg["NV"]), cfg["num_warps"], channel_sums=True)
        ring = (cfg["ring"] and (shfl or INTERPRET) and dim % cfg["BD"] == 0 and 1 <= cfg["prefetch"] <= 4
                and cfg["SUB"] == 4 and n == 16 and _ring_rows_ok(u, delta, z, dout, B, C))
        ring_buf = _ring_buffer(ring, batch * n_blocks * n_seg, u)

        def launch(seg_adj: torch.Tensor, adj_only: bool, has_init: bool) -> None:
            _scan_bwd_kernel[(batch, n_blocks, n_seg)](
                u, delta, A, B, C, D_ if has_d else A, z if has_z else u, bias if has_bias else A, dout, states,
                scratch, seg_adj, seg_dt, du, ddelta, dz if has_z else du, dA, dD, dbias, dBC, ring_buf,
                length, dim, seg_len, 1, *_strides(u, delta, z if has_z else u, B, C, dout),
                N=n, NV=min(n, cfg["NV"]), BD=cfg["BD"], SUB=cfg["SUB"], CHUNK=chunk, HAS_D=has_d, HAS_Z=has_z,
                HAS_BIAS=has_bias, SOFTPLUS=softplus, REVERSE=reverse, ADJ_ONLY=adj_only, HAS_INIT=has_init,
                MUFU=cfg["mufu"] and not INTERPRET, COLS=dim % cfg["BD"] != 0,
                SHFL=shfl, SMEM_SUMS=cfg["smem_sums"], PF=cfg["prefetch"],
                RING=ring and (cfg["ring_adj"] or not adj_only), num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"],
            )

        if length > 0:
            if n_seg > 1:
                launch(seg_adj, True, False)
                seg_adj = _chain_segments(seg_adj, seg_dt, A, reverse=True)
            launch(seg_adj, False, n_seg > 1)
        else:
            for t in (dA, dD, dbias, dBC):
                t.zero_()
        return SelectiveScanFn.gradients(ctx, B, C, du, ddelta, dz, dA, dD, dbias, dBC)

    @staticmethod
    def gradients(ctx, B, C, du, ddelta, dz, dA, dD, dbias, dBC) -> tuple:
        """backward's return from the kernels' outputs: dA (b, segments, d, n), dD and dbias (b, segments, d) summed
        over batch rows and segments, dBC (b, channel blocks, l, 2n) over channel blocks; None for what has none.
        B and C: the saved ones (their dtypes are dB's and dC's)."""
        has_d, _, has_bias, _, _ = ctx.flags
        d_dtype, bias_dtype = ctx.dtypes
        n = B.shape[-1]
        dBC = dBC.sum(1)  # one pass over the channel blocks' partials for dB and dC together
        return (
            du,
            ddelta,
            dA.sum((0, 1)),
            dBC[..., :n].to(B.dtype),
            dBC[..., n:].to(C.dtype),
            dD.sum((0, 1)).to(d_dtype) if has_d else None,
            dz,
            dbias.sum((0, 1)).to(bias_dtype) if has_bias else None,
            None,
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
    # Inside forward grad mode is always off and needs_input_grad ignores it: decide here whether to save the states.
    save = needs_grad(u, delta, A, B, C, D, z, delta_bias)
    return SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, save)
