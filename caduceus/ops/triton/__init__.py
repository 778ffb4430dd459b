"""Triton kernels for CUDA tensors: fused selective scan, depthwise causal conv1d and fused add + RMSNorm.

Importing this package registers the ``triton`` backend; without Triton installed the import fails and the dispatcher
falls back to the pure-PyTorch backend. So it does on ROCm builds of PyTorch (their GPUs are "cuda" devices too):
the kernels carry NVIDIA inline assembly.
"""

import torch

if torch.version.hip is not None:
    raise ImportError("the Triton kernels are written for NVIDIA GPUs (inline PTX); this is a ROCm build of PyTorch")

import triton  # noqa: E402, F401  (an ImportError here makes the backend unavailable)

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
