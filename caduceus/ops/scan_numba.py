"""Selective scan on CPU with numba: sequential in time, independent jobs over (batch, channel block); and the
depthwise conv + SiLU that feeds it, for inference.

The exp of the N decays dominates; libm's scalar ``expf`` caps a core near 0.2e9 updates/s, so ``_exp2`` is a
polynomial with an exponent-bit scale that LLVM vectorises (relative error ~1e-7, the float32 rounding of the
result). The forward puts a block's channels on the vector lanes, so that C·h needs no horizontal sum, walks time
in tiles of ``TILE`` steps across all its jobs (a tile's rows stay in cache), and computes the softplus step and
the SiLU gate itself; it saves the state at chunk boundaries only. The backward recomputes each chunk's states and
decays from its saved state and walks it in reverse.

The kernels run the jobs ``first..last`` without the GIL; the caller spreads job ranges over Python
threads. (numba's own ``parallel=True`` pool spin-waits between calls and starves PyTorch's threads:
training a small model ran 30× slower beside it on 2 cores.) ``error_model="numpy"``: Python's
zero-division check on ``/`` would stop LLVM from vectorising. Fast-math without ``nsz``: with it LLVM folds
the range reduction of ``_exp2``, (x + _ROUNDER) - _ROUNDER, back to x.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding
from numba import njit, types
from numba.core import config
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
_LOG2E = np.float32(1.4426950408889634)
_FASTMATH = {"nnan", "ninf", "arcp", "contract", "afn", "reassoc"}
# x + _ROUNDER rounds x to an integer k in the low mantissa bits, with the exponent bias 127 already added.
_ROUNDER = np.float32(1.5 * 2**23 + 127)
# Polynomial coefficients, highest degree first (Chebyshev fits in float64, rounded to float32):
# 2^f on [-0.5, 0.5], degree 6: relative error 2.6e-9 exactly, 1.1e-7 evaluated in float32;
_EXP2_COEFFS = tuple(np.float32(c) for c in (
    0.00015469732170458883, 0.0013400432653725147, 0.00961802527308464, 0.05550327152013779, 0.24022650718688965,
    0.6931471824645996, 1.0))
# log1p(v) / v on [0, 1], degree 10: relative error 8.5e-9 exactly.
_LOG1P_COEFFS = tuple(np.float32(c) for c in (
    0.0020376905, -0.013444831, 0.04155762, -0.082535334, 0.12425103, -0.16108632, 0.19891538, -0.24987392,
    0.33332568, -0.49999982, 1.0))


@intrinsic
def _as_float32(typingctx, bits):
    """Reinterpret int32 bits as a float32 (a no-op that LLVM vectorises)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.int32), codegen


@intrinsic
def _as_int32(typingctx, value):
    """Reinterpret a float32 as int32 bits."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int32))

    return types.int32(types.float32), codegen


@njit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _polynomial(coeffs, x: float) -> float:
    """Horner's rule, highest degree first (the tuple is unrolled at compile time)."""
    p = coeffs[0]
    for c in coeffs[1:]:
        p = p * x + c
    return p


@njit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _exp2(x: float) -> float:
    """2^x for x clamped to [-126, 126]: polynomial of the fraction times the exponent bits (rounding by adding
    _ROUNDER costs three vector operations; a round and a float-to-int conversion cost four)."""
    x = min(max(x, np.float32(-126.0)), np.float32(126.0))
    rounded = x + _ROUNDER
    fraction = x - (rounded - _ROUNDER)
    return _polynomial(_EXP2_COEFFS, fraction) * _as_float32(_as_int32(rounded) << np.int32(23))


@njit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _log1p_unit(v: float) -> float:
    """ln(1 + v) for v in [0, 1]."""
    return v * _polynomial(_LOG1P_COEFFS, v)


