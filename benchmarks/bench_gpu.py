"""GPU benchmarks of the Triton backend: hardware floors, the selective scan alone, and the whole model.

    PYTHONPATH=. python benchmarks/bench_gpu.py [--scan [--shapes 16x131072x512,...]] [--model]
                                                [--sweep [fwd|bwd|cuda]] [--entries 0,4] [--warm]
                                                [--profile] [--baseline old_scan.py] [--cuda]
                                                [--set KEY=VALUE ...] [--json out.json]

Times are medians of ``triton.testing.do_bench``. The floors are measured in the same run: exp2 throughput of a
Triton kernel (4 independent chains per thread) and a device-to-device copy. The scan's exp floor is B*L*D*N exp2
at that rate. Model numbers use fp32 parameters under bf16 autocast, as the upstream measurements did; a training
step is forward, cross-entropy over every position, backward and an AdamW step. ``--baseline`` times another copy
of ``caduceus/ops/triton/scan.py`` (say, the previous commit's, saved outside the package) next to the current one
in the same run: the scan alone, and the 16-layer model at 131,072 bp with that scan as a backend. ``--cuda`` does
the same for the CUDA backend (caduceus/ops/cuda); ``--sweep cuda`` times its settings. ``--set``
changes the current scan's launch settings for the whole run (benchmarks/settings.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import time

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from benchmarks.settings import add_settings_argument, apply_settings
from caduceus import ops
from caduceus.ops import use_backend
from caduceus.ops.testing import scan_inputs
from caduceus.ops.triton import scan as triton_scan

EXP2_ITERS = 512


@triton.jit
def _exp2_kernel(x_ptr, out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(x_ptr + offs)
    b, c, d = a + 0.25, a + 0.5, a + 0.75
    for _ in range(ITERS):
        a, b, c, d = tl.exp2(-a), tl.exp2(-b), tl.exp2(-c), tl.exp2(-d)
    tl.store(out_ptr + offs, a + b + c + d)


def exp2_rate() -> float:
    """exp2 evaluations per second (MUFU throughput as Triton reaches it)."""
    x = torch.rand(1 << 22, device="cuda")
    out = torch.empty_like(x)
    block = 256
    ms = do_bench(lambda: _exp2_kernel[(x.numel() // block,)](x, out, ITERS=EXP2_ITERS, BLOCK=block),
                  return_mode="median")
    return x.numel() * 4 * EXP2_ITERS / (ms * 1e-3)


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


SCAN_SHAPES = [(16, 131072, 512), (1, 131072, 512), (16, 1024, 512), (64, 1024, 512), (8, 1024, 236)]


def scan_args(b: int, length: int, d: int, n: int = 16) -> list[torch.Tensor]:
    """bf16 scan inputs as the model produces them, in selective_scan's argument order."""
    return list(scan_inputs(b, length, d, n_state=n, device="cuda").values())


