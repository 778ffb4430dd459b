"""An optional CUDA backend: the selective scan forward as hand-written CUDA (``scan.cu``, compiled at run time with
the NVRTC that PyTorch's CUDA wheels bring), everything else from the Triton backend (the scan's backward unless
``scan.BACKWARD = "cuda"`` picks scan.cu's, the conv, the norm). Opt-in (``ops.set_backend("cuda")`` or
``CADUCEUS_BACKEND=cuda``); Triton stays the default. On an H100 its forward is 1.17x the Triton forward's speed at one
131k sequence (BENCHMARKS.md).
"""

from caduceus.ops import Backend, _load, register_backend
from caduceus.ops.cuda.scan import nvrtc_path, selective_scan  # on ROCm builds the Triton package refuses to import

triton_backend = _load("triton")
if triton_backend is None:
    raise ImportError("the CUDA backend builds on the Triton backend, which is unavailable here")
if nvrtc_path() is None:
    raise ImportError("the CUDA backend needs NVRTC (libnvrtc), which came with neither PyTorch nor CUDA")

__all__ = ["selective_scan"]

register_backend(
    Backend(
        name="cuda",
        selective_scan=selective_scan,
        causal_conv1d=triton_backend.causal_conv1d,
        rms_norm=triton_backend.rms_norm,
        device_types=("cuda",),
        channel_multiple=triton_backend.channel_multiple,
    )
)