@njit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _softplus(x: float) -> float:
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|); x itself above 20, as PyTorch and the CUDA kernel."""
    value = np.maximum(x, np.float32(0.0)) + _log1p_unit(_exp2(-np.abs(x) * _LOG2E))
    return x if x > np.float32(20.0) else value


@njit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _silu(x: float) -> float:
    return x / (np.float32(1.0) + _exp2(-x * _LOG2E))


@njit(inline="always")
def _position(step: int, length: int, reverse: bool) -> int:
    return length - 1 - step if reverse else step


@njit(nogil=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def scan_forward(u, delta, bias, A, B, C, D, z, softplus, gate, reverse, y, states, save_states, first, last):
    """y (b, l, d) = (C·h + D·u) · silu(z) with dt = softplus(delta + bias) (each step optional: training
    applies them outside, under autograd); states (b, n_chunks, d, n) = the state before each chunk."""
    batch, length, dim = u.shape
    n_state = A.shape[1]
    n_blocks = (dim + BLOCK_D - 1) // BLOCK_D
    n_jobs = last - first
    h_all = np.zeros((n_jobs, n_state, BLOCK_D), np.float32)  # channels last: on the vector lanes
    A2_all = np.zeros((n_jobs, n_state, BLOCK_D), np.float32)  # zero on padding lanes: their state stays 0
    for i in range(n_jobs):
        d0 = ((first + i) % n_blocks) * BLOCK_D
        for j in range(min(BLOCK_D, dim - d0)):
            for n in range(n_state):
                A2_all[i, n, j] = A[d0 + j, n] * _LOG2E
    steps = np.zeros(BLOCK_D, np.float32)
    drives = np.zeros(BLOCK_D, np.float32)
    acc = np.zeros(BLOCK_D, np.float32)
    gates = np.ones(BLOCK_D, np.float32)
    for s0 in range(0, length, TILE):
        for i in range(n_jobs):
            b = (first + i) // n_blocks
            d0 = ((first + i) % n_blocks) * BLOCK_D
            width = min(BLOCK_D, dim - d0)
            h, A2 = h_all[i], A2_all[i]
            steps[width:] = 0.0
            drives[width:] = 0.0
            for step in range(s0, min(s0 + TILE, length)):
                if save_states and step % CHUNK == 0:
                    for n in range(n_state):
                        for j in range(width):
                            states[b, step // CHUNK, d0 + j, n] = h[n, j]
                t = _position(step, length, reverse)
                # Branch-free loops per flag: a condition inside would stop LLVM from vectorising them.
                for j in range(width):
                    steps[j] = delta[b, t, d0 + j] + bias[d0 + j]
                if softplus:
                    for j in range(width):
                        steps[j] = _softplus(steps[j])
                if gate:
                    for j in range(width):
                        gates[j] = _silu(z[b, t, d0 + j])
                for j in range(width):
                    drives[j] = steps[j] * u[b, t, d0 + j]
                    acc[j] = D[d0 + j] * u[b, t, d0 + j]
                for n in range(n_state):
                    b_n, c_n = B[b, t, n], C[b, t, n]
                    for j in range(BLOCK_D):
                        h[n, j] = _exp2(steps[j] * A2[n, j]) * h[n, j] + drives[j] * b_n
                        acc[j] += h[n, j] * c_n
                for j in range(width):
                    y[b, t, d0 + j] = acc[j] * gates[j]


@njit(nogil=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def scan_backward(u, dt, A, B, C, D, reverse, states, dy, du, ddt, dA_part, dB_part, dC_part, dD_part, first, last):
    """Gradients; dA/dD per batch row (accumulated: zero them first) and dB/dC per channel block (written),
    summed by the caller in a fixed order so that the result is deterministic."""
    batch, length, dim = u.shape
    n_state = A.shape[1]
    n_blocks = (dim + BLOCK_D - 1) // BLOCK_D
    n_chunks = (length + CHUNK - 1) // CHUNK
    for job in range(first, last):
        b = job // n_blocks
        blk = job % n_blocks
        d0 = blk * BLOCK_D
        d1 = min(d0 + BLOCK_D, dim)
        hs = np.empty((CHUNK + 1, BLOCK_D, n_state), np.float32)
        decays = np.empty((CHUNK, BLOCK_D, n_state), np.float32)  # kept from the recompute: no second exp
        dh = np.zeros((BLOCK_D, n_state), np.float32)
        dB_row = np.empty(n_state, np.float32)
        dC_row = np.empty(n_state, np.float32)
        for chunk in range(n_chunks - 1, -1, -1):
            s0 = chunk * CHUNK
            s1 = min(s0 + CHUNK, length)
            for d in range(d0, d1):  # recompute the chunk's states from the saved one
                for n in range(n_state):
                    hs[0, d - d0, n] = states[b, chunk, d, n]
            for step in range(s0, s1):
                t = _position(step, length, reverse)
                i = step - s0
                for d in range(d0, d1):
                    step_dt = dt[b, t, d]
                    du_ = step_dt * u[b, t, d]
                    for n in range(n_state):
                        decays[i, d - d0, n] = _exp2(step_dt * A[d, n] * _LOG2E)
                        hs[i + 1, d - d0, n] = decays[i, d - d0, n] * hs[i, d - d0, n] + du_ * B[b, t, n]
            for step in range(s1 - 1, s0 - 1, -1):
                t = _position(step, length, reverse)
                i = step - s0
                dB_row[:] = 0.0
                dC_row[:] = 0.0
                for d in range(d0, d1):
                    j = d - d0
                    step_dt = dt[b, t, d]
                    ut = u[b, t, d]
                    g = dy[b, t, d]
                    dD_part[b, d] += g * ut
                    du_t = g * D[d]
                    ddt_t = np.float32(0.0)
                    for n in range(n_state):
                        decay = decays[i, j, n]
                        dC_row[n] += g * hs[i + 1, j, n]
                        dhn = dh[j, n] + g * C[b, t, n]
                        h_prev = hs[i, j, n]
                        ddt_t += dhn * (A[d, n] * decay * h_prev + B[b, t, n] * ut)
                        dA_part[b, d, n] += dhn * step_dt * decay * h_prev
                        dB_row[n] += dhn * step_dt * ut
                        du_t += dhn * step_dt * B[b, t, n]
                        dh[j, n] = decay * dhn
                    du[b, t, d] = du_t
                    ddt[b, t, d] = ddt_t
                for n in range(n_state):  # this block's share of dB and dC at step t, written once
                    dB_part[blk, b, t, n] = dB_row[n]
                    dC_part[blk, b, t, n] = dC_row[n]


@njit(nogil=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def conv_forward(x, weight, bias, reverse, silu, out, first, last):
    """out (b, l, d) = depthwise conv of x with weight (k, d) plus bias, causal (anti-causal if ``reverse``), then
    SiLU if ``silu``; jobs are (batch row, block of CONV_STEPS steps)."""
    batch, length, dim = x.shape
    k = weight.shape[0]
    n_blocks = (length + CONV_STEPS - 1) // CONV_STEPS
    for job in range(first, last):
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
