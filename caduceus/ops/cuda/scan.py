"""The selective scan as CUDA kernels (``scan.cu``) compiled at run time with NVRTC, for bf16 inputs on sm_80 or
newer: the forward, and a backward that is opt-in (``BACKWARD = "cuda"``) until it is measured faster than the Triton
one, which the default feeds the states this forward saves in its layout. The time segments of both are chained by
the Triton chaining kernel.

NVRTC comes with PyTorch's CUDA wheels (the ``nvidia`` packages beside torch) or with a CUDA toolkit; the kernel is
compiled once per GPU architecture and process (about a second) and launched through the driver API with ctypes, so
the backend needs no package beyond PyTorch and Triton. Calls it does not cover (other dtypes, no D / z / bias,
no softplus, N != 16, channels not a multiple of 16, older GPUs) go to the Triton kernels unchanged.
"""

from __future__ import annotations

import ctypes
import functools
import glob
from pathlib import Path

import torch

from caduceus.ops import needs_grad
from caduceus.ops.triton import scan as triton_scan

SOURCE = Path(__file__).with_name("scan.cu")
CHANNELS, STEPS, STATES = 16, 16, 16  # a program's channels and steps per block (scan.cu: CH, T), and N
CHUNK = 64  # scan.cu saves the state every CHUNK walk steps; the Triton backward must read them at that spacing
# Time is cut into segments (two launches and the Triton chaining kernel between them) when fewer than CUT_BELOW
# programs (batch rows x channel blocks) would run, into enough segments to make about PROGRAMS.
CUT_BELOW, PROGRAMS = 512, 4096
# The backward's segments (whole chunks), the same way; which backward runs: "triton" or "cuda" (scan.cu's, which
# measured 0.85-0.90x the Triton backward's speed on an H100; BENCHMARKS.md).
BWD_CUT_BELOW, BWD_PROGRAMS = 2048, 4096
BACKWARD = "triton"
# scan.cu's backward keeps the state before every CHECKPOINT-th step of a chunk in shared memory: 8 (8 KB a warp), 4
# (16 KB: fewer warps an SM, for 4 steps less recompute every 8) or 16 (4 KB: 10 warps an SM on an H100 against 8 at
# SUMS = 2, for 1.5 steps of recompute a step against 0.5). On an H100, 4 measured no faster than 8 anywhere (10%
# slower at 64 x 1,024) and 16 13-30% slower everywhere (BENCHMARKS.md).
CHECKPOINT = 8
# scan.cu's backward sums dB and dC over its channels SUMS steps at a time (1, 2 or 4): fewer barriers between steps
# for 2.3 KB more shared memory a warp per step; 2 measured 2-5% faster than 1 on an H100, 4 slower than both.
SUMS = 2
# The settings above, by name: those the benchmarks may change for one run (benchmarks/settings.py).
SETTINGS = ("CUT_BELOW", "PROGRAMS", "BWD_CUT_BELOW", "BWD_PROGRAMS", "BACKWARD", "CHECKPOINT", "SUMS")
KERNELS = ("scan_fwd", "scan_rev", "scan_fwd_state", "scan_rev_state", "grad_fwd", "grad_rev", "grad_fwd_adjoint",
           "grad_rev_adjoint")


def nvrtc_path() -> str | None:
    """The NVRTC library of PyTorch's CUDA wheels, else one the loader finds by name (a CUDA toolkit)."""
    wheels = sorted(glob.glob(str(Path(torch.__file__).parent.parent / "nvidia" / "*" / "lib" / "libnvrtc.so*")))
    wheels = [path for path in wheels if "builtins" not in path]
    if wheels:
        return wheels[0]
    major = (torch.version.cuda or "").split(".")[0]
    for name in (f"libnvrtc.so.{major}", "libnvrtc.so"):
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    return None


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with CUDA status {status}")


