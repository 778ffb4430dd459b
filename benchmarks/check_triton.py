"""Check the Triton kernels against the literal float64 reference on fresh random inputs (needs a CUDA GPU, or
Triton's CPU interpreter with --interpret).

    PYTHONPATH=. python benchmarks/check_triton.py            # full sweep, L up to 131,072
    PYTHONPATH=. python benchmarks/check_triton.py --quick    # small shapes only
    PYTHONPATH=. python benchmarks/check_triton.py --shard 1/3  # every third case: run the shards side by side
                                                               # (Triton's compiles dominate and use one core each)
    PYTHONPATH=. python benchmarks/check_triton.py --only "scan fwd"  # the cases of that name (then sharded)
    PYTHONPATH=. python benchmarks/check_triton.py --interpret [--quick] [--set group=True ...]  # CPU, no GPU

Relative error ||out - ref|| / ||ref|| must stay under 1e-4 (fp32 inputs) or 1e-2 (bf16/fp16), for the output and
every gradient; NaN never passes. Before each run the CUDA caching allocator is filled with NaN, so an output
element that a kernel forgets to write shows up. Gradients are checked up to L = 2,048 (autograd through the
reference's Python loop); longer sequences, up to 131,072, check the forward only, against the same reference run
under no_grad in float64 on the GPU.

``--interpret`` runs the kernels in Triton's interpreter (TRITON_INTERPRET=1) on small shapes: their index
arithmetic, masks, segments and both directions, forward and backward, with no GPU (about 5 minutes on one core;
``--quick``, the shorter sequences, about one; CI runs that). It does not run inline PTX, so
the paths that need the GPU's lane layout are checked through their portable forms (``--set`` takes FWD_CONFIG
entries, ``bwd_KEY`` BWD_CONFIG's: benchmarks/settings.py). Triton 3.6's interpreter needs numpy < 2.3.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

if "--interpret" in sys.argv:  # before Triton is imported: its jit decorator reads this
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from benchmarks.settings import add_settings_argument, apply_settings  # noqa: E402
from caduceus.configuration import CaduceusModelConfig  # noqa: E402
from caduceus.modeling import CaduceusForMaskedLM  # noqa: E402
from caduceus.ops import reference  # noqa: E402
from caduceus.ops.testing import TOLERANCE, relative_error, scan_errors, scan_inputs, training_errors  # noqa: E402
from caduceus.ops.triton import causal_conv1d, rms_norm, scan, selective_scan  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def poison() -> None:
    """Fill the allocator's free blocks with NaN so that unwritten output elements are caught (CUDA only)."""
    if DEVICE == "cpu":
        return
    blocks = [torch.full((n,), float("nan"), device=DEVICE) for n in (256, 4096, 1 << 18)]
    size = max(torch.cuda.mem_get_info()[0] // 8, 1 << 20)  # half the free memory, in float32
    while True:
        try:  # a shard run beside this one may have taken it meanwhile
            blocks.append(torch.full((size,), float("nan"), device=DEVICE))
            break
        except torch.OutOfMemoryError:
            if size == 1 << 20:
                raise
            size = max(size // 2, 1 << 20)
    del blocks


def check_scan(b: int, length: int, d: int, dtype: torch.dtype, reverse: bool, grads: bool,
               variant: str = "full") -> dict[str, float]:
    """u and z slices of one tensor and B, C of another (dt_rank 8, as at d_model 118); "plain": no D, z,
    bias or softplus."""
    inputs = scan_inputs(b, length, d, dtype, device=DEVICE, full=variant == "full", shared_rows=True, dt_rank=8,
                         seed=length + d)
    return scan_errors(selective_scan, inputs, reverse, grads, before=poison)


def check_conv(b: int, length: int, d: int, dtype: torch.dtype, reverse: bool, silu: bool) -> dict[str, float]:
    x = torch.randn(b, length, 2 * d, device=DEVICE).to(dtype)[..., :d]
    w, bias = torch.randn(d, 1, 4, device=DEVICE) * 0.5, torch.randn(d, device=DEVICE)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, bias)]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (x, w, bias)]
    poison()
    out = causal_conv1d(*leaves, reverse, silu)
    ref = reference.causal_conv1d_reference(*ref_leaves, reverse, silu)
    g = torch.randn_like(ref)
    poison()
    out.backward(g.to(dtype))
    ref.backward(g)
    return {"out": relative_error(out, ref), **{f"d{k}": relative_error(a.grad, r.grad)
                                                for k, a, r in zip(("x", "w", "b"), leaves, ref_leaves)}}


def check_norm(rows: int, width: int, dtype: torch.dtype, residual: bool) -> dict[str, float]:
    x = torch.randn(rows, width, device=DEVICE).to(dtype)
    r = torch.randn(rows, width, device=DEVICE).to(dtype) if residual else None
    w = torch.rand(width, device=DEVICE) + 0.5
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, r)]
    ref_leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, r)]
    poison()
    out, summed = rms_norm(leaves[0], leaves[1], leaves[2], 1e-5)
    ref_out, ref_sum = reference.rms_norm_reference(ref_leaves[0], ref_leaves[1], ref_leaves[2], 1e-5)
    g1, g2 = torch.randn_like(ref_out), torch.randn_like(ref_sum)
    poison()
    torch.autograd.backward([out, summed], [g1.to(dtype), g2.to(dtype)])
    torch.autograd.backward([ref_out, ref_sum], [g1, g2])
    errs = {"out": relative_error(out, ref_out), "sum": relative_error(summed, ref_sum)}
    errs.update({f"d{k}": relative_error(a.grad, b.grad)
                 for k, a, b in zip("xwr", leaves, ref_leaves) if a is not None})
    return errs


