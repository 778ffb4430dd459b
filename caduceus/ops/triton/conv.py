"""Depthwise causal / anti-causal conv1d over length in Triton, (batch, length, channels) layout.

The causal conv reads x[t-(K-1)+k], the anti-causal one x[t+(K-1)-k]; the gradient wrt x is the conv of the output
gradient in the opposite direction, so one kernel serves both. dweight and dbias are summed per program over its
rows and then over programs in a fixed order (deterministic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from caduceus.ops import needs_grad

BL, BDC = 64, 128  # rows x channels per program


@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, L, DIM, s_xb, s_xl, s_ob, s_ol,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr,
    BL: tl.constexpr, BDC: tl.constexpr,
):
    """out[t] = bias + sum_k w[k] x[t -+ (K-1-k)], optionally followed by SiLU."""
    pid_b = tl.program_id(0)
    offs_t = tl.program_id(1) * BL + tl.arange(0, BL)
    offs_d = tl.program_id(2) * BDC + tl.arange(0, BDC)
    mask_d = offs_d < DIM
    acc = tl.zeros([BL, BDC], tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    x_base = x_ptr + pid_b.to(tl.int64) * s_xb
    for k in tl.static_range(K):
        src = offs_t + (K - 1 - k) if REVERSE else offs_t - (K - 1 - k)
        ok = (src >= 0) & (src < L)
        xk = tl.load(x_base + src[:, None] * s_xl + offs_d[None, :], mask=ok[:, None] & mask_d[None, :], other=0.0)
        wk = tl.load(w_ptr + offs_d * K + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += xk.to(tl.float32) * wk[None, :]
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    out = out_ptr + pid_b.to(tl.int64) * s_ob + offs_t[:, None] * s_ol + offs_d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_t < L)[:, None] & mask_d[None, :])


@triton.jit
def _conv_dweight_kernel(
    x_ptr, g_ptr, dw_ptr, db_ptr, L, DIM, s_xb, s_xl, s_gb, s_gl,
    K: tl.constexpr, REVERSE: tl.constexpr, BL: tl.constexpr, BDC: tl.constexpr,
):
    """Per-program partial sums dw[k] = sum_t g[t] x[t -+ (K-1-k)] and db = sum_t g[t], shape (programs, K+1, DIM)."""
    pid_b = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_t = pid_t * BL + tl.arange(0, BL)
    offs_d = tl.program_id(2) * BDC + tl.arange(0, BDC)
    mask_d = offs_d < DIM
    g = tl.load(g_ptr + pid_b.to(tl.int64) * s_gb + offs_t[:, None] * s_gl + offs_d[None, :],
                mask=(offs_t < L)[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    part = dw_ptr + (pid_b * tl.num_programs(1) + pid_t).to(tl.int64) * (K + 1) * DIM + offs_d
    x_base = x_ptr + pid_b.to(tl.int64) * s_xb
    for k in tl.static_range(K):
        src = offs_t + (K - 1 - k) if REVERSE else offs_t - (K - 1 - k)
        ok = (src >= 0) & (src < L)
        xk = tl.load(x_base + src[:, None] * s_xl + offs_d[None, :], mask=ok[:, None] & mask_d[None, :], other=0.0)
        tl.store(part + k * DIM, tl.sum(g * xk.to(tl.float32), axis=0), mask=mask_d)
    tl.store(part + K * DIM, tl.sum(g, axis=0), mask=mask_d)


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
        )
    return out


class CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, reverse):
        x = x if x.stride(-1) == 1 else x.contiguous()
        w = weight.reshape(weight.shape[0], -1).contiguous()
        ctx.save_for_backward(x, w)
        ctx.reverse = reverse
        ctx.shapes = (weight.shape, bias.dtype if bias is not None else None)
        return _launch_conv(x, w, bias, reverse, silu=False)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        w_shape, bias_dtype = ctx.shapes
        grad = grad.contiguous()
        batch, length, dim = x.shape
        k = w.shape[1]
        dx = _launch_conv(grad, w, None, not ctx.reverse, silu=False)
        n_t = triton.cdiv(length, BL)
        part = torch.zeros(batch * n_t, k + 1, dim, dtype=torch.float32, device=x.device)
        if length > 0:
            _conv_dweight_kernel[(batch, n_t, triton.cdiv(dim, BDC))](
                x, grad, part, part, length, dim, x.stride(0), x.stride(1), grad.stride(0), grad.stride(1),
                K=k, REVERSE=ctx.reverse, BL=BL, BDC=BDC,
            )
        sums = part.sum(0)
        dw = sums[:k].t().reshape(w_shape).to(w.dtype)
        db = sums[k].to(bias_dtype) if bias_dtype is not None else None
        return dx, dw, db, None


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  reverse: bool = False, silu: bool = False) -> torch.Tensor:
    """Same function as ``reference.causal_conv1d_reference``; differentiable in x, weight and bias (the SiLU is
    fused into the conv's pass when no gradient is needed)."""
    if silu and not needs_grad(x, weight, bias):
        return causal_conv1d_silu(x, weight, bias, reverse)
    out = CausalConv1dFn.apply(x, weight, bias, reverse)
    return F.silu(out) if silu else out


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       reverse: bool = False) -> torch.Tensor:
    """SiLU(causal_conv1d(...)) in one pass for inference (no autograd); training goes through ``causal_conv1d``."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return _launch_conv(x, weight.reshape(weight.shape[0], -1).contiguous(), bias, reverse, silu=True)
