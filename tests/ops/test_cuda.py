"""The CUDA backend (caduceus/ops/cuda). scan.cu's kernel is also compiled for the CPU, with each warp run as 32
threads and host stand-ins for the warp primitives, cp.async and the PTX math, so that its index arithmetic (walk
blocks, reverse walks, time segments, the saved states) is checked wherever g++ is; the rest needs a GPU."""

from __future__ import annotations

import ctypes
import functools
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from caduceus import ops
from caduceus.ops.reference import selective_scan_reference
from caduceus.ops.testing import TOLERANCE, relative_error, scan_errors, scan_inputs, training_errors
from tests.ops.checks import poison

SCAN_CU = Path(ops.__file__).parent / "cuda" / "scan.cu"
CHUNK = 64

HOST = r"""
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstring>
#define CADUCEUS_SCAN_HOST
#define CHUNK %(chunk)d
#define GRAD_CHECKPOINT %(checkpoint)d
#define GRAD_SUMS %(sums)d
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
struct uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
struct dim3 { int x, y, z; };
thread_local dim3 threadIdx, blockIdx, gridDim;
using std::min;
static std::barrier<>* warp;
static float lanes[32];
inline void __syncwarp() { warp->arrive_and_wait(); }
inline float __shfl_sync(unsigned, float v, int src) {
    lanes[threadIdx.x] = v; warp->arrive_and_wait(); float r = lanes[src]; warp->arrive_and_wait(); return r; }
inline float __shfl_xor_sync(unsigned mask, float v, int x) { return __shfl_sync(mask, v, threadIdx.x ^ x); }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float ex2(float x) { return std::exp2(x); }
inline float lg2(float x) { return std::log2(x); }
inline float rcp(float x) { return 1.f / x; }
inline unsigned short to_bf(float x) {  // round to nearest even, as cvt.rn.bf16.f32
    unsigned u; std::memcpy(&u, &x, 4); return (u + 0x7fff + ((u >> 16) & 1)) >> 16; }
inline void cp16(void* dst, const void* src, int bytes) {
    if (bytes) std::memcpy(dst, src, 16); else std::memset(dst, 0, 16); }
inline void cp_commit() {}
template <int P> inline void cp_wait() {}
#include "%(source)s"
#include <thread>
#include <vector>
template <class F>
void grid(int blocks, int batch, int n_seg, F body) {  // one warp (32 threads) at a time
    std::barrier<> b(32);
    warp = &b;
    for (int bz = 0; bz < n_seg; ++bz) for (int by = 0; by < batch; ++by) for (int bx = 0; bx < blocks; ++bx) {
        std::vector<std::thread> threads;
        for (int lane = 0; lane < 32; ++lane) threads.emplace_back([=] {
            threadIdx.x = lane; blockIdx = {bx, by, bz}; gridDim.z = n_seg;
            body();
        });
        for (auto& t : threads) t.join();
    }
}
#define ENTRY(name, rev, state_only) extern "C" void name(SCAN_ARGS, int batch, int n_seg) { \
    grid(D / 16, batch, n_seg, [=] { scan_fwd<SCAN_TILES, rev, state_only>(SCAN_CALL); }); }
SCAN_ENTRY_POINTS(ENTRY)
#define GRAD_ENTRY(name, rev, adj_only) extern "C" void name(GRAD_ARGS, int batch, int n_seg) { \
    grid(D / 16, batch, n_seg, [=] { scan_bwd<rev, adj_only>(GRAD_CALL); }); }
GRAD_ENTRY_POINTS(GRAD_ENTRY)
"""


