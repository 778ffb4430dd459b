"""Depthwise causal / anti-causal conv1d over length in Triton, (batch, length, channels) layout.

The causal conv reads x[t-(K-1)+k], the anti-causal one x[t+(K-1)-k]; the gradient wrt x is the conv of the output
gradient in the opposite direction, so one kernel serves both. The SiLU that follows the conv in Mamba is fused into
it; the backward recomputes the conv's output for the SiLU's derivative (saving only the input) in the same pass that
sums dweight and dbias per program over its rows, which are then summed over programs in a fixed order
(deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BL, BDC = 64, 128  # rows x channels per program
# The backward's tiles: BL_BWD x BDC_BWD, up to TILES_BWD of them per program (512 rows), reduced over rows once.
BL_BWD, BDC_BWD, TILES_BWD, WARPS_BWD = 16, 64, 32, 4


@triton.jit
def _multiple(n, VEC: tl.constexpr):
    """n itself (VEC divides it, the caller checked), written so that Triton knows it: Triton knows only whether an
    integer argument is a multiple of 16, and without this would read rows of, say, 236 channels 2 bytes at a time."""
    return n // VEC * VEC


@triton.jit
def _shifted(x_base, offs_t, offs_d, mask_d, L, s_xl, k: tl.constexpr, K: tl.constexpr, REVERSE: tl.constexpr):
    """Tap k's input rows x[t -+ (K-1-k)] as float32, zero outside the sequence."""
    src = offs_t + (K - 1 - k) if REVERSE else offs_t - (K - 1 - k)
    ok = (src >= 0) & (src < L)
    xk = tl.load(x_base + src[:, None] * s_xl + offs_d[None, :], mask=ok[:, None] & mask_d[None, :], other=0.0)
    return xk.to(tl.float32)


