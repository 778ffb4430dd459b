"""The GPU kernel tests' allocator poisoning (small blocks: pytest-xdist runs many workers on one GPU, and blocks
as large as benchmarks/check_triton.py's would stay cached in each worker)."""

from __future__ import annotations

import torch


def poison() -> None:
    """NaN-fill freed allocator blocks so that an output element a kernel does not write fails the check."""
    blocks = [torch.full((n,), float("nan"), device="cuda") for n in (256, 4096, 1 << 18, 1 << 26)]
    del blocks