@functools.cache
def compile_cubin(arch: int, checkpoint: int, sums: int, source: Path = SOURCE) -> bytes:
    """scan.cu (or another copy of it, ``source``: a variant under study) as machine code for sm_<arch> (e.g. 90), its
    backward keeping a state every ``checkpoint`` steps and summing dB and dC over channels ``sums`` steps at a time."""
    path = nvrtc_path()
    if path is None:
        raise RuntimeError("the CUDA scan backend needs NVRTC (libnvrtc), which came with neither PyTorch nor CUDA")
    nvrtc = ctypes.CDLL(path)
    prog = ctypes.c_void_p()
    _check(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.read_bytes(), b"scan.cu", 0, None, None),
           "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture=sm_{arch}".encode(), b"-std=c++17", b"-default-device", b"--ftz=true",
                f"-DCHUNK={CHUNK}".encode(), f"-DGRAD_CHECKPOINT={checkpoint}".encode(),
                f"-DGRAD_SUMS={sums}".encode()]
        status = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if status != 0:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC could not compile {source} for sm_{arch}:\n{log.value.decode()}")
        size = ctypes.c_size_t()
        _check(nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin.raw
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


@functools.cache
def _primary_context(device_index: int) -> ctypes.c_void_p:
    """The device's primary context: the one PyTorch's runtime calls use."""
    torch.cuda.init()
    device, context = ctypes.c_int(), ctypes.c_void_p()
    _check(_driver().cuDeviceGet(ctypes.byref(device), device_index), "cuDeviceGet")
    _check(_driver().cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuDevicePrimaryCtxRetain")
    return context


def _make_current(device_index: int) -> ctypes.c_void_p | None:
    """Makes the device's primary context current on this thread for the driver calls (the autograd engine runs the
    backward on a thread of its own, where PyTorch's runtime calls may not have made any context current yet); returns
    the other context that was current, if one was, for the caller to restore."""
    current = ctypes.c_void_p()
    _check(_driver().cuCtxGetCurrent(ctypes.byref(current)), "cuCtxGetCurrent")
    primary = _primary_context(device_index)
    if current.value == primary.value:
        return None
    _check(_driver().cuCtxSetCurrent(primary), "cuCtxSetCurrent")
    return current if current.value else None


@functools.cache
def _kernels(device_index: int, checkpoint: int, sums: int) -> dict[str, ctypes.c_void_p]:
    """scan.cu's entry points (KERNELS) compiled with ``checkpoint`` and ``sums``, loaded into the device's primary
    context (PyTorch's; _launch has made it current)."""
    with torch.cuda.device(device_index):
        major, minor = torch.cuda.get_device_capability(device_index)
        cuda = _driver()
        module = ctypes.c_void_p()
        _check(cuda.cuModuleLoadData(ctypes.byref(module), compile_cubin(10 * major + minor, checkpoint, sums)),
               "cuModuleLoadData")
        kernels = {}
        for name in KERNELS:
            fn = ctypes.c_void_p()
            _check(cuda.cuModuleGetFunction(ctypes.byref(fn), module, name.encode()), f"cuModuleGetFunction {name}")
            kernels[name] = fn
        return kernels


@functools.cache
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def supports(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> bool:
    """Whether scan.cu covers this call (else the Triton kernels take it)."""
    if D is None or z is None or delta_bias is None or not delta_softplus or not u.is_cuda:
        return False
    if any(t.dtype != torch.bfloat16 for t in (u, delta, B, C, z)):
        return False
    return (A.shape[1] == STATES and u.shape[-1] % CHANNELS == 0 and u.numel() > 0
            and triton_scan.BWD_CONFIG["chunk"] == CHUNK and torch.cuda.get_device_capability(u.device) >= (8, 0))


def _launch(name: str, grid: tuple[int, int, int], args: list) -> None:
    """scan.cu's kernel ``name`` on the current stream, one warp per block: ``args`` in its order, tensors (None: a
    null pointer) and ctypes scalars."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    device = tensors[0].device
    values = [a if isinstance(a, ctypes._SimpleCData) else ctypes.c_void_p(0 if a is None else a.data_ptr())
              for a in args]
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
    index = device.index if device.index is not None else torch.cuda.current_device()
    previous = _make_current(index)
    kernel = _kernels(index, CHECKPOINT, SUMS)[name]
    stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
    _check(_driver().cuLaunchKernel(kernel, *grid, 32, 1, 1, 0, stream, pointers, None), f"cuLaunchKernel {name}")
    if previous is not None:
        _check(_driver().cuCtxSetCurrent(previous), "cuCtxSetCurrent")


def _rows(L: int, D: int, B: torch.Tensor, C: torch.Tensor) -> list:
    """The sizes and B/C strides every kernel of scan.cu takes after its tensors."""
    return [ctypes.c_int(L), ctypes.c_int(D)] + [ctypes.c_longlong(s) for s in (*B.stride()[:2], *C.stride()[:2])]


def scan_forward(u, delta, A, B, C, D, z, bias, reverse: bool, states: torch.Tensor | None) -> torch.Tensor:
    """Launches scan.cu (twice, with the chaining between, when time is cut into segments). u, delta, z contiguous
    (b, l, d) bf16; B, C (b, l, 16) rows 16-byte aligned; A (d, 16), D, bias (d,) float32; states, if given, the
    (b, chunks, d, 16) float32 tensor the backward reads."""
    batch, length, dim = u.shape
    cfg = {"cut_below": CUT_BELOW, "programs": PROGRAMS}
    seg_len, n_seg = triton_scan._segments(length, batch * dim // CHANNELS, cfg, STEPS)
    out = torch.empty_like(u)
    direction = "rev" if reverse else "fwd"

    def launch(name: str, seg_state=None, seg_dt=None, init=None, saved=None) -> None:
        _launch(name, (dim // CHANNELS, batch, n_seg), [u, delta, A, B, C, D, z, bias, out,
                                                        *_rows(length, dim, B, C), ctypes.c_int(seg_len // STEPS),
                                                        seg_state, seg_dt, init, saved])

    init = None
    if n_seg > 1:
        seg_state = torch.empty(batch, n_seg, dim, STATES, dtype=torch.float32, device=u.device)
        seg_dt = torch.empty(batch, n_seg, dim, dtype=torch.float32, device=u.device)
        launch(f"scan_{direction}_state", seg_state, seg_dt)
        init = triton_scan._chain_segments(seg_state, seg_dt, A, reverse=False)
    launch(f"scan_{direction}", init=init, saved=states)
    return out


def scan_backward(u, delta, A, B, C, D, z, bias, dout, states, reverse: bool) -> tuple[torch.Tensor, ...]:
    """Launches scan.cu's backward (after its adjoint pass and the chaining, when time is cut into segments) on
    scan_forward's tensors, the states it saved and dout (laid out like u): du, ddelta, dz and the per-segment and
    per-channel-block partials SelectiveScanFn.gradients sums (dA, dD, dbias, dBC)."""
    batch, length, dim = u.shape
    blocks = dim // CHANNELS
    cfg = {"cut_below": BWD_CUT_BELOW, "programs": BWD_PROGRAMS}
    seg_len, n_seg = triton_scan._segments(length, batch * blocks, cfg, CHUNK)
    f32 = {"dtype": torch.float32, "device": u.device}
    du, ddelta, dz = (torch.empty_like(u) for _ in range(3))
    dA, seg_adj = (torch.empty(batch, n_seg, dim, STATES, **f32) for _ in range(2))
    dD, dbias, seg_dt = (torch.empty(batch, n_seg, dim, **f32) for _ in range(3))
    dBC = torch.empty(batch, blocks, length, 2 * STATES, **f32)
    direction = "rev" if reverse else "fwd"

    def launch(name: str, init: torch.Tensor | None) -> None:
        _launch(name, (blocks, batch, n_seg), [u, delta, A, B, C, D, z, bias, dout, states, init,
                                               *_rows(length, dim, B, C), ctypes.c_int(seg_len), seg_adj, seg_dt,
                                               du, ddelta, dz, dA, dD, dbias, dBC])

    init = None
    if n_seg > 1:
        launch(f"grad_{direction}_adjoint", None)
        init = triton_scan._chain_segments(seg_adj, seg_dt, A, reverse=True)
    launch(f"grad_{direction}", init)
    return du, ddelta, dz, dA, dD, dbias, dBC


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and 16-byte aligned, as scan.cu's row copies (cp.async, 16 bytes) need."""
    return t if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)


class CudaSelectiveScanFn(triton_scan.SelectiveScanFn):
    """scan.cu's forward, then the Triton backward (inherited) or with BACKWARD = "cuda" scan.cu's."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, save):
        u, delta, z = (_dense(t) for t in (u, delta, z))
        B, C = triton_scan._aligned(B), triton_scan._aligned(C)
        A, D_, bias = (t.float().contiguous() for t in (A, D, delta_bias))
        states = None
        if save:
            states = torch.empty(u.shape[0], -(-u.shape[1] // CHUNK), u.shape[2], STATES, dtype=torch.float32,
                                 device=u.device)
        out = scan_forward(u, delta, A, B, C, D_, z, bias, bool(reverse), states)
        if save:
            triton_scan.SelectiveScanFn.save_context(ctx, (u, delta, A, B, C, D_, z, bias, states), D, delta_bias,
                                                     delta_softplus, reverse)
        return out

    @staticmethod
    def backward(ctx, dout):
        if BACKWARD == "triton":
            return triton_scan.SelectiveScanFn.backward(ctx, dout)
        u, delta, A, B, C, D_, z, bias, states = ctx.saved_tensors
        *_, reverse = ctx.flags
        du, ddelta, dz, dA, dD, dbias, dBC = scan_backward(u, delta, A, B, C, D_, z, bias, _dense(dout), states,
                                                           reverse)
        return triton_scan.SelectiveScanFn.gradients(ctx, B, C, du, ddelta, dz, dA, dD, dbias, dBC)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    reverse: bool = False,
) -> torch.Tensor:
    """Same function as ``reference.selective_scan_reference``; scan.cu where it applies, else Triton's."""
    if not supports(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        return triton_scan.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    save = needs_grad(u, delta, A, B, C, D, z, delta_bias)
    return CudaSelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, save)