@pytest.fixture(scope="module")
def host_build(tmp_path_factory) -> Callable[..., ctypes.CDLL]:
    """scan.cu compiled for the CPU, by the backward's checkpoint spacing and channel-sum grouping (scan.CHECKPOINT,
    scan.SUMS), each built once."""
    if shutil.which("g++") is None:
        pytest.skip("compiling scan.cu for the CPU needs g++")
    tmp = tmp_path_factory.mktemp("scan_cu")
    (tmp / "barrier.cpp").write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    if subprocess.run(["g++", "-std=c++20", "-o", tmp / "barrier", tmp / "barrier.cpp"]).returncode != 0:
        pytest.skip("this g++ has no C++20 std::barrier (GCC 11 or newer has)")

    @functools.cache
    def build(checkpoint: int, sums: int = 1) -> ctypes.CDLL:
        source, library = tmp / f"host{checkpoint}_{sums}.cpp", tmp / f"host{checkpoint}_{sums}.so"
        source.write_text(HOST % {"chunk": CHUNK, "checkpoint": checkpoint, "sums": sums, "source": SCAN_CU})
        # -fno-gnu-unique: else the dynamic linker makes every build share the first one's function-local statics
        # (the shared-memory arrays), whose sizes differ between builds
        subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-fno-gnu-unique", "-o", library, source,
                        "-lpthread"], check=True)
        return ctypes.CDLL(str(library))

    return build


@pytest.fixture(scope="module")
def host_kernels(host_build) -> ctypes.CDLL:
    return host_build(4)


