"""Checking a kernel backend against another (the float64 reference by default): what the GPU tests and
``benchmarks/check_triton.py`` use, and what a backend added with ``ops.register_backend`` can be checked with."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from caduceus.modeling import dt_bias
from caduceus.ops import use_backend
from caduceus.ops.reference import selective_scan_reference

# Relative error (relative_error) a backend's outputs and gradients may have against the float64 reference, by dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error of ``out`` against ``ref``, in float64; infinite if ``out`` has a NaN or an inf."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float((out - ref).norm())


def scan_inputs(batch: int, length: int, dim: int, dtype: torch.dtype = torch.bfloat16, *, n_state: int = 16,
                device: str | torch.device = "cpu", full: bool = True, shared_rows: bool = False, dt_rank: int = 16,
                seed: int = 0) -> dict[str, torch.Tensor | None]:
    """selective_scan's arguments by name, in its order, laid out as a Mamba mixer passes them: B and C slices of one
    x_proj output (``dt_rank`` columns first: 16 for d_model 256, 8 for 118), with ``shared_rows`` u and z slices
    of one (batch, length, 3 dim) tensor as well; A, D and delta_bias in fp32, delta_bias from Mamba's dt
    init (dt in [1e-3, 0.1]). Without ``full``, D, z and delta_bias are None and delta is positive: the step itself,
    for a call without softplus."""
    g = torch.Generator(device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, device=device)

    if shared_rows:
        u, delta, z = randn(batch, length, 3 * dim).to(dtype).split(dim, dim=-1)
    else:
        u, delta, z = (randn(batch, length, dim).to(dtype) for _ in range(3))
    delta = (delta.float() * 0.5 if full else delta.float().abs() * 0.1).to(dtype)
    bc = randn(batch, length, dt_rank + 2 * n_state).to(dtype)
    return {"u": u, "delta": delta, "A": -rand(dim, n_state) * n_state - 0.05,
            "B": bc[..., dt_rank:dt_rank + n_state], "C": bc[..., dt_rank + n_state:],
            "D": randn(dim) if full else None, "z": z if full else None,
            "delta_bias": dt_bias(rand(dim)) if full else None}


def scan_errors(selective_scan: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor | None],
                reverse: bool = False, grads: bool = True,
                before: Callable[[], None] | None = None) -> dict[str, float]:
    """relative_error of ``selective_scan``'s output ("out") and, with ``grads``, of every input's gradient ("du",
    "dA", ...) against the float64 reference on ``inputs`` (scan_inputs; softplus where delta_bias is given).
    ``before`` runs before the forward and before the backward."""
    softplus = inputs["delta_bias"] is not None
    leaves = {k: None if v is None else v.detach().clone().requires_grad_(grads) for k, v in inputs.items()}
    refs = {k: None if v is None else v.detach().double().requires_grad_(grads) for k, v in inputs.items()}
    if before is not None:
        before()
    with torch.set_grad_enabled(grads):
        out = selective_scan(**leaves, delta_softplus=softplus, reverse=reverse)
        expected = selective_scan_reference(**refs, delta_softplus=softplus, reverse=reverse)
    if out.dtype != inputs["u"].dtype:
        raise TypeError(f"the scan returned {out.dtype} for {inputs['u'].dtype} inputs")
    errors = {"out": relative_error(out, expected)}
    if grads:
        cotangent = torch.randn_like(expected)
        if before is not None:
            before()
        out.backward(cotangent.to(out.dtype))
        expected.backward(cotangent)
        errors.update({f"d{k}": relative_error(v.grad, refs[k].grad) for k, v in leaves.items() if v is not None})
    return errors


def training_step(model: torch.nn.Module, ids: torch.Tensor, backend: str, dtype: torch.dtype) -> dict:
    """Logits and every parameter's gradient of one masked-LM step (loss on ``ids`` themselves) of a copy of
    ``model`` in ``dtype`` on ``ids``'s device, with ``backend``'s kernels."""
    replica = copy.deepcopy(model).to(ids.device, dtype)
    with use_backend(backend):
        out = replica(ids, labels=ids)
        out.loss.backward()
    return {"logits": out.logits, **{name: p.grad for name, p in replica.named_parameters()}}


def training_errors(model: torch.nn.Module, ids: torch.Tensor, backend: str, dtype: torch.dtype,
                    reference: str = "reference", reference_dtype: torch.dtype = torch.float64,
                    before: Callable[[], None] | None = None) -> dict[str, float]:
    """relative_error of ``backend``'s training_step (logits, each gradient by parameter name) against
    ``reference``'s; ``before`` runs before each step (the GPU checks poison the allocator there)."""
    results = []
    for name, dt in ((backend, dtype), (reference, reference_dtype)):
        if before is not None:
            before()
        results.append(training_step(model, ids, name, dt))
    return {key: relative_error(value, results[1][key]) for key, value in results[0].items()}
