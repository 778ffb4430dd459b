"""Literal reference implementations of the kernels, written for clarity, used by the tests.

They follow mamba_ssm's ``selective_scan_ref`` semantics in the (batch, length, channels) layout and
compute in float32 (or float64 when given float64 inputs). Slow: one Python step per position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_reference(
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
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t;  y_t = C_t . h_t + D u_t;  y_t *= silu(z_t).

    Shapes: u, delta, z (b, l, d); A (d, n); B, C (b, l, n); D, delta_bias (d,).
    ``reverse=True`` runs the recurrence from the last position to the first (anti-causal).
    """
    dtype_in = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, B, C = (t.to(compute) for t in (u, delta, B, C))
    A = A.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)
    if delta_softplus:
        delta = torch.where(delta > 20.0, delta, F.softplus(delta))
    batch, length, dim = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = [None] * length
    steps = range(length - 1, -1, -1) if reverse else range(length)
    for t in steps:
        dA = torch.exp(delta[:, t, :, None] * A)
        dBu = delta[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
        h = dA * h + dBu
        ys[t] = (h * C[:, t, None, :]).sum(-1)
    y = torch.stack(ys, dim=1) if length else u.new_zeros(batch, 0, dim)
    if D is not None:
        y = y + u * D.to(compute)
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(dtype_in)


def causal_conv1d_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reverse: bool = False, silu: bool = False
) -> torch.Tensor:
    """Depthwise conv over length in the (b, l, d) layout; causal (left zero-padding), or anti-causal
    when ``reverse``; then SiLU if ``silu``. weight is (d, k) or the Conv1d shape (d, 1, k)."""
    weight = weight.reshape(weight.shape[0], -1)
    k = weight.shape[1]
    xt = x.transpose(1, 2)
    if reverse:
        xt = xt.flip(-1)
    out = F.conv1d(F.pad(xt, (k - 1, 0)), weight[:, None, :], bias, groups=weight.shape[0])
    if reverse:
        out = out.flip(-1)
    out = out.transpose(1, 2)
    return F.silu(out) if silu else out


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused add + RMSNorm as mamba_ssm's ``rms_norm_ref(prenorm=True)``: returns (normed, x + residual).

    The sum is kept in the input dtype (``residual_in_fp32=False``); the norm is computed in float32.
    """
    summed = x if residual is None else x + residual
    s = summed.float() if summed.dtype != torch.float64 else summed
    out = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * weight.to(s.dtype)
    return out.to(x.dtype), summed
