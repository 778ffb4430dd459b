"""The ``torch`` backend: runs on any device PyTorch supports (CPU, Apple MPS, CUDA without Triton).

The scan is a custom autograd Function that stores only the state at chunk boundaries and recomputes
inside each chunk for the backward, so training keeps no per-step tensors. On CPU with numba installed
the loops run in ``scan_numba``; otherwise, and on other devices, a chunked PyTorch loop does: decays
for a whole chunk in one vectorised exp, then one fused multiply-add per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from caduceus.ops import Backend, reference, register_backend

try:
    from caduceus.ops import scan_numba
except ImportError:  # numba is an optional extra
    scan_numba = None

TORCH_CHUNK = 64


def _prepare(u, delta, A, B, C, D, z, delta_bias):
    """float32 operands, with D and the dt bias filled in with zeros when absent."""
    dim = u.shape[-1]
    f32 = [t.float() for t in (u, delta, A, B, C)]
    D = torch.zeros(dim, device=u.device) if D is None else D.float()
    bias = torch.zeros(dim, device=u.device) if delta_bias is None else delta_bias.float()
    return (*f32, D, None if z is None else z.float(), bias)


def _torch_chunk(u, dt, A, B, C, h, reverse):
    """Scan one chunk (dt already activated) from state ``h``; returns (y without D/gate, last state)."""
    decay = torch.exp(dt.unsqueeze(-1) * A)
    drive = (dt * u).unsqueeze(-1) * B.unsqueeze(2)
    steps = range(u.shape[1] - 1, -1, -1) if reverse else range(u.shape[1])
    states = [None] * u.shape[1]
    for t in steps:
        h = torch.addcmul(drive[:, t], decay[:, t], h)
        states[t] = h
    y = torch.einsum("btdn,btn->btd", torch.stack(states, 1), C)
    return y, h


def _chunks(length: int, reverse: bool) -> list[slice]:
    """Chunk slices in scan order (from the end when ``reverse``)."""
    bounds = [slice(s, min(s + TORCH_CHUNK, length)) for s in range(0, length, TORCH_CHUNK)]
    return bounds[::-1] if reverse else bounds


def _activate(delta, bias, softplus):
    v = delta + bias
    return torch.where(v > 20.0, v, F.softplus(v)) if softplus else v


def _gate(y, u, D, z):
    y = y + u * D
    return y * F.silu(z) if z is not None else y


class SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, reverse):
        dtype = u.dtype
        u, delta, A, B, C, D, z, bias = _prepare(u, delta, A, B, C, D, z, delta_bias)
        use_numba = scan_numba is not None and u.device.type == "cpu"
        if use_numba:
            y, states = _numba_forward(u, delta, A, B, C, D, z, bias, softplus, reverse)
        else:
            y, states = _torch_forward(u, delta, A, B, C, D, z, bias, softplus, reverse)
        ctx.save_for_backward(u, delta, A, B, C, D, z, bias, states)
        ctx.flags = (softplus, reverse, use_numba, delta_bias is not None, D is not None)
        return y.to(dtype)

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, z, bias, states = ctx.saved_tensors
        softplus, reverse, use_numba, _, _ = ctx.flags
        if use_numba:
            grads = _numba_backward(u, delta, A, B, C, D, z, bias, softplus, reverse, states, dy.float())
        else:
            grads = _torch_backward(u, delta, A, B, C, D, z, bias, softplus, reverse, states, dy.float())
        du, ddelta, dA, dB, dC, dD, dz, dbias = grads
        inputs = ctx.needs_input_grad
        cast = [g if g is None else g.to(dtype) for g, dtype in zip(
            (du, ddelta, dA, dB, dC, dD, dz, dbias),
            (t.dtype if t is not None else None for t in (u, delta, A, B, C, D, z, bias)))]
        return (*[g if need else None for g, need in zip(cast, inputs[:8])], None, None)


def _numba_forward(u, delta, A, B, C, D, z, bias, softplus, reverse):
    batch, length, dim = u.shape
    n_chunks = (length + scan_numba.CHUNK - 1) // scan_numba.CHUNK
    y = torch.empty(batch, length, dim)
    states = torch.empty(batch, n_chunks, dim, A.shape[1])
    arrays = [t.contiguous().numpy() for t in (u, delta, A, B, C, D, u if z is None else z, bias)]
    scan_numba.scan_forward(*arrays, z is not None, softplus, reverse, y.numpy(), states.numpy())
    return y, states


def _numba_backward(u, delta, A, B, C, D, z, bias, softplus, reverse, states, dy):
    batch, length, dim = u.shape
    n_blocks = (dim + scan_numba.BLOCK_D - 1) // scan_numba.BLOCK_D
    n_state = A.shape[1]
    du, ddelta, dz = torch.empty_like(u), torch.empty_like(u), torch.zeros_like(u)
    dA_part = torch.zeros(batch, dim, n_state)
    dB_part = torch.zeros(n_blocks, batch, length, n_state)
    dC_part = torch.zeros(n_blocks, batch, length, n_state)
    dD_part, dbias_part = torch.zeros(batch, dim), torch.zeros(batch, dim)
    arrays = [t.contiguous().numpy() for t in (u, delta, A, B, C, D, u if z is None else z, bias)]
    scan_numba.scan_backward(
        *arrays, z is not None, softplus, reverse, states.numpy(), dy.contiguous().numpy(),
        du.numpy(), ddelta.numpy(), dz.numpy(), dA_part.numpy(), dB_part.numpy(), dC_part.numpy(),
        dD_part.numpy(), dbias_part.numpy(),
    )
    return (du, ddelta, dA_part.sum(0), dB_part.sum(0), dC_part.sum(0), dD_part.sum(0),
            dz if z is not None else None, dbias_part.sum(0))


def _torch_forward(u, delta, A, B, C, D, z, bias, softplus, reverse):
    batch, length, dim = u.shape
    dt = _activate(delta, bias, softplus)
    h = u.new_zeros(batch, dim, A.shape[1])
    y = torch.empty_like(u)
    states = []
    for part in _chunks(length, reverse):
        states.append(h)
        y[:, part], h = _torch_chunk(u[:, part], dt[:, part], A, B[:, part], C[:, part], h, reverse)
    states = torch.stack(states, 1) if states else u.new_zeros(batch, 0, dim, A.shape[1])
    return _gate(y, u, D, z), states


def _torch_backward(u, delta, A, B, C, D, z, bias, softplus, reverse, states, dy):
    """Recompute each chunk with autograd, last chunk first, handing the state gradient backwards."""
    leaves = [t.detach().requires_grad_() for t in (A, D, bias)]
    A_, D_, bias_ = leaves
    grads = {name: [] for name in ("u", "delta", "B", "C", "z")}
    dA = torch.zeros_like(A)
    dD = torch.zeros_like(D)
    dbias = torch.zeros_like(bias)
    dh = torch.zeros_like(states[:, 0]) if states.shape[1] else None
    parts = _chunks(u.shape[1], reverse)
    for index in range(len(parts) - 1, -1, -1):
        part = parts[index]
        with torch.enable_grad():
            pieces = {n: t[:, part].detach().requires_grad_() for n, t in
                      (("u", u), ("delta", delta), ("B", B), ("C", C)) + ((("z", z),) if z is not None else ())}
            h0 = states[:, index].detach().requires_grad_()
            dt = _activate(pieces["delta"], bias_, softplus)
            y, h_end = _torch_chunk(pieces["u"], dt, A_, pieces["B"], pieces["C"], h0, reverse)
            y = _gate(y, pieces["u"], D_, pieces.get("z"))
            outs, cots = [y], [dy[:, part]]
            if dh is not None and index < len(parts) - 1:
                outs.append(h_end)
                cots.append(dh)
            wrt = [*pieces.values(), h0, A_, D_, bias_]
            result = torch.autograd.grad(outs, wrt, cots, allow_unused=True)
        for name, g in zip(pieces, result):
            grads[name].append((part, g))
        dh = result[len(pieces)]
        for total, g in zip((dA, dD, dbias), result[len(pieces) + 1:]):
            if g is not None:
                total += g
    full = {}
    for name, items in grads.items():
        out = torch.zeros_like(u if name in ("u", "delta", "z") else B)
        for part, g in items:
            if g is not None:
                out[:, part] = g
        full[name] = out
    return (full["u"], full["delta"], dA, full["B"], full["C"], dD,
            full["z"] if z is not None else None, dbias)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, reverse=False):
    return SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)


register_backend(
    Backend(
        name="torch",
        selective_scan=selective_scan,
        causal_conv1d=reference.causal_conv1d_reference,
        rms_norm=reference.rms_norm_reference,
        device_types=("cpu", "cuda", "mps", "xpu"),
    )
)
