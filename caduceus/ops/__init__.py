"""Kernels behind one dispatch point.

``selective_scan``, ``causal_conv1d`` and ``rms_norm`` pick a backend from the tensor's device:
``triton`` on CUDA when Triton is importable, otherwise ``torch`` (pure PyTorch, chunked, with a
custom autograd Function; numba accelerates the scan loop on CPU when installed). ``reference`` is
the literal, slow implementation the others are tested against. ``cuda`` (opt-in) is ``triton`` with
the scan's forward in hand-written CUDA compiled at run time (NVRTC).

Force a backend with ``use_backend("torch")`` (a context manager), ``set_backend(name)`` or the
``CADUCEUS_BACKEND`` environment variable. A new backend registers itself with ``register_backend``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from caduceus.ops import reference


@dataclass(frozen=True)
class Backend:
    name: str
    selective_scan: Callable[..., torch.Tensor]
    causal_conv1d: Callable[..., torch.Tensor]
    rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    device_types: tuple[str, ...]
    channel_multiple: int = 1  # the model pads the mixer's channels to a multiple of this (see channel_multiple)


_BACKENDS: dict[str, Backend] = {}
# Lazily imported modules that register a backend. "auto" tries _AUTO in order; "cuda" (the scan forward in CUDA C++,
# the rest Triton's) is opt-in.
_LAZY = {"triton": "caduceus.ops.triton", "torch": "caduceus.ops.cpu", "cuda": "caduceus.ops.cuda"}
_AUTO = ("triton", "torch")
_forced: str | None = None


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will want gradients of any of ``tensors`` (inference-only fused paths check this)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


register_backend(
    Backend(
        name="reference",
        selective_scan=reference.selective_scan_reference,
        causal_conv1d=reference.causal_conv1d_reference,
        rms_norm=reference.rms_norm_reference,
        device_types=("cpu", "cuda", "mps", "xpu"),
    )
)


def _load(name: str) -> Backend | None:
    if name not in _BACKENDS and name in _LAZY:
        try:
            importlib.import_module(_LAZY[name])
        except ImportError:
            return None
    return _BACKENDS.get(name)


def available_backends() -> list[str]:
    """Names of the backends that can be loaded on this machine."""
    return [n for n in [*_LAZY, "reference"] if _load(n) is not None]


def set_backend(name: str | None) -> None:
    """Force a backend by name for every call (``None`` returns to automatic choice)."""
    global _forced
    if name is not None and _load(name) is None:
        raise ValueError(f"unknown or unavailable kernel backend {name!r}; available: {available_backends()}")
    _forced = name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend inside a ``with`` block."""
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def get_backend(device: torch.device | str) -> Backend:
    """The backend used for tensors on ``device``: forced, else the first loadable one for its type."""
    name = _forced or os.environ.get("CADUCEUS_BACKEND") or None
    if name is not None:
        backend = _load(name)
        if backend is None:
            raise ValueError(f"unknown or unavailable kernel backend {name!r}; available: {available_backends()}")
        return backend
    device_type = torch.device(device).type
    for candidate in _AUTO:
        backend = _load(candidate)
        if backend is not None and device_type in backend.device_types:
            return backend
    return _BACKENDS["reference"]


def channel_multiple(device: torch.device | str) -> int:
    """What the backend for ``device`` wants the mixer's channel count (d_inner) to be a multiple of: the Triton
    kernels work in tiles of 16 channels and take a slower, masked path for the rest (d_model 118's 236 channels)."""
    return get_backend(device).channel_multiple


def selective_scan(
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
    """Mamba-1 selective scan in the (batch, length, channels) layout; see ``reference.selective_scan_reference``."""
    return get_backend(u.device).selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reverse: bool = False, silu: bool = False
) -> torch.Tensor:
    """Depthwise causal (or, with ``reverse``, anti-causal) conv over length, (b, l, d) layout, then SiLU if
    ``silu`` (fused where the backend can)."""
    return get_backend(x.device).causal_conv1d(x, weight, bias, reverse, silu)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``residual + x`` then RMSNorm; returns (normed, new residual)."""
    return get_backend(x.device).rms_norm(x, weight, residual, eps)
