"""Selective scan on CPU with numba: sequential in time, independent jobs over (batch, channel block); and the
depthwise conv + SiLU that feeds it, for inference.

The exp of the N decays dominates; libm's scalar ``expf`` caps a core near 0.2e9 updates/s, so ``_exp2`` is a
polynomial scaled by ``ldexp``, which LLVM vectorises (relative error ~1e-7, the float32 rounding of the result).
The forward puts a block's channels on the vector lanes, so that C·h needs no horizontal sum, walks time in tiles
of ``TILE`` steps across all its jobs (a tile's rows stay in cache), prefetches the rows ``AHEAD`` steps on, and
computes the softplus step and the SiLU gate itself; it saves the state at chunk boundaries only. The backward
recomputes each chunk's states from its saved state and walks it in reverse, with the same layout.

The kernels run without the GIL, on Python threads that claim groups of jobs from a shared counter. (numba's own
``parallel=True`` pool spin-waits between calls and starves PyTorch's threads: training a small model ran 30× slower
beside it on 2 cores.) ``error_model="numpy"``: Python's zero-division check on ``/`` would stop LLVM from
vectorising.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding, ir
from numba import njit, types
from numba.core import cgutils, config
from numba.extending import intrinsic


def _prefer_512_bit_vectors() -> None:
    """LLVM tunes recent Intel server CPUs to prefer 256-bit vectors; these loops run 1.3-1.5x faster on 512-bit
    ones (BENCHMARKS.md). numba takes target features for the whole process, so this sets them only where the user
    has not (NUMBA_CPU_FEATURES) and the CPU has AVX-512, and only takes effect if numba has compiled nothing yet."""
    try:
        features = binding.get_host_cpu_features()
    except RuntimeError:  # LLVM cannot read them on some hosts: keep numba's defaults
        return
    if config.CPU_FEATURES is None and features.get("avx512f"):
        config.CPU_FEATURES = features.flatten() + ",-prefer-256-bit"


_prefer_512_bit_vectors()

BLOCK_D = 64  # channels per job: four 16-lane vectors per state row amortise the per-step scalar work
CHUNK = 256
CONV_STEPS = 256  # time steps per conv job
TILE = 16  # steps per time tile: the rows of a tile, for all of a thread's jobs, stay in cache
AHEAD = 4  # the scans prefetch the rows this many steps ahead
_LOG2E = np.float32(1.4426950408889634)
_LN2 = np.float32(0.6931471805599453)
# Polynomial coefficients, highest degree first, fitted in float64 and rounded to float32:
# 2^f on [-0.5, 0.5], degree 5, minimax relative error with the constant term exactly 1 (a bias there would compound
# along the scan): 9.1e-8 exactly, 1.9e-7 evaluated in float32 (degree 6 costs one more FMA per state update, ~10 %);
_EXP2_COEFFS = tuple(np.float32(c) for c in (
    0.001326472731307149, 0.009671512991189957, 0.05550733581185341, 0.24022242426872253, 0.6931470036506653, 1.0))
# log1p(v) / v on [0, 1], degree 10 (Chebyshev): relative error 8.5e-9 exactly.
_LOG1P_COEFFS = tuple(np.float32(c) for c in (
    0.0020376905, -0.013444831, 0.04155762, -0.082535334, 0.12425103, -0.16108632, 0.19891538, -0.24987392,
    0.33332568, -0.49999982, 1.0))


def _llvm_call(name: str, result: ir.Type, *operands: ir.Type):
    """Codegen calling the LLVM intrinsic ``name``: LLVM vectorises these like plain arithmetic."""

    def codegen(context, builder, signature, args):
        function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, operands), name)
        return builder.call(function, args)

    return codegen


@intrinsic
def _prefetch(typingctx, row):
    """Ask for the cache lines of a row's first BLOCK_D float32 values (llvm.prefetch into L1). The forward reads
    256 bytes from each of rows a few KB apart, a pattern the hardware prefetchers do not follow."""

    def codegen(context, builder, signature, args):
        pointer, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        start = builder.bitcast(context.make_array(signature.args[0])(context, builder, args[0]).data, pointer)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [pointer, i32, i32, i32]), "llvm.prefetch.p0")
        for offset in range(0, BLOCK_D * 4, 64):  # read, keep in all levels, data
            line = builder.gep(start, [ir.Constant(ir.IntType(64), offset)])
            builder.call(prefetch, [line, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(row), codegen


@intrinsic
def _round_to_int(typingctx, x):
    """x rounded to the nearest integer, as int32 (llvm.lrint: one vcvtps2dq)."""
    return types.int32(types.float32), _llvm_call("llvm.lrint.i32.f32", ir.IntType(32), ir.FloatType())


@intrinsic
def _ldexp(typingctx, x, k):
    """x · 2^k (llvm.ldexp: one vscalefps with AVX-512)."""
    return (types.float32(types.float32, types.int32),
            _llvm_call("llvm.ldexp.f32.i32", ir.FloatType(), ir.FloatType(), ir.IntType(32)))


@intrinsic
def _claim(typingctx, counter):
    """counter[0] += 1 atomically; returns the value before."""

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.atomic_rmw("add", array.data, ir.Constant(ir.IntType(64), 1), "monotonic")

    return types.int64(counter), codegen


@njit
def _claimed_groups(counter, group, jobs):
    """The (first, last) job ranges of ``group`` jobs that this thread claims from the shared ``counter`` until all
    ``jobs`` are taken: a thread on a slowed core takes fewer (this VM's two vCPUs drift apart by up to 40 %, and a
    fixed split waits for the slower one)."""
    while True:
        first = _claim(counter) * group
        if first >= jobs:
            return
        yield first, min(first + group, jobs)


@njit
def _claimed_jobs(counter, group, jobs):
    """The jobs of ``_claimed_groups`` one by one."""
    for first, last in _claimed_groups(counter, group, jobs):
        for job in range(first, last):  # noqa: UP028 (numba compiles no ``yield from``)
            yield job


@njit(inline="always", fastmath=True, error_model="numpy")
def _polynomial(coeffs, x: float) -> float:
    """Horner's rule, highest degree first (the tuple is unrolled at compile time)."""
    p = coeffs[0]
    for c in coeffs[1:]:
        p = p * x + c
    return p