@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, L, DIM, s_xb, s_xl, s_ob, s_ol,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr,
    BL: tl.constexpr, BDC: tl.constexpr, VEC: tl.constexpr,
):
    """out[t] = bias + sum_k w[k] x[t -+ (K-1-k)], optionally followed by SiLU. VEC divides DIM and the strides."""
    DIM, s_xb, s_xl = _multiple(DIM, VEC), _multiple(s_xb, VEC), _multiple(s_xl, VEC)
    s_ob, s_ol = _multiple(s_ob, VEC), _multiple(s_ol, VEC)
    pid_b = tl.program_id(0)
    offs_t = tl.program_id(1) * BL + tl.arange(0, BL)
    offs_d = tl.program_id(2) * BDC + tl.arange(0, BDC)
    mask_d = offs_d < DIM
    acc = tl.zeros([BL, BDC], tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    x_base = x_ptr + pid_b.to(tl.int64) * s_xb
    for k in tl.static_range(K):
        wk = tl.load(w_ptr + offs_d * K + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += _shifted(x_base, offs_t, offs_d, mask_d, L, s_xl, k, K, REVERSE) * wk[None, :]
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    out = out_ptr + pid_b.to(tl.int64) * s_ob + offs_t[:, None] * s_ol + offs_d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_t < L)[:, None] & mask_d[None, :])


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, g_ptr, ga_ptr, dw_ptr, L, DIM, s_xb, s_xl, s_gb, s_gl, s_ab, s_al,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr,
    BL: tl.constexpr, BDC: tl.constexpr, TILES: tl.constexpr, VEC: tl.constexpr,
):
    """The gradient at the conv's output before the SiLU, ga = g * SiLU'(conv(x)) with the conv recomputed (stored
    to ga_ptr; without SILU ga is g and nothing is stored), and per-program partial sums dw[k] = sum_t ga[t]
    x[t -+ (K-1-k)], db = sum_t ga[t], shape (programs, K+1, DIM), over TILES tiles of BL rows: the products are
    summed in registers tile by tile and reduced over the rows once, at the end. VEC divides DIM and the strides."""
    DIM, s_xb, s_xl = _multiple(DIM, VEC), _multiple(s_xb, VEC), _multiple(s_xl, VEC)
    s_gb, s_gl, s_ab, s_al = _multiple(s_gb, VEC), _multiple(s_gl, VEC), _multiple(s_ab, VEC), _multiple(s_al, VEC)
    pid_b = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_d = tl.program_id(2) * BDC + tl.arange(0, BDC)
    mask_d = offs_d < DIM
    x_base = x_ptr + pid_b.to(tl.int64) * s_xb
    bias = tl.zeros([BDC], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    ws = ()
    for k in tl.static_range(K):  # loaded once: in the loop they would be reloaded per tile (the ga store may alias)
        ws = ws + (tl.load(w_ptr + offs_d * K + k, mask=mask_d, other=0.0).to(tl.float32),)
    acc = ()
    for _ in tl.static_range(K + 1):
        acc = acc + (tl.zeros([BL, BDC], tl.float32),)
    for i in range(TILES):
        offs_t = (pid_t * TILES + i) * BL + tl.arange(0, BL)
        mask = (offs_t < L)[:, None] & mask_d[None, :]
        ga = tl.load(g_ptr + pid_b.to(tl.int64) * s_gb + offs_t[:, None] * s_gl + offs_d[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        xs = ()
        for k in tl.static_range(K):
            xs = xs + (_shifted(x_base, offs_t, offs_d, mask_d, L, s_xl, k, K, REVERSE),)
        if SILU:
            a = tl.zeros([BL, BDC], tl.float32) + bias[None, :]
            for k in tl.static_range(K):
                a += xs[k] * ws[k][None, :]
            sig = 1.0 / (1.0 + tl.exp(-a))
            ga = ga * sig * (1.0 + a * (1.0 - sig))
            tl.store(ga_ptr + pid_b.to(tl.int64) * s_ab + offs_t[:, None] * s_al + offs_d[None, :],
                     ga.to(ga_ptr.dtype.element_ty), mask=mask)
        new = ()
        for k in tl.static_range(K):
            new = new + (acc[k] + ga * xs[k],)
        acc = new + (acc[K] + ga,)
    part = dw_ptr + (pid_b * tl.num_programs(1) + pid_t).to(tl.int64) * (K + 1) * DIM + offs_d
    for k in tl.static_range(K + 1):
        tl.store(part + k * DIM, tl.sum(acc[k], axis=0), mask=mask_d)


def _vec(dim: int, *ts: torch.Tensor) -> int:
    """The most channels, a power of two up to 8 (16 bytes of bf16), that divide ``dim`` and the batch and row strides
    of ``ts``: the kernels' rows are that aligned."""
    vec = 8
    while vec > 1 and (dim % vec or any(s % vec for t in ts for s in t.stride()[:2])):
        vec //= 2
    return vec


def _launch_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reverse: bool,
                 silu: bool) -> torch.Tensor:
    batch, length, dim = x.shape
    out = torch.empty((batch, length, dim), dtype=x.dtype, device=x.device)
    grid = (batch, triton.cdiv(length, BL), triton.cdiv(dim, BDC))
    if length > 0:
        _conv_kernel[grid](
            x, weight, bias if bias is not None else weight, out, length, dim,
            x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            K=weight.shape[1], HAS_BIAS=bias is not None, SILU=silu, REVERSE=reverse, BL=BL, BDC=BDC,
            VEC=_vec(dim, x, out),
        )
    return out


class CausalConv1dFn(torch.autograd.Function):
    """The conv with its SiLU fused: the backward recomputes the conv's output where the SiLU's derivative needs it,
    so nothing but the input is saved."""

    @staticmethod
    def forward(ctx, x, weight, bias, reverse, silu):
        x = x if x.stride(-1) == 1 else x.contiguous()
        w = weight.reshape(weight.shape[0], -1).contiguous()
        ctx.save_for_backward(x, w, bias)
        ctx.flags = (reverse, silu)
        ctx.shapes = (weight.shape, bias.dtype if bias is not None else None)
        return _launch_conv(x, w, bias, reverse, silu)

    @staticmethod
    def backward(ctx, grad):
        x, w, bias = ctx.saved_tensors
        reverse, silu = ctx.flags
        w_shape, bias_dtype = ctx.shapes
        grad = grad.contiguous()
        batch, length, dim = x.shape
        k = w.shape[1]
        ga = torch.empty_like(grad) if silu else grad
        tiles = min(TILES_BWD, triton.next_power_of_2(max(1, triton.cdiv(length, BL_BWD))))
        n_t = triton.cdiv(length, BL_BWD * tiles)
        part = torch.empty(batch * n_t, k + 1, dim, dtype=torch.float32, device=x.device)
        if length > 0:
            _conv_bwd_kernel[(batch, n_t, triton.cdiv(dim, BDC_BWD))](
                x, w, bias if bias is not None else w, grad, ga, part, length, dim, x.stride(0), x.stride(1),
                grad.stride(0), grad.stride(1), ga.stride(0), ga.stride(1),
                K=k, HAS_BIAS=bias is not None, SILU=silu, REVERSE=reverse, BL=BL_BWD, BDC=BDC_BWD, TILES=tiles,
                VEC=_vec(dim, x, grad, ga), num_warps=WARPS_BWD,
            )
        dx = _launch_conv(ga, w, None, not reverse, silu=False)
        sums = part.sum(0)
        dw = sums[:k].t().reshape(w_shape).to(w.dtype)
        db = sums[k].to(bias_dtype) if bias_dtype is not None else None
        return dx, dw, db, None, None


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  reverse: bool = False, silu: bool = False) -> torch.Tensor:
    """Same function as ``reference.causal_conv1d_reference``; differentiable in x, weight and bias, with the SiLU
    fused into the conv's passes (the backward's too)."""
    return CausalConv1dFn.apply(x, weight, bias, reverse, silu)