def bf16_inputs(batch: int, length: int, dim: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """scan_inputs in bf16 (B and C rows 16-byte aligned, as cp.async needs) with a softplus input past its
    threshold of 20 in a few places."""
    inputs = scan_inputs(batch, length, dim, device=device, seed=batch * 1000 + length + dim)
    inputs["delta"][0, length // 2, :3] = 30.0
    return inputs


def states_reference(u, delta, A, B, bias, reverse: bool) -> torch.Tensor:
    """The state before every CHUNK-th walk step (b, chunks, d, n), float64: what the Triton backward reads."""
    delta = delta.double() + bias.double()
    dt = torch.where(delta > 20, delta, torch.nn.functional.softplus(delta))
    h = torch.zeros(u.shape[0], u.shape[2], A.shape[1], dtype=torch.float64)
    saved = []
    for walk in range(u.shape[1]):
        if walk % CHUNK == 0:
            saved.append(h.clone())
        t = u.shape[1] - 1 - walk if reverse else walk
        drive = (dt[:, t] * u[:, t].double())[..., None] * B[:, t, None, :].double()
        h = torch.exp(dt[:, t, :, None] * A.double()) * h + drive
    return torch.stack(saved, 1)


def chain_reference(seg_state: torch.Tensor, seg_dt: torch.Tensor, A: torch.Tensor,
                    reverse: bool = False) -> torch.Tensor:
    """What each segment receives, as triton_scan._chain_segments: in walk order r[k + 1] = exp(A * seg_dt[k]) r[k] +
    seg_state[k], r[0] = 0; with ``reverse`` (the backward's adjoints) passed from the last segment to the first."""
    if reverse:
        return chain_reference(seg_state.flip(1), seg_dt.flip(1), A).flip(1)
    recv = torch.zeros_like(seg_state)
    for k in range(1, seg_state.shape[1]):
        recv[:, k] = torch.exp(seg_dt[:, k - 1, :, None] * A) * recv[:, k - 1] + seg_state[:, k - 1]
    return recv


def pointers(*ts: torch.Tensor | None) -> list[ctypes.c_void_p]:
    return [ctypes.c_void_p(0 if t is None else t.data_ptr()) for t in ts]


def sizes(length: int, dim: int, B: torch.Tensor, C: torch.Tensor) -> list:
    """What every scan.cu kernel takes after its tensors, as scan.py's _rows packs it."""
    strides = (*B.stride()[:2], *C.stride()[:2])
    return [ctypes.c_int(length), ctypes.c_int(dim)] + [ctypes.c_longlong(s) for s in strides]


@pytest.mark.parametrize("reverse", [False, True])
# one segment with a part block at the walk's end; 13 segments of one block; 5 segments of three blocks
@pytest.mark.parametrize(("batch", "length", "dim", "seg_blocks"), [(2, 37, 32, 99), (1, 200, 16, 1),
                                                                    (1, 200, 32, 3)])
def test_scan_cu_on_the_cpu(host_kernels, reverse, batch, length, dim, seg_blocks) -> None:
    xs = list(bf16_inputs(batch, length, dim).values())
    u, delta, A, B, C, D, z, bias = xs
    blocks = -(-length // 16)
    n_seg = -(-blocks // seg_blocks)
    out = torch.full_like(u, float("nan"))
    states = torch.full((batch, -(-length // CHUNK), dim, 16), float("nan"))
    seg_state, seg_dt = torch.full((batch, n_seg, dim, 16), float("nan")), torch.full((batch, n_seg, dim), 0.0)

    def run(name: str, seg_state=None, seg_dt=None, init=None, saved=None) -> None:
        getattr(host_kernels, name)(*pointers(*xs, out), *sizes(length, dim, B, C), ctypes.c_int(seg_blocks),
                                    *pointers(seg_state, seg_dt, init, saved), ctypes.c_int(batch),
                                    ctypes.c_int(n_seg))

    direction = "rev" if reverse else "fwd"
    init = None
    if n_seg > 1:
        run(f"scan_{direction}_state", seg_state, seg_dt)
        init = chain_reference(seg_state, seg_dt, A)
    run(f"scan_{direction}", init=init, saved=states)
    expected = selective_scan_reference(*(x.double() for x in xs), delta_softplus=True, reverse=reverse)
    assert relative_error(out, expected) < TOLERANCE[torch.bfloat16]
    assert relative_error(states, states_reference(u, delta, A, B, bias, reverse)) < 1e-5


# each checkpoint spacing and channel-sum grouping (scan.CHECKPOINT, scan.SUMS)
@pytest.mark.parametrize(("checkpoint", "sums"), [(4, 1), (8, 1), (8, 2), (4, 4), (16, 1), (16, 2)])
@pytest.mark.parametrize("reverse", [False, True])
# one segment with a part chunk and a part piece at the walk's end; 5 segments of one chunk; 2 segments of two chunks,
# the last with a part piece
@pytest.mark.parametrize(("batch", "length", "dim", "seg_len"), [(2, 37, 32, 64), (1, 300, 16, 64),
                                                                 (1, 203, 32, 128)])
def test_grad_cu_on_the_cpu(host_build, checkpoint, sums, reverse, batch, length, dim, seg_len) -> None:
    """scan.cu's backward fed the states the forward saves (from states_reference here), against the float64
    reference's gradients; with several segments, the adjoint pass and the chaining (chain_reference, walked from the
    last segment) first."""
    host_kernels = host_build(checkpoint, sums)
    inputs = bf16_inputs(batch, length, dim)
    xs = list(inputs.values())
    u, delta, A, B, C, D, z, bias = xs
    dout = torch.randn(batch, length, dim).to(torch.bfloat16)
    states = states_reference(u, delta, A, B, bias, reverse).float()
    n_seg, blocks = -(-length // seg_len), dim // 16
    du, ddelta, dz = (torch.full_like(u, float("nan")) for _ in range(3))
    dA = torch.full((batch, n_seg, dim, 16), float("nan"))
    dD, dbias = torch.full((batch, n_seg, dim), float("nan")), torch.full((batch, n_seg, dim), float("nan"))
    dBC = torch.full((batch, blocks, length, 32), float("nan"))
    seg_adj, seg_dt = torch.full((batch, n_seg, dim, 16), float("nan")), torch.full((batch, n_seg, dim), float("nan"))

    def run(name: str, init: torch.Tensor | None) -> None:
        outputs = pointers(seg_adj, seg_dt, du, ddelta, dz, dA, dD, dbias, dBC)
        getattr(host_kernels, name)(*pointers(*xs, dout, states, init), *sizes(length, dim, B, C),
                                    ctypes.c_int(seg_len), *outputs, ctypes.c_int(batch), ctypes.c_int(n_seg))

    direction = "rev" if reverse else "fwd"
    init = None
    if n_seg > 1:
        run(f"grad_{direction}_adjoint", None)
        init = chain_reference(seg_adj, seg_dt, A, reverse=True)
    run(f"grad_{direction}", init)
    leaves = [x.double().requires_grad_() for x in xs]
    selective_scan_reference(*leaves, delta_softplus=True, reverse=reverse).backward(dout.double())
    dBC = dBC.sum(1)
    got = {"du": du, "ddelta": ddelta, "dA": dA.sum((0, 1)), "dB": dBC[..., :16], "dC": dBC[..., 16:],
           "dD": dD.sum((0, 1)), "dz": dz, "ddelta_bias": dbias.sum((0, 1))}
    errors = {name: relative_error(got[name], leaf.grad) for name, leaf in zip(got, leaves)}
    assert max(errors.values()) < TOLERANCE[torch.bfloat16], errors


def signature(macro: str) -> list[type]:
    """The ctypes types of one of scan.cu's argument lists (SCAN_ARGS, GRAD_ARGS)."""
    text = re.search(rf"#define {macro} (.*?)\n#define", SCAN_CU.read_text(), re.S).group(1).replace("\\\n", " ")
    return [ctypes.c_void_p if "*" in arg else ctypes.c_longlong if "long long" in arg else ctypes.c_int
            for arg in text.split(",")]


class HostDriver:
    """Stands in for libcuda under caduceus.ops.cuda.scan: cuLaunchKernel reads the arguments scan.py packed, by the
    kernel's argument list in scan.cu, and runs the CPU build of that kernel on them."""

    def __init__(self, host: ctypes.CDLL) -> None:
        self.host, self.launches = host, []

    def cuCtxGetCurrent(self, ref) -> int:  # noqa: N802 (the driver's names)
        ref._obj.value = 1  # the stand-in primary context's handle: already current
        return 0

    def cuLaunchKernel(self, name, blocks, batch, n_seg, *rest) -> int:  # noqa: N802
        args = rest[-2]
        types = signature("SCAN_ARGS" if name.startswith("scan_") else "GRAD_ARGS")
        getattr(self.host, name)(*(kind.from_address(args[i]) for i, kind in enumerate(types)), ctypes.c_int(batch),
                                 ctypes.c_int(n_seg))
        self.launches.append(name)
        return 0


@pytest.mark.parametrize("reverse", [False, True])
# both walks cut into time segments, the last one short: the forward's of 4 and 3 16-step blocks (PROGRAMS 24: 5 and
# 21 segments), the backward's of one 64-step chunk (5 and 16)
@pytest.mark.parametrize(("batch", "length", "dim", "checkpoint"), [(2, 300, 32, 4), (1, 1000, 16, 8)])
def test_backend_on_the_cpu(host_build, monkeypatch, reverse, batch, length, dim, checkpoint) -> None:
    """CudaSelectiveScanFn as the GPU runs it, every launch going to the CPU build of its kernel through HostDriver
    and the chaining of segments to chain_reference: scan.py's argument packing, segment plans and gradient sums
    against the float64 reference."""
    pytest.importorskip("caduceus.ops.cuda", reason="the CUDA backend's module needs Triton and NVRTC",
                        exc_type=ImportError)
    from caduceus.ops.cuda import scan

    driver = HostDriver(host_build(checkpoint))
    monkeypatch.setattr(scan, "CHECKPOINT", checkpoint)
    monkeypatch.setattr(scan, "_driver", lambda: driver)
    monkeypatch.setattr(scan, "_primary_context", lambda index: ctypes.c_void_p(1))
    monkeypatch.setattr(scan, "_kernels", lambda index, checkpoint, sums: {name: name for name in scan.KERNELS})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))

    monkeypatch.setattr(scan.triton_scan, "_chain_segments", chain_reference)
    monkeypatch.setattr(scan, "BACKWARD", "cuda")
    monkeypatch.setattr(scan, "PROGRAMS", 24)

    def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
        return scan.CudaSelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, True)

    errors = scan_errors(selective_scan, bf16_inputs(batch, length, dim), reverse)
    assert max(errors.values()) < TOLERANCE[torch.bfloat16], errors
    direction = "rev" if reverse else "fwd"
    assert driver.launches == [f"scan_{direction}_state", f"scan_{direction}", f"grad_{direction}_adjoint",
                               f"grad_{direction}"]


gpu = pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in ops.available_backends(),
                         reason="the CUDA backend needs a CUDA GPU, Triton and NVRTC")


@gpu
def test_opt_in() -> None:
    assert ops.get_backend("cuda").name == "triton"
    with ops.use_backend("cuda"):
        assert ops.get_backend("cuda").name == "cuda"


@gpu
@pytest.mark.parametrize("backward", ["cuda", "triton"])
@pytest.mark.parametrize("reverse", [False, True])
# The forward cuts (1, 3000, 64) and (16, 700, 32) into time segments, not (64, 300, 256) (512 programs); the backward
# cuts all but (1, 1, 16) and (3, 37, 32), which are one chunk.
@pytest.mark.parametrize(("batch", "length", "dim"), [(1, 1, 16), (3, 37, 32), (2, 1000, 64), (1, 3000, 64),
                                                      (16, 700, 32), (64, 300, 256)])
def test_selective_scan(backward, reverse, batch, length, dim, monkeypatch) -> None:
    """Forward and every gradient against the float64 reference (bf16 bounds), with scan.cu's backward or the Triton
    one fed the states scan.cu saves."""
    from caduceus.ops.cuda import scan, selective_scan

    monkeypatch.setattr(scan, "BACKWARD", backward)

    errors = scan_errors(selective_scan, bf16_inputs(batch, length, dim, "cuda"), reverse, before=poison)
    assert max(errors.values()) < TOLERANCE[torch.bfloat16], errors


@gpu
def test_misaligned_rows() -> None:
    """Contiguous views 2 bytes off a 16-byte boundary (cp.async copies 16 aligned bytes) are copied first."""
    from caduceus.ops.cuda import selective_scan

    xs = list(bf16_inputs(2, 300, 64, "cuda").values())
    for i in (0, 1, 6):
        flat = torch.empty(xs[i].numel() + 1, dtype=xs[i].dtype, device="cuda")
        xs[i] = flat[1:].view(xs[i].shape).copy_(xs[i])
        assert xs[i].data_ptr() % 16 != 0
    expected = selective_scan_reference(*(x.double() for x in xs), delta_softplus=True)
    assert relative_error(selective_scan(*xs), expected) < TOLERANCE[torch.bfloat16]


@gpu
def test_other_calls_go_to_triton() -> None:
    """fp32 inputs are not scan.cu's: the Triton kernels compute them, bit for bit."""
    from caduceus.ops.cuda import selective_scan
    from caduceus.ops.triton import selective_scan as triton_selective_scan

    xs = [x.float() for x in bf16_inputs(2, 300, 64, "cuda").values()]
    assert torch.equal(selective_scan(*xs), triton_selective_scan(*xs))


@gpu
@pytest.mark.parametrize("backward", ["cuda", "triton"])
def test_model_trains_as_on_triton(backward, monkeypatch) -> None:
    """A bf16 d_model 118 model (channels padded to 240): logits and every gradient as on the Triton backend, with
    either backward."""
    from caduceus.configuration import CaduceusModelConfig
    from caduceus.modeling import CaduceusForMaskedLM
    from caduceus.ops.cuda import scan

    monkeypatch.setattr(scan, "BACKWARD", backward)

    torch.manual_seed(0)
    model = CaduceusForMaskedLM(CaduceusModelConfig(d_model=118, n_layer=2))
    ids = torch.randint(3, 11, (4, 1000), device="cuda")
    errors = training_errors(model, ids, "cuda", torch.bfloat16, "triton", torch.bfloat16, before=poison)
    for name, error in errors.items():
        assert error < TOLERANCE[torch.bfloat16], name
