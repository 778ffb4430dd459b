"""sm_90 machine code of the Triton scan kernels (or, with ``--cuda``, of the CUDA backend's scan.cu), compiled here
without a GPU: registers, spills and, per loop, instructions and MUFU operations (what the kernels are tuned on, see
caduceus/ops/triton/scan.py).

    PYTHONPATH=. python benchmarks/sass_scan.py [--batch 16] [--length 4096] [--dim 512] [--dtype bfloat16]
                                                [--set KEY=VALUE ...] [--file scan.py] [--sass DIR] [--arch 90]
    PYTHONPATH=. python benchmarks/sass_scan.py --cuda [--arch 90] [--sass DIR] [--set cuda_CHECKPOINT=4]
                                                [--set cuda_SUMS=4] [--file scan.cu]
    add --cycles to either for the issue model's cycles a loop iteration

With ``--cycles``, each loop also gets the cycles an iteration takes in an issue model of one SM sub-partition
(benchmarks/issue_model.py) running 1, 2 or 4 warps of it, and its bounds (the MUFU pipe's cycles and the issue slots a
warp needs): a way to compare variants of a kernel offline. Checked against the H100 (BENCHMARKS.md): within 3% for
the forward at one warp a sub-partition, 14-18% optimistic with more warps or a large loop, far off for tiles of 4
states a lane.

Triton's own ptxas, cuobjdump and nvdisasm do the work; a stand-in driver answers Triton's questions about the
device (an H100: sm_90; ``--arch 75`` a T4, which the kernels must also compile for), and launches compile without
running. The scan is called on CPU tensors as the model
would call it (u, delta, z of ``--dtype``; B and C slices of one x_proj output), forward and backward, so each kernel is
compiled with the specialisation it gets on the GPU (with no cut into time segments unless the shape asks).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver, jit

from benchmarks.issue_model import issue_cycles, pipe_of
from benchmarks.settings import add_settings_argument, apply_settings

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


class OfflineDriver:
    """Enough of a Triton driver to compile for a CUDA device that is not there (sm_90 unless told)."""

    def __init__(self, arch: int = 90) -> None:
        self.arch = arch

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


LABELS = ("STATE_ONLY", "ADJ_ONLY", "HAS_INIT", "U", "DEPTH", "SUB")


def load_scan(path: str | None):
    """The package's scan module, or another copy of scan.py (a variant under study) loaded as its own module."""
    if path is None:
        from caduceus.ops.triton import scan

        return scan
    spec = importlib.util.spec_from_file_location("scan_variant", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_scan(batch: int, length: int, dim: int, n: int = 16, path: str | None = None,
                 dtype: torch.dtype = torch.bfloat16, settings: list[str] | None = None,
                 arch: int = 90) -> dict[str, object]:
    """The compiled kernels of one forward and backward of the scan, by kernel name and the flags that tell the
    launches of one kernel apart. ``settings``: KEY=VALUE launch settings (see benchmarks/settings.py)."""
    kernels: dict[str, object] = {}
    run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        flags = " ".join(f"{k}={int(kwargs[k])}" for k in LABELS if k in kwargs)
        kernels.setdefault(f"{self.fn.__name__} {flags}".strip(), kernel)
        return kernel

    driver.set_active(OfflineDriver(arch))
    jit.JITFunction.run = compile_only
    try:
        scan = load_scan(path)
        apply_settings(scan, settings or [])
        bc = torch.randn(batch, length, 2 * n + 16, dtype=dtype)
        args = [torch.randn(batch, length, dim, dtype=dtype), torch.randn(batch, length, dim, dtype=dtype),
                -torch.rand(dim, n), bc[..., 16:16 + n], bc[..., 16 + n:], torch.randn(dim),
                torch.randn(batch, length, dim, dtype=dtype), torch.randn(dim)]
        leaves = [a.detach().requires_grad_(True) for a in args]
        scan.selective_scan(*leaves).backward(torch.randn(batch, length, dim, dtype=dtype))
    finally:
        jit.JITFunction.run = run  # the stand-in driver stays: there is no real one to return to
    return kernels


def mufu_stats(ops: list[str]) -> tuple[int, int, int]:
    """Instructions, MUFU operations and the longest run of back-to-back MUFU operations (a long run means a warp
    that waits on the MUFU pipe with nothing else to issue: a warp issues in order)."""
    mufu = [bool(re.search(r"\bMUFU\.", op)) for op in ops]
    run = longest = 0
    for is_mufu in mufu:
        run = run + 1 if is_mufu else 0
        longest = max(longest, run)
    return len(ops), sum(mufu), longest


def loops(sass: str) -> list[tuple[int, tuple[int, int, int], list[tuple[int, tuple[int, int, int]]], list]]:
    """Each innermost loop (a backward branch with no other backward branch inside its body): its first address,
    mufu_stats of its body, the same for each basic block of the body (from one label to the next: the two sides of a
    branch inside the loop, such as the masked and unmasked variants of a piece, are separate blocks), and the body as
    (instruction, upper word) pairs for issue_cycles (``nvdisasm -hex`` prints the words)."""
    words = {int(a, 16): int(w, 16) for a, w in
             re.findall(r"/\*([0-9a-f]{4,})\*/[^\n]*\n\s*/\* (0x[0-9a-f]{16}) \*/", sass)}
    code = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    labels = {name: int(addr, 16) for name, addr in re.findall(r"(\.L_x_\d+):\s*\n\s*/\*([0-9a-f]+)\*/", sass)}
    branches = set()
    for addr, op in code:
        m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", op)
        if m and labels.get(m.group(1), addr + 1) <= addr:
            branches.add((labels[m.group(1)], addr))
    out = []
    for s, e in sorted(branches):
        if any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in branches):
            continue
        cuts = sorted({s, e + 1} | {a for a in labels.values() if s < a <= e})
        blocks = [(lo, mufu_stats([op for a, op in code if lo <= a < hi])) for lo, hi in zip(cuts, cuts[1:])]
        body = [(op, words.get(a, 0)) for a, op in code if s <= a <= e]
        out.append((s, mufu_stats([op for op, _ in body]), blocks, body))
    return out


