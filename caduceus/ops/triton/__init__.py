"""Triton kernels for CUDA tensors: fused selective scan, depthwise causal conv1d and fused add + RMSNorm.

Importing this package registers the ``triton`` backend; without Triton installed the import fails and the dispatcher
falls back to the pure-PyTorch backend.
"""

import triton  # noqa: F401  (an ImportError here makes the backend unavailable)

from caduceus.ops import Backend, register_backend
from caduceus.ops.triton.conv import causal_conv1d
from caduceus.ops.triton.norm import rms_norm
from caduceus.ops.triton.scan import selective_scan

__all__ = ["causal_conv1d", "rms_norm", "selective_scan"]

register_backend(
    Backend(
        name="triton",
        selective_scan=selective_scan,
        causal_conv1d=causal_conv1d,
        rms_norm=rms_norm,
        device_types=("cuda",),
        channel_multiple=16,
    )
)
