"""Checking a kernel backend against another (the float64 reference by default): what the GPU tests and
``benchmarks/check_triton.py`` use, and what a backend added with ``ops.register_backend`` can be checked with."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from caduceus.ops import use_backend

# Relative error (relative_error) a backend's outputs and gradients may have against the float64 reference, by dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error of ``out`` against ``ref``, in float64; infinite if ``out`` has a NaN or an inf."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float((out - ref).norm())


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
