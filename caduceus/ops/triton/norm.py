"""Fused residual add + RMSNorm in Triton: one read of x and residual, writes (normed, x + residual).

The sum is rounded to the input dtype (as ``residual_in_fp32=False``) and normalised in fp32. The backward takes the
gradients of both outputs; dweight is summed per program and then over programs in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 16  # rows per program


@triton.jit
def _rms_fwd_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, rstd_ptr, M, W, eps,
                    HAS_RES: tl.constexpr, ROWS: tl.constexpr, BW: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BW)
    mask = (rows < M)[:, None] & (cols < W)[None, :]
    offs = rows.to(tl.int64)[:, None] * W + cols[None, :]
    s = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        s = (s + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + offs, s, mask=mask)
        s = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / W + eps)
    w = tl.load(w_ptr + cols, mask=cols < W, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (s * rstd[:, None] * w[None, :]).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit
def _rms_bwd_kernel(s_ptr, w_ptr, rstd_ptr, dy_ptr, dsum_ptr, dx_ptr, dw_ptr, M, W,
                    HAS_DSUM: tl.constexpr, ROWS: tl.constexpr, BW: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BW)
    mask = (rows < M)[:, None] & (cols < W)[None, :]
    offs = rows.to(tl.int64)[:, None] * W + cols[None, :]
    rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
    xhat = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32) * rstd[:, None]
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < W, other=0.0).to(tl.float32)
    dxhat = dy * w[None, :]
    dx = rstd[:, None] * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=1) / W)[:, None])
    if HAS_DSUM:
        dx += tl.load(dsum_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid * W + cols, tl.sum(dy * xhat, axis=0), mask=cols < W)


class RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        m, width = x2.shape
        out = torch.empty_like(x2)
        summed = torch.empty_like(x2) if residual is not None else x2.clone()
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        res2 = residual.reshape(-1, width).contiguous() if residual is not None else x2
        if m > 0:
            _rms_fwd_kernel[(triton.cdiv(m, ROWS),)](
                x2, res2, weight, out, summed, rstd, m, width, eps,
                HAS_RES=residual is not None, ROWS=ROWS, BW=triton.next_power_of_2(width),
            )
        ctx.save_for_backward(summed, weight, rstd)
        ctx.has_res = residual is not None
        ctx.shape = shape
        return out.reshape(shape), summed.reshape(shape)

    @staticmethod
    def backward(ctx, dy, dsum):
        summed, weight, rstd = ctx.saved_tensors
        m, width = summed.shape
        dy = dy.reshape(m, width).contiguous()
        dsum = dsum.reshape(m, width).contiguous() if dsum is not None else None
        dx = torch.empty_like(summed)
        n_prog = triton.cdiv(m, ROWS)
        dw = torch.zeros(n_prog, width, dtype=torch.float32, device=dy.device)
        if m > 0:
            _rms_bwd_kernel[(n_prog,)](
                summed, weight, rstd, dy, dsum if dsum is not None else dy, dx, dw, m, width,
                HAS_DSUM=dsum is not None, ROWS=ROWS, BW=triton.next_power_of_2(width),
            )
        dx = dx.reshape(ctx.shape)
        return dx, dw.sum(0).to(weight.dtype), dx if ctx.has_res else None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None,
             eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Same function as ``reference.rms_norm_reference``: returns (RMSNorm(x + residual), x + residual)."""
    return RMSNormFn.apply(x, weight, residual, eps)
