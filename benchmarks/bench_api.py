"""Embeddings per second through the Helical-style API: 1,024-bp sequences, the d118 4-layer model, batch 8,
with and without ``rc="average"``.

Run: ``python benchmarks/bench_api.py [--device cpu] [--sequences 32] [--repeats 5] [--rcps]``.
Prints a markdown table for BENCHMARKS.md. The model has the published d118 architecture with random
weights (no download needed; speed does not depend on the weight values).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from caduceus import Caduceus, CaduceusConfig, CaduceusForMaskedLM, CaduceusModelConfig


def cpu_name() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rcps", action="store_true", help="the PS (RC-equivariant) architecture instead of Ph")
    args = parser.parse_args()

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    sequences = ["".join(rng.choice(list("ACGT"), 1024)) for _ in range(args.sequences)]
    variant = "ps" if args.rcps else "ph"
    with tempfile.TemporaryDirectory() as tmp:
        # named like the published repo, so that the API knows its 1,024-bp input size
        model_dir = Path(tmp) / f"caduceus-{variant}_seqlen-1k_d_model-118_n_layer-4_lr-8e-3"
        CaduceusForMaskedLM(CaduceusModelConfig(d_model=118, n_layer=4, rcps=args.rcps)).save_pretrained(model_dir)
        model = Caduceus(CaduceusConfig(model_name=model_dir, batch_size=8, device=args.device, progress=False))
        dataset = model.process_data(sequences)
        print(f"device: {model.device} ({cpu_name() if model.device == 'cpu' else torch.cuda.get_device_name()}), "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"load average before: {os.getloadavg()[0]:.1f}")
        print("| model | rc | embeddings/s (1,024 bp, batch 8) | s per batch |")
        print("| --- | --- | --- | --- |")
        modes = ("none", "average")
        for rc in modes:  # warm-up
            model.get_embeddings(model.process_data(sequences[:8]), rc=rc)
        # interleaved repeats, best of each: robust to other processes' load on a shared machine
        times = {rc: [] for rc in modes}
        for _ in range(args.repeats):
            for rc in modes:
                times[rc].append(_timed(model.get_embeddings, dataset, rc=rc))
        for rc in modes:
            rate = len(sequences) / min(times[rc])
            print(f"| {variant.upper()} d118, 4 layers | {rc} | {rate:.1f} | {8 / rate:.3f} |")
        print(f"load average after: {os.getloadavg()[0]:.1f}")


def _timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