def host_time(fn, reps: int = 5) -> float:
    """Median ms for ``fn`` to return with the GPU idle before it, its work left queued: the host's share. Close to
    the timed ms, the call is bound by the host's launches rather than by the GPU."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[reps // 2]


def bench_scan(b: int, length: int, d: int, exp_rate: float, bandwidth: float, n: int = 16,
               scan=triton_scan.selective_scan, backward: bool = True) -> dict:
    """Forward (inference, no states saved) and, with ``backward``, forward + backward, against the floors."""
    args = scan_args(b, length, d, n)
    with torch.no_grad():
        fwd = do_bench(lambda: scan(*args), return_mode="median")
        fwd_host = host_time(lambda: scan(*args))
    exp_floor = b * length * d * n / exp_rate * 1e3
    hbm_floor = 2 * b * length * (4 * d + 2 * n) / bandwidth * 1e3
    row = {"shape": [b, length, d], "fwd_ms": fwd, "fwd_host_ms": fwd_host, "exp_floor_ms": exp_floor,
           "hbm_floor_ms": hbm_floor, "fwd_over_exp_floor": fwd / exp_floor}
    if backward:
        leaves = [a.detach().requires_grad_(True) for a in args]
        grad = torch.randn(b, length, d, device="cuda", dtype=args[0].dtype)

        def step() -> None:
            scan(*leaves).backward(grad)

        fwd_bwd = do_bench(step, grad_to_none=leaves, return_mode="median")
        row.update(fwd_bwd_ms=fwd_bwd, bwd_ms=fwd_bwd - fwd, fwd_bwd_over_2x_exp_floor=fwd_bwd / (2 * exp_floor))
    return row


# Changes from the default configuration (the empty entry): the configuration before the ring (2026-12-07, sixth
# session), the one before 2026-12-07 (no per-channel work shared among a channel's lanes, a branch around the state
# store), the same depths and tiles with rows prefetched into registers instead of the shared-memory ring, each switch
# alone (group, pred_store, MUFU), other prefetch depths, the "_idle" tiles of 4 states per lane (twice the warps), and
# time cut into segments up to fewer or more programs.
SWEEP_FWD = [{},
             {"ring": False, "depth": 1, "depth_idle": 3, "BD_idle": 8, "NV_idle": 4},
             {"ring": False, "depth": 1, "depth_idle": 3, "group": False, "pred_store": False},
             {"ring": False},
             {"group": False},
             {"pred_store": False},
             {"mufu": False},
             {"depth": 2},
             {"depth": 4},
             {"depth_idle": 4},
             {"BD_idle": 8, "NV_idle": 4},
             {"programs": 2048},
             {"programs": 8192}]
# The backward: before the ring, the ring for the adjoint walk only (not the adjoint-only pass of time segments), other
# prefetch distances, programs, pieces of 2 steps, no time segments, the channel sums by shuffles, register caps, states
# saved every 128 or 256 steps.
SWEEP_BWD = [{},
             {"ring": False, "ring_adj": False},
             {"ring_adj": False},
             {"prefetch": 1},
             {"prefetch": 4},
             {"programs": 2048},
             {"SUB": 2},
             {"cut_below": 0},
             {"smem_sums": False},
             {"maxnreg": 168},
             {"SUB": 2, "maxnreg": 168, "prefetch": 4},
             {"chunk": 128},
             {"chunk": 256}]


def sweep(exp_rate: float, bandwidth: float, shape: tuple[int, int, int], direction: str,
          entries: list[int] | None = None, warm: bool = False) -> list[dict]:
    """Launch configurations (scan.FWD_CONFIG, scan.BWD_CONFIG) of the forward or the backward at one shape: steps
    per prefetched block U and blocks loaded ahead (with many or few programs) or piece length SUB, L2 prefetch
    distance in pieces, steps between saved states and a register cap, the number of programs that time segments
    make up to, the MUFU log2 and reciprocal on or off. The forward also tries other tiles (channels per program,
    states per thread) and a branch-free loop body. Each entry is a change from the default; the first is the
    default itself. ``entries``: only these (indices); ``warm``: run each once, untimed, to fill Triton's cache
    (compiling dominates a sweep: warm entries in parallel processes, then time them in one)."""
    config, configs = ((triton_scan.FWD_CONFIG, SWEEP_FWD) if direction == "fwd"
                       else (triton_scan.BWD_CONFIG, SWEEP_BWD))
    rows = []
    default = dict(config)
    for index, cfg in enumerate(configs):
        if entries is not None and index not in entries:
            continue
        config.update(default)
        config.update(cfg)
        if warm:  # at most 16,384 steps: the same specialisations (strides, time segments) in less memory
            backward = direction == "bwd"
            args = [a.detach().requires_grad_(backward) for a in scan_args(shape[0], min(shape[1], 1 << 14), shape[2])]
            out = triton_scan.selective_scan(*args)
            if backward:
                out.sum().backward()
            continue
        row = bench_scan(*shape, exp_rate, bandwidth, backward=direction == "bwd")
        row.update(direction=direction, config=dict(config))
        rows.append(row)
        bwd = f", bwd {row['bwd_ms']:.2f} ms" if "bwd_ms" in row else ""
        print(f"  sweep {shape} {direction} {cfg}: fwd {row['fwd_ms']:.3f} ms ({row['fwd_over_exp_floor']:.2f}x){bwd}",
              flush=True)
    config.update(default)
    return rows


# The CUDA backend's settings (caduceus/ops/cuda/scan.py), each a change from its defaults, scan.cu's backward on:
# dB and dC summed over channels 1 or 4 steps at a time, states kept every 16 or 4 steps, and the forward's time
# segments cut for more programs or fewer.
SWEEP_CUDA = [{},
              {"SUMS": 1},
              {"SUMS": 4},
              {"CHECKPOINT": 16},
              {"CHECKPOINT": 16, "SUMS": 1},
              {"CHECKPOINT": 4, "SUMS": 4},
              {"CUT_BELOW": 1024, "PROGRAMS": 2048},
              {"CUT_BELOW": 1024, "PROGRAMS": 8192}]


def sweep_cuda(exp_rate: float, bandwidth: float, shape: tuple[int, int, int],
               entries: list[int] | None = None) -> list[dict]:
    """The CUDA backend's settings (SWEEP_CUDA) at one shape, with scan.cu's backward (BACKWARD = "cuda"), between
    two timings of the Triton scan in the same process: the ratios that decide its defaults."""
    from caduceus.ops.cuda import scan as cuda_scan

    default = {name: getattr(cuda_scan, name) for name in cuda_scan.SETTINGS}

    def triton_row() -> dict:
        row = bench_scan(*shape, exp_rate, bandwidth)
        row.update(direction="cuda", config="triton")
        print(f"  sweep {shape} triton: fwd {row['fwd_ms']:.3f} ms, bwd {row['bwd_ms']:.3f} ms", flush=True)
        return row

    rows = [triton_row()]
    for index, cfg in enumerate(SWEEP_CUDA):
        if entries is not None and index not in entries:
            continue
        for name, value in {**default, "BACKWARD": "cuda", **cfg}.items():
            setattr(cuda_scan, name, value)
        row = bench_scan(*shape, exp_rate, bandwidth, scan=cuda_scan.selective_scan)
        row.update(direction="cuda", config={name: getattr(cuda_scan, name) for name in default})
        rows.append(row)
        print(f"  sweep {shape} cuda {cfg}: fwd {row['fwd_ms']:.3f} ms ({row['fwd_over_exp_floor']:.2f}x), "
              f"bwd {row['bwd_ms']:.3f} ms ({rows[0]['bwd_ms'] / row['bwd_ms']:.3f}x Triton's)", flush=True)
    for name, value in default.items():
        setattr(cuda_scan, name, value)
    return rows + [triton_row()]


def model_config(n_layer: int, d_model: int):
    from caduceus.configuration import CaduceusModelConfig

    return CaduceusModelConfig(d_model=d_model, n_layer=n_layer)


def model_runs(n_layer: int, d_model: int, batch: int, length: int, checkpointing: bool = False):
    """A random model and its two timed functions: an inference forward and a training step."""
    from caduceus.modeling import CaduceusForMaskedLM, masked_lm_loss

    torch.manual_seed(0)
    model = CaduceusForMaskedLM(model_config(n_layer, d_model)).cuda()
    model.caduceus.backbone.gradient_checkpointing = checkpointing
    ids = torch.randint(3, 11, (batch, length), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def infer() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(ids)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = masked_lm_loss(model(ids).logits, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, infer, step


def bench_model(n_layer: int, d_model: int, batch: int, length: int, train: bool, backend: str = "triton",
                checkpointing: bool = False, reps: int = 0) -> dict:
    """Median time of an inference forward or a training step; throughput in tokens (bp) per second."""
    model, infer, step = model_runs(n_layer, d_model, batch, length, checkpointing)
    fn = step if train else infer
    model.train(train)
    torch.cuda.reset_peak_memory_stats()
    with use_backend(backend):
        if reps:  # slow paths: a few plain timed runs (after one warm-up run unless reps < 0: one cold run)
            if reps > 0:
                fn()
            reps = abs(reps)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
            ms = (time.perf_counter() - start) / reps * 1e3
            host_ms = None
        else:
            ms = do_bench(fn, warmup=2, rep=20, return_mode="median")
            host_ms = host_time(fn)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"n_layer": n_layer, "d_model": d_model, "batch": batch, "length": length, "train": train,
            "backend": backend, "checkpointing": checkpointing, "ms": ms, "host_ms": host_ms,
            "tokens_per_s": batch * length / (ms * 1e-3), "peak_gib": peak}


KERNEL_KINDS = [("scan forward", "_scan_fwd"), ("scan backward", "_scan_bwd"), ("scan chaining", "_chain"),
                ("conv", "_conv"), ("RMSNorm", "_rms"), ("matmul", "gemm|nvjet|cutlass|sm90_xmma|ampere|cublas"),
                ("sums", "reduce_kernel"),
                ("copies and elementwise", "elementwise|copy|fill|cat|flip|softmax|cross_entropy|nll|index|adam")]


def kernel_kind(name: str) -> str:
    """Which part of the model a CUDA kernel belongs to, from its name (``KERNEL_KINDS``; else "other")."""
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, name, re.IGNORECASE)), "other")


def profile_model(n_layer: int, d_model: int, batch: int, length: int, train: bool, steps: int = 3) -> dict:
    """CUDA time per call of an inference forward or a training step, split by ``kernel_kind`` (ms), and the 30
    kernels taking the most time, after two untimed calls."""
    model, infer, step = model_runs(n_layer, d_model, batch, length)
    model.train(train)
    fn = step if train else infer
    with use_backend("triton"):
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                fn()
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    kinds: dict[str, float] = {}
    for e in events:
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + e.device_time_total / 1e3 / steps
    top = sorted(events, key=lambda e: -e.device_time_total)[:30]
    row = {"n_layer": n_layer, "d_model": d_model, "batch": batch, "length": length, "train": train,
           "ms_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])), "ms": sum(kinds.values()),
           "kernels": [{"name": e.key, "kind": kernel_kind(e.key), "calls": e.count / steps,
                        "ms": e.device_time_total / 1e3 / steps} for e in top]}
    print("  profile", json.dumps(row), flush=True)
    return row


def load_baseline(path: str):
    """A copy of scan.py loaded as its own module, registered as the backend ``triton-baseline`` (the current conv
    and RMSNorm kernels, that scan)."""
    spec = importlib.util.spec_from_file_location("baseline_scan", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = ops.get_backend("cuda")
    ops.register_backend(dataclasses.replace(current, name="triton-baseline", selective_scan=module.selective_scan))
    return module


def run_models(baseline: bool = False, cuda: bool = False) -> list[dict]:
    """The model plan below; with ``baseline`` only the 16-layer model at 131,072 bp, with the baseline scan and
    the current one; with ``cuda`` only the 131,072-bp and d118 batch-256 rows, on the Triton and CUDA backends in
    turn, twice."""
    rows = []
    plan = [
        dict(n_layer=16, d_model=256, batch=1, length=131072, train=False),
        dict(n_layer=16, d_model=256, batch=1, length=131072, train=True, reps=1),
        # Batched: a batch of 1 leaves the scan 32 (batch, channel block) programs, too few for the SMs, so time is
        # cut into segments and every exp is computed twice; more sequences per call need fewer or no segments.
        dict(n_layer=16, d_model=256, batch=8, length=131072, train=False),
        dict(n_layer=16, d_model=256, batch=2, length=131072, train=True, reps=1),
        dict(n_layer=4, d_model=118, batch=256, length=1024, train=False),
        dict(n_layer=4, d_model=118, batch=256, length=1024, train=True),
        dict(n_layer=16, d_model=256, batch=1, length=1 << 20, train=True, checkpointing=True, reps=-1),
        dict(n_layer=4, d_model=118, batch=8, length=1024, train=True, backend="torch", reps=1),
        dict(n_layer=4, d_model=118, batch=8, length=1024, train=True),
        dict(n_layer=4, d_model=118, batch=8, length=1024, train=False, backend="torch", reps=1),
        dict(n_layer=4, d_model=118, batch=8, length=1024, train=False),
    ]
    if baseline:
        plan = [dict(kw, backend=backend) for kw in plan[:2] for backend in ("triton-baseline", "triton")]
    elif cuda:
        plan = [dict(kw, backend=backend) for kw in plan[:2] + plan[4:6] for backend in ("triton", "cuda") * 2]
    for kw in plan:
        try:
            row = bench_model(**kw)
        except torch.OutOfMemoryError:
            row = {**kw, "oom": True}
            torch.cuda.empty_cache()
        torch.cuda.empty_cache()
        rows.append(row)
        print("  model", json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scan", action="store_true", help="the selective scan alone")
    parser.add_argument("--shapes", default=",".join("x".join(map(str, shape)) for shape in SCAN_SHAPES),
                        help="--scan: these BxLxD shapes")
    parser.add_argument("--model", action="store_true", help="whole-model throughput and memory")
    parser.add_argument("--sweep", nargs="?", const="all", choices=["fwd", "bwd", "all", "cuda"],
                        help="launch configurations of the Triton scan (forward, backward or both) or the CUDA "
                             "backend's settings (cuda)")
    parser.add_argument("--entries", help="--sweep: only these entries of SWEEP_FWD / SWEEP_BWD / SWEEP_CUDA (0,4,5)")
    parser.add_argument("--warm", action="store_true", help="--sweep: run each entry once untimed, then exit")
    parser.add_argument("--profile", action="store_true",
                        help="CUDA time per kind of kernel: the 16-layer model at 131,072 bp, d118 training")
    parser.add_argument("--baseline", help="a copy of scan.py to time next to the current one (scan, model)")
    parser.add_argument("--cuda", action="store_true",
                        help="the CUDA backend (its scan forward in CUDA C++) next to Triton (scan, model)")
    parser.add_argument("--json", help="write every number to this file")
    add_settings_argument(parser)
    args = parser.parse_args()
    apply_settings(triton_scan, args.set)
    baseline = load_baseline(args.baseline) if args.baseline else None
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": time.strftime("%Y-%m-%d"), "settings": args.set}
    report["exp2_per_s"] = exp_rate = exp2_rate()
    report["copy_bytes_per_s"] = bandwidth = copy_bandwidth()
    print(f"{report['device']}: exp2 {exp_rate:.3e}/s, copy {bandwidth / 1e12:.2f} TB/s", flush=True)
    entries = [int(i) for i in args.entries.split(",")] if args.entries else None
    if args.sweep == "cuda":
        report["sweep"] = [row for shape in [(16, 131072, 512), (1, 131072, 512), (64, 1024, 512)]
                           for row in sweep_cuda(exp_rate, bandwidth, shape, entries)]
    elif args.sweep:
        directions = ("fwd", "bwd") if args.sweep == "all" else (args.sweep,)
        report["sweep"] = [row for shape in [(16, 131072, 512), (1, 131072, 512), (256, 1024, 236)]
                           for direction in directions
                           for row in sweep(exp_rate, bandwidth, shape, direction, entries, args.warm)]
        if args.warm:
            return
    if args.profile:
        report["profile"] = [profile_model(16, 256, 1, 131072, train=False), profile_model(16, 256, 1, 131072, True),
                             profile_model(4, 118, 256, 1024, train=True)]
    if args.scan:
        report["scan"] = []
        scans = [("current", triton_scan.selective_scan)]
        if baseline is not None:
            scans.insert(0, ("baseline", baseline.selective_scan))
        if args.cuda:
            from caduceus.ops.cuda import selective_scan as cuda_selective_scan

            scans.append(("cuda", cuda_selective_scan))
        for shape in [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]:
            for name, scan in scans:
                row = bench_scan(*shape, exp_rate, bandwidth, scan=scan)
                row["scan"] = name
                report["scan"].append(row)
                torch.cuda.empty_cache()
                print(f"  scan {shape} {name}: fwd {row['fwd_ms']:.3f} ms ({row['fwd_over_exp_floor']:.2f}x exp floor "
                      f"{row['exp_floor_ms']:.3f}; host {row['fwd_host_ms']:.3f}), fwd+bwd {row['fwd_bwd_ms']:.3f} ms "
                      f"({row['fwd_bwd_over_2x_exp_floor']:.2f}x 2*floor)", flush=True)
    if args.model:
        report["model"] = run_models(baseline is not None, args.cuda)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
