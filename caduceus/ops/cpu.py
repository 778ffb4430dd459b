"""The ``torch`` backend: runs on any device PyTorch supports (CPU, Apple MPS, CUDA without Triton).

The recurrence is a custom autograd Function (``StateScan``) that stores only the state at chunk
boundaries and recomputes inside each chunk for the backward, so training keeps no per-step tensors.
On CPU with numba installed its loops run in ``scan_numba``; otherwise, and on other devices, a chunked
PyTorch loop does: decays for a whole chunk in one vectorised exp, then one fused multiply-add per step.
The elementwise parts around it (softplus of the step, the SiLU gate) are plain PyTorch ops under
autograd; in inference on CPU the numba kernel applies them itself.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from caduceus.ops import Backend, needs_grad, reference, register_backend

try:
    from caduceus.ops import scan_numba
except ImportError:  # numba is an optional extra
    scan_numba = None

TORCH_CHUNK = 64
# Below this many (batch · length · channels) elements a scan runs on the calling thread alone.
PARALLEL_MIN_ELEMENTS = 1 << 18


def _chunks(length: int, size: int, reverse: bool) -> list[slice]:
    """Chunk slices in scan order (from the end when ``reverse``)."""
    bounds = [slice(s, min(s + size, length)) for s in range(0, length, size)]
    return bounds[::-1] if reverse else bounds


def _torch_chunk(u, dt, A, B, C, h, reverse):
    """Scan one chunk from state ``h``; returns (C·h per step, last state)."""
    decay = torch.exp(dt.unsqueeze(-1) * A)
    drive = (dt * u).unsqueeze(-1) * B.unsqueeze(2)
    steps = range(u.shape[1] - 1, -1, -1) if reverse else range(u.shape[1])
    states = [None] * u.shape[1]
    for t in steps:
        h = torch.addcmul(drive[:, t], decay[:, t], h)
        states[t] = h
    return torch.einsum("btdn,btn->btd", torch.stack(states, 1), C), h


def _torch_forward(u, dt, A, B, C, D, reverse):
    batch, length, dim = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])
    y = torch.empty_like(u)
    states = []
    for part in _chunks(length, TORCH_CHUNK, reverse):
        states.append(h)
        y[:, part], h = _torch_chunk(u[:, part], dt[:, part], A, B[:, part], C[:, part], h, reverse)
    states = torch.stack(states, 1) if states else u.new_zeros(batch, 0, dim, A.shape[1])
    return y + u * D, states


def _torch_backward(u, dt, A, B, C, D, reverse, states, dy):
    """Recompute each chunk with autograd, last chunk first, handing the state gradient backwards."""
    grads = [torch.zeros_like(t) for t in (u, dt, A, B, C)]
    du, ddt, dA, dB, dC = grads
    dh = None
    for index, part in reversed(list(enumerate(_chunks(u.shape[1], TORCH_CHUNK, reverse)))):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (u[:, part], dt[:, part], A, B[:, part], C[:, part],
                                                             states[:, index])]
            y, h_end = _torch_chunk(*leaves[:5], leaves[5], reverse)
            outputs, cotangents = ([y, h_end], [dy[:, part], dh]) if dh is not None else ([y], [dy[:, part]])
            g_u, g_dt, g_A, g_B, g_C, dh = torch.autograd.grad(outputs, leaves, cotangents)
        du[:, part], ddt[:, part], dB[:, part], dC[:, part] = g_u, g_dt, g_B, g_C
        dA += g_A
    return du + dy * D, ddt, dA, dB, dC, (dy * u).sum((0, 1))


def _run_jobs(kernel, args: tuple, jobs: int) -> None:
    """Run a numba kernel over its jobs ``0..jobs`` on PyTorch's thread count: each thread claims groups of about a
    quarter of its share until none are left."""
    workers = min(torch.get_num_threads(), jobs)
    counter = np.zeros(1, np.int64)
    if workers <= 1 or args[0].size < PARALLEL_MIN_ELEMENTS:
        kernel(*args, counter, jobs, jobs)
        return
    group = max(1, jobs // (4 * workers))
    pool = _thread_pool(workers)
    for future in [pool.submit(kernel, *args, counter, group, jobs) for _ in range(workers)]:
        future.result()


@functools.cache
def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """One long-lived pool per thread count (starting threads per scan would cost more than small scans)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="caduceus-scan")


def _numba_arrays(*tensors: torch.Tensor | None) -> list:
    """Contiguous numpy views: numba's vectorised loops need unit strides (copies only strided inputs). None stays
    None: an optional step the kernel skips."""
    return [None if t is None else t.contiguous().numpy() for t in tensors]


