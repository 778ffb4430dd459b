"""What the GPU kernel tests share: NaN-poisoning of the allocator and a norm-wise relative error."""

from __future__ import annotations

import torch

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def poison() -> None:
    """NaN-fill freed allocator blocks so that an output element a kernel does not write fails the check."""
    blocks = [torch.full((n,), float("nan"), device="cuda") for n in (256, 4096, 1 << 18, 1 << 26)]
    del blocks


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