@njit(inline="always", fastmath=True, error_model="numpy")
def _exp2(x: float) -> float:
    """2^x for x >= -126 (below, 2^-126): polynomial of the fraction, scaled by 2^k. Five vector operations
    besides the polynomial's; ldexp also gives inf above 128 without a clamp."""
    x = max(x, np.float32(-126.0))
    k = _round_to_int(x)
    return _ldexp(_polynomial(_EXP2_COEFFS, x - np.float32(k)), k)


@njit(inline="always", fastmath=True, error_model="numpy")
def _log1p_unit(v: float) -> float:
    """ln(1 + v) for v in [0, 1]."""
    return v * _polynomial(_LOG1P_COEFFS, v)


@njit(inline="always", fastmath=True, error_model="numpy")
def _softplus(x: float) -> float:
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|); x itself above 20, as PyTorch and the CUDA kernel."""
    value = np.maximum(x, np.float32(0.0)) + _log1p_unit(_exp2(-np.abs(x) * _LOG2E))
    return x if x > np.float32(20.0) else value


@njit(inline="always", fastmath=True, error_model="numpy")
def _silu(x: float) -> float:
    return x / (np.float32(1.0) + _exp2(-x * _LOG2E))


@njit(inline="always")
def _position(step: int, length: int, reverse: bool) -> int:
    return length - 1 - step if reverse else step


@njit(inline="always")
def _zeros_on_cache_lines(size):
    """Float32 zeros from a 64-byte boundary. numba aligns arrays to 32 bytes only, and the kernels ran up to 20 %
    slower in the processes where their buffers' 64-byte vectors straddled two cache lines."""
    buffer = np.zeros(size + 16, np.float32)
    start = (-buffer.ctypes.data // 4) % 16
    return buffer[start:start + size]


@njit(inline="always")
def _load_rates(A, d0, A2) -> None:
    """A2 (n, j) = A[d0 + j, n] · log2(e) for a block's channels, on the lanes (the exps are exp2); the lanes past the
    last channel keep their zeros."""
    for j in range(min(A2.shape[1], A.shape[0] - d0)):
        for n in range(A.shape[1]):
            A2[n, j] = A[d0 + j, n] * _LOG2E


@njit(nogil=True, fastmath=True, error_model="numpy", cache=True)
def scan_forward(u, delta, softplus_bias, A, B, C, D, z, reverse, y, states, save_states, counter, group, jobs):
    """y (b, l, d) = (C·h + D·u) · silu(z) with dt = softplus(delta + softplus_bias); states (b, n_chunks, d, n) =
    the state before each chunk. ``softplus_bias`` None: dt = delta; ``z`` None: no gate (training applies both
    outside, under autograd). numba compiles a version per None-ness, with the branches resolved."""
    batch, length, dim = u.shape
    n_state = A.shape[1]
    n_blocks = (dim + BLOCK_D - 1) // BLOCK_D
    for first, last in _claimed_groups(counter, group, jobs):
        n_jobs = last - first
        grid_size = n_jobs * n_state * BLOCK_D
        work = _zeros_on_cache_lines(2 * grid_size + 4 * BLOCK_D)
        h_all = work[:grid_size].reshape((n_jobs, n_state, BLOCK_D))  # channels last: on the vector lanes
        A2_all = work[grid_size:2 * grid_size].reshape((n_jobs, n_state, BLOCK_D))  # 0 on padding lanes: state stays 0
        for i in range(n_jobs):
            _load_rates(A, ((first + i) % n_blocks) * BLOCK_D, A2_all[i])
        lanes = work[2 * grid_size:].reshape((4, BLOCK_D))
        steps, drives, acc, gates = lanes[0], lanes[1], lanes[2], lanes[3]
        gates[:] = 1.0
        for s0 in range(0, length, TILE):
            for i in range(n_jobs):
                b = (first + i) // n_blocks
                d0 = ((first + i) % n_blocks) * BLOCK_D
                d1 = min(d0 + BLOCK_D, dim)
                width = d1 - d0
                h, A2 = h_all[i], A2_all[i]
                steps[width:] = 0.0
                drives[width:] = 0.0
                for step in range(s0, min(s0 + TILE, length)):
                    if save_states and step % CHUNK == 0:
                        for n in range(n_state):
                            for j in range(width):
                                states[b, step // CHUNK, d0 + j, n] = h[n, j]
                    t = _position(step, length, reverse)
                    if step + AHEAD < length:
                        ahead = _position(step + AHEAD, length, reverse)
                        _prefetch(u[b, ahead, d0:d1])
                        _prefetch(delta[b, ahead, d0:d1])
                        _prefetch(y[b, ahead, d0:d1])
                        if z is not None:
                            _prefetch(z[b, ahead, d0:d1])
                    # Rows are sliced first: an index from range() is provably >= 0, so LLVM drops numba's
                    # negative-index wraparound and loads them as vectors (rows indexed with d0 + j become gathers).
                    u_row, delta_row, D_row, y_row = u[b, t, d0:d1], delta[b, t, d0:d1], D[d0:d1], y[b, t, d0:d1]
                    # Defined on both branches (a variable defined on one only stops LLVM from vectorising the loop).
                    bias_row = softplus_bias[d0:d1] if softplus_bias is not None else delta_row
                    z_row = z[b, t, d0:d1] if z is not None else u_row
                    for j in range(width):
                        step_j = delta_row[j]
                        if softplus_bias is not None:
                            step_j = _softplus(step_j + bias_row[j])
                        steps[j] = step_j
                        drives[j] = step_j * u_row[j]
                        acc[j] = D_row[j] * u_row[j]
                        if z is not None:
                            gates[j] = _silu(z_row[j])
                    B_row, C_row = B[b, t], C[b, t]
                    for n in range(n_state):
                        b_n, c_n = B_row[n], C_row[n]
                        for j in range(BLOCK_D):
                            h[n, j] = _exp2(steps[j] * A2[n, j]) * h[n, j] + drives[j] * b_n
                            acc[j] += h[n, j] * c_n
                    for j in range(width):
                        y_row[j] = acc[j] * gates[j]  # gates stay 1 without z


@njit(inline="always")
def _load_step(dt_row, u_row, steps, drives) -> None:
    """A step's dt and dt·u onto the first lanes (the padding lanes stay 0: their state and gradients stay 0)."""
    for j in range(dt_row.shape[0]):
        steps[j] = dt_row[j]
        drives[j] = dt_row[j] * u_row[j]


@njit(nogil=True, fastmath=True, error_model="numpy", cache=True)
def scan_backward(u, dt, A, B, C, D, reverse, states, dy, du, ddt, dA_part, dB_part, dC_part, dD_part, counter, group,
                  jobs):
    """Gradients; dA/dD per batch row and dB/dC per channel block, each written once by the job that owns it, dB/dC
    summed by the caller in a fixed order so that the result is deterministic.

    Channels on the vector lanes, as in the forward. Each chunk is recomputed from its saved state with its states
    kept (1 MB, in L2), then walked in reverse with the state gradient ``dh``; the walk recomputes the decays, as an
    exp costs less than a second 1 MB stream. Σ over channels for dB/dC is one horizontal sum per (step, state)."""
    batch, length, dim = u.shape
    n_state = A.shape[1]
    n_blocks = (dim + BLOCK_D - 1) // BLOCK_D
    n_chunks = (length + CHUNK - 1) // CHUNK
    grid_size = (CHUNK + 4) * n_state * BLOCK_D
    work = _zeros_on_cache_lines(grid_size + 6 * BLOCK_D)
    grids = work[:grid_size].reshape((CHUNK + 4, n_state, BLOCK_D))
    hs = grids[:CHUNK + 1]  # the states before and after each step of a chunk
    A2, dh, dA = grids[CHUNK + 1], grids[CHUNK + 2], grids[CHUNK + 3]
    lanes = work[grid_size:].reshape((6, BLOCK_D))
    steps, drives, grads, dD = lanes[0], lanes[1], lanes[2], lanes[3]
    ddt_acc, dh_B = lanes[4], lanes[5]  # Σ_n dh·A2·decay·h_prev; Σ_n dh·B, shared by du and ddt
    for job in _claimed_jobs(counter, group, jobs):
        b = job // n_blocks
        blk = job % n_blocks
        d0 = blk * BLOCK_D
        d1 = min(d0 + BLOCK_D, dim)
        width = d1 - d0
        for array in (A2, dh, dA, hs[0]):  # also clears the padding lanes of a narrower last block
            array[:] = 0.0
        for row in (steps, drives, grads, dD):
            row[:] = 0.0
        _load_rates(A, d0, A2)
        for chunk in range(n_chunks - 1, -1, -1):
            s0 = chunk * CHUNK
            size = min(CHUNK, length - s0)
            for j in range(width):
                for n in range(n_state):
                    hs[0, n, j] = states[b, chunk, d0 + j, n]
            for i in range(size):
                t = _position(s0 + i, length, reverse)
                if i + AHEAD < size:
                    ahead = _position(s0 + i + AHEAD, length, reverse)
                    for rows in (u, dt):
                        _prefetch(rows[b, ahead, d0:d1])
                _load_step(dt[b, t, d0:d1], u[b, t, d0:d1], steps, drives)
                B_row, h_prev, h_next = B[b, t], hs[i], hs[i + 1]
                for n in range(n_state):
                    b_n = B_row[n]
                    for j in range(BLOCK_D):
                        h_next[n, j] = _exp2(steps[j] * A2[n, j]) * h_prev[n, j] + drives[j] * b_n
            for i in range(size - 1, -1, -1):
                t = _position(s0 + i, length, reverse)
                if i >= AHEAD:
                    ahead = _position(s0 + i - AHEAD, length, reverse)
                    for rows in (u, dt, dy, du, ddt):
                        _prefetch(rows[b, ahead, d0:d1])
                    for rows in (B, C, dB_part[blk], dC_part[blk]):
                        _prefetch(rows[b, ahead])
                u_row, dy_row = u[b, t, d0:d1], dy[b, t, d0:d1]
                _load_step(dt[b, t, d0:d1], u_row, steps, drives)
                for j in range(width):
                    grads[j] = dy_row[j]
                ddt_acc[:] = 0.0
                dh_B[:] = 0.0
                B_row, C_row, h_prev, h_next = B[b, t], C[b, t], hs[i], hs[i + 1]
                dB_row, dC_row = dB_part[blk, b, t], dC_part[blk, b, t]
                for n in range(n_state):
                    b_n, c_n = B_row[n], C_row[n]
                    dB_n = np.float32(0.0)
                    dC_n = np.float32(0.0)
                    for j in range(BLOCK_D):
                        decay = _exp2(steps[j] * A2[n, j])
                        dh_n = dh[n, j] + grads[j] * c_n  # the gradient of h_t
                        q = dh_n * decay * h_prev[n, j]
                        ddt_acc[j] += A2[n, j] * q
                        dA[n, j] += steps[j] * q
                        dh_B[j] += dh_n * b_n
                        dB_n += dh_n * drives[j]
                        dC_n += grads[j] * h_next[n, j]
                        dh[n, j] = decay * dh_n
                    dB_row[n] = dB_n
                    dC_row[n] = dC_n
                du_row, ddt_row, D_row = du[b, t, d0:d1], ddt[b, t, d0:d1], D[d0:d1]
                for j in range(width):
                    du_row[j] = dy_row[j] * D_row[j] + steps[j] * dh_B[j]
                    ddt_row[j] = ddt_acc[j] * _LN2 + u_row[j] * dh_B[j]
                    dD[j] += dy_row[j] * u_row[j]
        for j in range(width):
            dD_part[b, d0 + j] = dD[j]
            for n in range(n_state):
                dA_part[b, d0 + j, n] = dA[n, j]


@njit(nogil=True, fastmath=True, error_model="numpy", cache=True)
def conv_forward(x, weight, bias, reverse, silu, out, counter, group, jobs):
    """out (b, l, d) = depthwise conv of x with weight (k, d) plus bias, causal (anti-causal if ``reverse``), then
    SiLU if ``silu``; jobs are (batch row, block of CONV_STEPS steps)."""
    batch, length, dim = x.shape
    k = weight.shape[0]
    n_blocks = (length + CONV_STEPS - 1) // CONV_STEPS
    for job in _claimed_jobs(counter, group, jobs):
        b = job // n_blocks
        s0 = (job % n_blocks) * CONV_STEPS
        for t in range(s0, min(s0 + CONV_STEPS, length)):
            row = out[b, t]
            row[:] = bias
            for j in range(k):
                source = t + (k - 1) - j if reverse else t - (k - 1) + j
                if 0 <= source < length:
                    x_row, w_row = x[b, source], weight[j]
                    for c in range(dim):
                        row[c] += w_row[c] * x_row[c]
            if silu:
                for c in range(dim):
                    row[c] = _silu(row[c])
