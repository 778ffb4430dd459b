"""One scan forward (and optionally backward) launch to profile under Nsight Compute, with launch settings changed.

    ncu --clock-control none -k regex:_scan_fwd_kernel --launch-skip 1 --launch-count 1 \
        --section WarpStateStats --section SchedulerStats \
        python benchmarks/ncu_scan.py [--shape 16,16384,512] [--set pred_store=True ...] [--backward] [--cuda]

The first call compiles (and is skipped by ``--launch-skip 1``); the second is the one profiled. At B = 16, D = 512
the forward runs one program per (batch row, channel block), as at L = 131,072, so a shorter L gives the same
kernel and the same per-step behaviour in less time. ``--set`` takes FWD_CONFIG entries (``bwd_KEY``: BWD_CONFIG's; see
benchmarks/settings.py). ``--cuda``: the CUDA backend's scan (kernels scan_fwd, grad_fwd, ...; its backward with
``--set cuda_BACKWARD='"cuda"'``).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench_gpu import scan_args
from benchmarks.settings import add_settings_argument, apply_settings
from caduceus.ops.triton import scan as triton_scan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="16,16384,512", help="B,L,D")
    add_settings_argument(parser)
    parser.add_argument("--backward", action="store_true", help="also run the backward")
    parser.add_argument("--cuda", action="store_true", help="the CUDA backend's scan (caduceus/ops/cuda)")
    args = parser.parse_args()
    apply_settings(triton_scan, args.set)
    selective_scan = triton_scan.selective_scan
    if args.cuda:
        from caduceus.ops.cuda import selective_scan
    b, length, d = (int(x) for x in args.shape.split(","))
    leaves = [a.detach().requires_grad_(args.backward) for a in scan_args(b, length, d)]
    for _ in range(2):
        out = selective_scan(*leaves)
        if args.backward:
            out.backward(torch.ones_like(out))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