def report(name: str, cubin: bytes, sass_dir: str | None, ptx: str | None = None, cycles: bool = False) -> None:
    """Registers, spills and the loops' instruction and MUFU counts of one kernel's machine code (with ``cycles``,
    also the issue model's cycles an iteration)."""
    file = re.sub(r"[^A-Za-z0-9_=]+", "_", name)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, file + ".cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-hex", "-c", path], capture_output=True, text=True,
                              check=True).stdout
    if sass_dir:
        os.makedirs(sass_dir, exist_ok=True)
        with open(os.path.join(sass_dir, file + ".sass"), "w") as f:
            f.write(sass)
        if ptx is not None:
            with open(os.path.join(sass_dir, file + ".ptx"), "w") as f:
                f.write(ptx)
    usage = {fn: (regs, stack) for fn, regs, stack in re.findall(r"Function (\w+):\s+REG:(\d+) STACK:(\d+)", usage)}
    parts = re.split(r"\n\s*\.section\s+\.text\.(\w+)[^\n]*", sass)  # one section per kernel of the cubin
    for fn, code in zip(parts[1::2], parts[2::2]):
        regs, stack = usage[fn]
        print(f"{name if len(usage) == 1 else fn}: {regs} registers, stack {stack} bytes")
        for start, (count, mufu, run), blocks, body in loops(code):
            if count >= 40:
                print(f"  loop at {start:#06x}: {count} instructions, {mufu} MUFU (at most {run} in a row)")
                if cycles:
                    model = ", ".join(f"{issue_cycles(body, w):.0f} a warp at {w}" for w in (1, 2, 4))
                    print(f"    issue model, cycles an iteration: {model} warps a sub-partition (bounds a warp: "
                          f"MUFU pipe {pipe_of('MUFU')[1] * mufu}, issue {count})")
                for block, (count, mufu, run) in blocks if len(blocks) > 1 else ():
                    if count >= 40:
                        print(f"    block at {block:#06x}: {count} instructions, {mufu} MUFU (at most {run} in a "
                              "row)")


def report_cuda(arch: int, sass_dir: str | None, cycles: bool = False, path: str | None = None) -> None:
    """The CUDA backend's scan.cu (or another copy of it), compiled by NVRTC (PyTorch's CUDA wheels bring it; on a
    CPU-only machine ``pip install nvidia-cuda-nvrtc``), one cubin holding all its entry points."""
    from pathlib import Path

    from caduceus.ops.cuda.scan import CHECKPOINT, SOURCE, SUMS, compile_cubin

    cubin = compile_cubin(arch, CHECKPOINT, SUMS, Path(path) if path else SOURCE)
    report(f"scan.cu sm_{arch}", cubin, sass_dir, cycles=cycles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    add_settings_argument(parser)
    parser.add_argument("--file", help="compile this copy of scan.py (with --cuda: of scan.cu) instead of the "
                        "package's")
    parser.add_argument("--sass", help="write each kernel's PTX and SASS into this folder")
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90: H100)")
    parser.add_argument("--cuda", action="store_true", help="the CUDA backend's scan.cu (NVRTC) instead")
    parser.add_argument("--cycles", action="store_true", help="each loop's cycles an iteration in the issue model")
    args = parser.parse_args()
    if args.cuda:
        apply_settings(load_scan(None), args.set)  # cuda_CHECKPOINT=8, say
        report_cuda(args.arch, args.sass, args.cycles, args.file)
        return
    kernels = compile_scan(args.batch, args.length, args.dim, path=args.file, dtype=getattr(torch, args.dtype),
                           settings=args.set, arch=args.arch)
    for name, kernel in kernels.items():
        report(name, kernel.asm["cubin"], args.sass, kernel.asm["ptx"], args.cycles)

if __name__ == "__main__":
    main()
