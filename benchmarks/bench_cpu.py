"""CPU figures of the core issue: scan throughput, end-to-end speed and long-input memory.

Run: ``python benchmarks/bench_cpu.py`` (add ``--quick`` to skip the 131,072-bp model pass). Prints a
markdown table for BENCHMARKS.md. Throughput is state updates per second, B·L·D·N / time, with two loops
measured in the same run for the ratios: the literal reference (``ops/reference.py``: one step at a time,
decays computed per step) and the structure of mamba_ssm's CPU fallback (all decays precomputed as a
(B, D, L, N) tensor). Both on a shorter L where their autograd would not fit in memory (their rate per
update does not depend on L).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time

import torch

from caduceus.ops import cpu, reference

N_STATE = 16


def scan_inputs(batch: int, length: int, dim: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return dict(
        u=torch.randn(batch, length, dim, generator=g), delta=torch.randn(batch, length, dim, generator=g) - 2,
        A=-torch.rand(dim, N_STATE, generator=g) * 4, B=torch.randn(batch, length, N_STATE, generator=g),
        C=torch.randn(batch, length, N_STATE, generator=g), D=torch.randn(dim, generator=g),
        z=torch.randn(batch, length, dim, generator=g), delta_bias=torch.randn(dim, generator=g) * 0.1,
    )


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (numba compiles on first call)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def scan_rate(scan, inputs: dict[str, torch.Tensor], backward: bool, repeats: int) -> float:
    """Updates per second of ``scan`` (forward, or forward + backward)."""
    batch, length, dim = inputs["u"].shape

    def step():
        if not backward:
            with torch.no_grad():
                scan(**inputs)
            return
        leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
        scan(**leaves).sum().backward()

    return batch * length * dim * N_STATE / best_time(step, repeats)


def precomputed_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True):
    """The structure of mamba_ssm's ``selective_scan_ref`` (its CPU fallback): every decay and drive precomputed as
    (B, D, L, N) tensors in the (b, d, l) layout, then a loop over L. Same function as ``reference``."""
    u, delta, z = (t.transpose(1, 2) for t in (u, delta, z))  # (b, d, l)
    delta = torch.nn.functional.softplus(delta + delta_bias[:, None]) if delta_softplus else delta
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    drive = torch.einsum("bdl,bln,bdl->bdln", delta, B, u)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        state = decay[:, :, i] * state + drive[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", state, C[:, i]))
    y = torch.stack(ys, dim=2) + u * D[:, None]
    return (y * torch.nn.functional.silu(z)).transpose(1, 2)


def scan_table(quick: bool) -> list[str]:
    rows = ["| shape (B, L, D) | pass | numba | PyTorch loop | literal reference | precomputed reference "
            "| numba / literal | numba / precomputed |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    numba_module = cpu.scan_numba
    for batch, length, dim in [(8, 1024, 236), (1, 131072, 512)]:
        inputs = scan_inputs(batch, length, dim)
        short = scan_inputs(batch, min(length, 2048 if length > 2048 else length), dim)
        for backward in (False, True):
            repeats = 1 if length > 2048 else 3
            # best of 10 (3) for our forward: a call takes milliseconds (a second) and this VM's speed drifts by 30 %
            fast = scan_rate(cpu.selective_scan, inputs, backward, repeats if backward else 3 * repeats + 1)
            cpu.scan_numba = None
            loop = scan_rate(cpu.selective_scan, short if quick else inputs, backward, repeats)
            cpu.scan_numba = numba_module
            slow_repeats = 1 if backward else 3  # their fwd+bwd takes seconds to minutes
            literal = scan_rate(reference.selective_scan_reference, short, backward, slow_repeats)
            precomputed = scan_rate(precomputed_reference, short, backward, slow_repeats)
            rows.append(f"| {batch}, {length:,}, {dim} | {'fwd+bwd' if backward else 'fwd'} | {fast / 1e9:.2f} G/s"
                        f" | {loop / 1e9:.2f} G/s | {literal / 1e9:.2g} G/s | {precomputed / 1e9:.2g} G/s"
                        f" | {fast / literal:.0f}× | {fast / precomputed:.0f}× |")
    return rows


def end_to_end() -> str:
    from caduceus import CaduceusForMaskedLM, CaduceusModelConfig

    model = CaduceusForMaskedLM(CaduceusModelConfig(d_model=118, n_layer=4)).eval()
    ids = torch.randint(7, 11, (8, 1024))
    with torch.inference_mode():
        seconds = best_time(lambda: model(ids), 3)
    return f"| 4 layers, d_model 118, batch 8 × 1,024 bp, one strand | {8 / seconds:.1f} sequences/s |"


LONG_CHILD = """
import resource, time, torch
from caduceus import CaduceusForMaskedLM, CaduceusModelConfig
model = CaduceusForMaskedLM(CaduceusModelConfig(d_model=256, n_layer=16)).eval()
ids = torch.randint(7, 11, (1, 131072))
start = time.perf_counter()
with torch.inference_mode():
    logits = model(ids).logits
assert torch.isfinite(logits).all()
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def long_input() -> str:
    """Peak resident memory of the whole process, measured in a fresh child."""
    output = subprocess.run([sys.executable, "-c", LONG_CHILD], capture_output=True, text=True, check=True).stdout
    seconds, max_rss_kib = output.split()
    return (f"| 16 layers, d_model 256, 1 × 131,072 bp forward | {float(seconds):.0f} s, "
            f"peak RSS {int(max_rss_kib) / 1024**2:.2f} GiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="skip the 131,072-bp model pass")
    args = parser.parse_args()
    cpu_name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
                    platform.processor())
    print(f"Machine: {cpu_name}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("\n".join(scan_table(args.quick)))
    print("\n| end to end | result |\n| --- | --- |")
    print(end_to_end())
    if not args.quick:
        print(long_input())


if __name__ == "__main__":
    main()