def _numba_forward(u, delta, A, B, C, D, reverse, bias=None, z=None, softplus=False, save_states=True):
    """The scan on numba; given ``softplus``, ``bias`` and ``z`` the kernel applies them too (inference)."""
    batch, length, dim = u.shape
    y = torch.empty(batch, length, dim)
    shape = (batch, -(-length // scan_numba.CHUNK), dim, A.shape[1]) if save_states else (1, 1, 1, 1)
    states = torch.empty(shape)
    if softplus:
        bias = torch.zeros(dim) if bias is None else bias
    elif bias is not None:
        delta, bias = delta + bias, None
    args = (*_numba_arrays(u, delta, bias, A, B, C, D, z), reverse, y.numpy(), states.numpy(), save_states)
    _run_jobs(scan_numba.scan_forward, args, batch * -(-dim // scan_numba.BLOCK_D))
    return y, states


def _numba_backward(u, dt, A, B, C, D, reverse, states, dy):
    batch, length, dim = u.shape
    n_blocks = -(-dim // scan_numba.BLOCK_D)
    du, ddt = torch.empty(batch, length, dim), torch.empty(batch, length, dim)
    dA_part = torch.empty(batch, dim, A.shape[1])
    dB_part = torch.empty(n_blocks, batch, length, A.shape[1])
    dC_part = torch.empty(n_blocks, batch, length, A.shape[1])
    dD_part = torch.empty(batch, dim)
    args = (*_numba_arrays(u, dt, A, B, C, D), reverse, states.numpy(), *_numba_arrays(dy),
            du.numpy(), ddt.numpy(), dA_part.numpy(), dB_part.numpy(), dC_part.numpy(), dD_part.numpy())
    _run_jobs(scan_numba.scan_backward, args, batch * n_blocks)
    return du, ddt, dA_part.sum(0), dB_part.sum(0), dC_part.sum(0), dD_part.sum(0)


def _use_numba(u: torch.Tensor) -> bool:
    return scan_numba is not None and u.device.type == "cpu" and u.dtype == torch.float32


class StateScan(torch.autograd.Function):
    """``y_t = C_t·h_t + D·u_t`` with ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t``, in float32 (float64 in,
    float64 out, through the PyTorch loop: used by the exactness tests)."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, D, reverse):
        use_numba = _use_numba(u)
        y, states = (_numba_forward if use_numba else _torch_forward)(u, dt, A, B, C, D, reverse)
        ctx.save_for_backward(u, dt, A, B, C, D, states)
        ctx.reverse, ctx.use_numba = reverse, use_numba
        return y

    @staticmethod
    def backward(ctx, dy):
        u, dt, A, B, C, D, states = ctx.saved_tensors
        backward = _numba_backward if ctx.use_numba else _torch_backward
        return (*backward(u, dt, A, B, C, D, ctx.reverse, states, dy.to(u.dtype)), None)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, reverse=False):
    dtype = u.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    D = torch.zeros(u.shape[-1], device=u.device, dtype=compute) if D is None else D.to(compute)
    bias = None if delta_bias is None else delta_bias.to(compute)
    z = None if z is None else z.to(compute)
    # Inference: one kernel does it all and keeps no states.
    if _use_numba(u) and not needs_grad(u, delta, A, B, C, D, z, bias):
        return _numba_forward(u, delta, A, B, C, D, reverse, bias, z, delta_softplus, save_states=False)[0].to(dtype)
    dt = delta if bias is None else delta + bias
    if delta_softplus:
        dt = F.softplus(dt)  # the identity above its threshold, 20, as in the CUDA kernel
    y = StateScan.apply(u, dt, A, B, C, D, reverse)
    return (y if z is None else y * F.silu(z)).to(dtype)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reverse: bool = False,
                  silu: bool = False) -> torch.Tensor:
    """Depthwise conv as K shifted multiply-adds in the (b, l, d) layout, with no transposes (one numba pass with
    the SiLU in inference on CPU).

    Causal: ``out[t] = Σ_j w[j] x[t-(K-1)+j]``; anti-causal: ``out[t] = Σ_j w[j] x[t+(K-1)-j]``.
    """
    weight = weight.reshape(weight.shape[0], -1)
    if _use_numba(x) and not needs_grad(x, weight, bias):
        out = torch.empty(x.shape)
        bias = torch.zeros(x.shape[-1]) if bias is None else bias.float()
        args = (*_numba_arrays(x, weight.t().float(), bias), reverse, silu, out.numpy())
        _run_jobs(scan_numba.conv_forward, args, x.shape[0] * -(-x.shape[1] // scan_numba.CONV_STEPS))
        return out
    k, length = weight.shape[1], x.shape[1]
    padded = F.pad(x, (0, 0, 0, k - 1) if reverse else (0, 0, k - 1, 0))
    out = torch.zeros_like(x) if bias is None else bias.to(x.dtype).expand_as(x)
    for j in range(k):
        start = k - 1 - j if reverse else j
        out = torch.addcmul(out, padded[:, start : start + length], weight[:, j])
    return F.silu(out) if silu else out


register_backend(
    Backend(
        name="torch",
        selective_scan=selective_scan,
        causal_conv1d=causal_conv1d,
        rms_norm=reference.rms_norm_reference,
        device_types=("cpu", "cuda", "mps", "xpu"),
    )
)