def check_model(batch: int, length: int, d_model: int, dtype: torch.dtype, rcps: bool) -> dict[str, float]:
    """A one-layer model whose mixer channels the Triton backend pads (d_model 118: 236 -> 240): logits and every
    parameter's gradient against the reference backend in float64, which pads nothing."""
    model = CaduceusForMaskedLM(CaduceusModelConfig(d_model=d_model, n_layer=1, rcps=rcps))
    ids = torch.randint(3, 11, (batch, length), device=DEVICE)
    errs = training_errors(model, ids, "triton", dtype, before=poison)
    worst = max(errs, key=errs.get)
    return {"logits": errs["logits"], f"worst ({worst.split('.', 3)[-1]})": errs[worst]}


def conv_cases(shape: tuple[int, int, int]) -> list[tuple]:
    """The conv with and without its SiLU, both dtypes and directions, at one shape."""
    return [("conv silu" if silu else "conv", dtype, reverse, shape, lambda *a, silu=silu: check_conv(*a, silu=silu))
            for dtype, reverse, silu in itertools.product((torch.float32, torch.bfloat16), (False, True),
                                                          (False, True))]


def run(quick: bool, shard: int = 0, shards: int = 1, only: str | None = None) -> bool:
    torch.manual_seed(shard)
    cases = []
    grad_lengths = (1, 7, 256, 257, 1000) if quick else (1, 7, 256, 257, 1000, 2048)
    for dtype, reverse, length in itertools.product((torch.float32, torch.bfloat16), (False, True), grad_lengths):
        b = 3 if length > 256 else 5
        cases.append(("scan", dtype, reverse, (b, length, 236), lambda *a: check_scan(*a, grads=True)))
    cases.append(("scan plain", torch.float32, False, (2, 300, 512), lambda *a: check_scan(*a, grads=True,
                                                                                          variant="plain")))
    cases.append(("scan fp16", torch.float16, True, (2, 300, 512), lambda *a: check_scan(*a, grads=True)))
    cases.append(("scan B=64", torch.bfloat16, False, (64, 64, 512), lambda *a: check_scan(*a, grads=True)))
    fwd_only = [(1, 4099, 512)] if quick else [(1, 4099, 512), (4, 20000, 236), (1, 131072, 236), (2, 131072, 512)]
    for shape, dtype, reverse in itertools.product(fwd_only, (torch.float32, torch.bfloat16), (False, True)):
        cases.append(("scan fwd", dtype, reverse, shape, lambda *a: check_scan(*a, grads=False)))
    cases += conv_cases((3, 1000, 236))
    for dtype, res in itertools.product((torch.float32, torch.bfloat16), (False, True)):
        cases.append(("rms_norm", dtype, res, (1000, 256), check_norm))
    cases += [("model", torch.float32, rcps, (2, 1000, 118), check_model) for rcps in (False, True)]
    if DEVICE == "cpu":  # the interpreter runs a kernel's programs one by one in Python: small shapes only
        long, segmented = (45, 300) if quick else (301, 1000)
        cases = [("scan", dtype, reverse, (b, length, d), lambda *a: check_scan(*a, grads=True))
                 for dtype, reverse, (b, length, d) in itertools.product(
                     (torch.float32, torch.bfloat16), (False, True), ((2, 7, 32), (1, 45, 20), (1, long, 16)))]
        # time segments (5 or 16): the state passed from segment to segment is decayed by their sums of dt
        cases += [("scan fwd", dtype, reverse, (1, segmented, 16), lambda *a: check_scan(*a, grads=False))
                  for dtype, reverse in itertools.product((torch.float32, torch.bfloat16), (False, True))]
        cases.append(("scan fp16", torch.float16, True, (1, long, 16), lambda *a: check_scan(*a, grads=True)))
        cases += conv_cases((2, 130, 20))
        cases += [("rms_norm", dtype, res, (40, 118), check_norm)
                  for dtype, res in itertools.product((torch.float32, torch.bfloat16), (False, True))]
        cases.append(("model", torch.float32, False, (1, 24, 118), check_model))
    if only is not None:
        cases = [case for case in cases if case[0] == only]
        if not cases:
            sys.exit(f"--only {only!r}: no case of that name")
    ok_all = True
    for name, dtype, flag, shape, fn in cases[shard::shards]:
        errs = fn(*shape, dtype, flag)
        worst = max(errs.values())
        ok = worst < TOLERANCE[dtype]  # NaN/inf compare False
        ok_all &= ok
        detail = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
        print(f"{'ok  ' if ok else 'FAIL'} {name:10s} {str(dtype)[6:]:8s} flag={flag!s:5s} {shape}: {detail}",
              flush=True)
    return ok_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument("--shard", default="1/1", help="I/N: run every N-th case from the I-th (default: all)")
    parser.add_argument("--only", help="run only the cases of this name ('scan', 'scan fwd', 'conv', 'conv silu', ...)")
    parser.add_argument("--interpret", action="store_true", help="the scan on small shapes in Triton's interpreter")
    add_settings_argument(parser)
    args = parser.parse_args()
    shard, shards = (int(v) for v in args.shard.split("/"))
    if not 1 <= shard <= shards:
        sys.exit(f"--shard {args.shard}: want I/N with 1 <= I <= N")
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --interpret)")
    if DEVICE == "cpu":
        import numpy

        if tuple(int(v) for v in numpy.__version__.split(".")[:2]) >= (2, 3):
            sys.exit(f"--interpret: Triton's interpreter needs numpy < 2.3 (numpy {numpy.__version__} is installed)")
    apply_settings(scan, args.set)
    ok = run(args.quick, shard - 1, shards, args.only)
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
