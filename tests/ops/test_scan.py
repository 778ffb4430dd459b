import subprocess
import sys

import pytest
import torch

from caduceus import ops
from caduceus.ops import cpu, reference
from tests.conftest import max_relative_error


def scan_inputs(batch, length, dim, n_state=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)
    return dict(u=r(batch, length, dim), delta=r(batch, length, dim), A=-torch.rand(dim, n_state, generator=g,
                dtype=dtype) * 4, B=r(batch, length, n_state), C=r(batch, length, n_state), D=r(dim),
                z=r(batch, length, dim), delta_bias=r(dim) * 0.5)


def run_with_grads(fn, inputs, dtype, reverse, cotangent_seed=1):
    leaves = {k: v.to(dtype).clone().requires_grad_() for k, v in inputs.items()}
    y = fn(**leaves, delta_softplus=True, reverse=reverse)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(cotangent_seed), dtype=torch.float64)
    y.backward(g.to(y.dtype))
    return y, {k: v.grad for k, v in leaves.items()}


@pytest.fixture(params=["numba", "pytorch-loop"])
def scan_engine(request, monkeypatch):
    if request.param == "numba":
        pytest.importorskip("numba")
    else:
        monkeypatch.setattr(cpu, "scan_numba", None)
    return request.param


@pytest.mark.parametrize("reverse", [False, True])
# 300 crosses the chunk sizes; (2, 1040, 130): five chunks, three channel blocks (the last 2 wide), two threads;
# (1, 300, 70, 5): five states, not sixteen
@pytest.mark.parametrize("shape", [(2, 1, 5), (1, 67, 33), (2, 300, 20), (2, 1040, 130), (1, 300, 70, 5)])
def test_fast_scan_matches_float64_reference(scan_engine, shape, reverse):
    inputs = scan_inputs(*shape)
    expected, expected_grads = run_with_grads(reference.selective_scan_reference, inputs, torch.float64, reverse)
    actual, grads = run_with_grads(cpu.selective_scan, inputs, torch.float32, reverse)
    assert actual.dtype == torch.float32
    assert max_relative_error(actual, expected) <= 1e-5
    for name, grad in grads.items():
        assert max_relative_error(grad, expected_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("reverse", [False, True])
def test_numba_backward_is_the_same_on_one_or_two_threads(reverse):
    """Jobs write their own parts, summed in a fixed order: the split over threads changes no bit."""
    pytest.importorskip("numba")
    inputs = scan_inputs(3, 700, 150, dtype=torch.float32)
    assert 3 * 700 * 150 >= cpu.PARALLEL_MIN_ELEMENTS
    u, dt, A, B, C, D = inputs["u"], inputs["delta"].abs(), inputs["A"], inputs["B"], inputs["C"], inputs["D"]
    dy = inputs["z"]  # any output gradient
    _, states = cpu._numba_forward(u, dt, A, B, C, D, reverse)
    threads = torch.get_num_threads()
    grads = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            grads.append(cpu._numba_backward(u, dt, A, B, C, D, reverse, states, dy))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*grads, strict=True):
        assert torch.equal(one, two)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 130, 37), (3, 300, 16)])  # lengths cross TILE and CHUNK
def test_inference_kernel_matches_float64_reference(scan_engine, shape, reverse):
    """Without autograd the numba kernel applies softplus, bias and gate itself: same function."""
    inputs = scan_inputs(*shape)
    inputs["delta"] = inputs["delta"] * 10  # softplus arguments from -40 to 40: both branches, the threshold
    for drop in ((), ("z",), ("delta_bias", "D")):
        kept = {k: v for k, v in inputs.items() if k not in drop}
        with torch.no_grad():
            actual = cpu.selective_scan(**{k: v.float() for k, v in kept.items()}, reverse=reverse)
        expected = reference.selective_scan_reference(**kept, reverse=reverse)
        assert torch.isfinite(actual).all()
        assert max_relative_error(actual, expected) <= 1e-5, drop
    positive = dict(inputs, delta=inputs["delta"].abs() / 10, delta_bias=inputs["delta_bias"].abs())
    with torch.no_grad():
        actual = cpu.selective_scan(**{k: v.float() for k, v in positive.items()}, delta_softplus=False)
    assert max_relative_error(actual, reference.selective_scan_reference(**positive, delta_softplus=False)) <= 1e-5


def test_numba_elementwise_functions_match_libm():
    scan_numba = pytest.importorskip("caduceus.ops.scan_numba")
    import numpy as np

    x = np.linspace(-60, 60, 4001, dtype=np.float32)
    x64 = x.astype(np.float64)
    exp2 = np.array([scan_numba._exp2(v / np.float32(2)) for v in x])
    assert np.max(np.abs(exp2 / np.exp2(x64 / 2) - 1)) < 3e-7
    # the ends of the range: clamped to the smallest normal below -126, overflow to inf above 128
    assert scan_numba._exp2(np.float32(-1e6)) == np.float32(2.0**-126)
    assert scan_numba._exp2(np.float32(-125.5)) == pytest.approx(2.0**-125.5, rel=3e-7)
    assert scan_numba._exp2(np.float32(127.5)) == pytest.approx(2.0**127.5, rel=3e-7)
    assert scan_numba._exp2(np.float32(1e6)) == np.inf
    softplus = np.array([scan_numba._softplus(v) for v in x])
    expected = np.where(x64 > 20, x64, np.log1p(np.exp(x64)))
    # float32 rounding of x·log2(e) alone costs up to |x|·6e-8 relative in e^x: 4e-6 at |x| = 60
    assert np.max(np.abs(softplus / expected - 1)) < 5e-6
    silu = np.array([scan_numba._silu(v) for v in x])
    expected = x64 / (1 + np.exp(-x64))
    assert np.max(np.abs(silu - expected) / np.maximum(np.abs(expected), 1e-30)) < 5e-6


def test_optional_operands_and_bfloat16():
    inputs = scan_inputs(2, 40, 12)
    for drop in ("D", "z", "delta_bias"):
        partial = {k: v for k, v in inputs.items() if k != drop}
        expected = reference.selective_scan_reference(**partial)
        actual = cpu.selective_scan(**{k: v.float() for k, v in partial.items()})
        assert max_relative_error(actual, expected) <= 1e-5, drop
    bf16 = cpu.selective_scan(**{k: v.to(torch.bfloat16) if v.dim() == 3 else v.float() for k, v in inputs.items()})
    assert bf16.dtype == torch.bfloat16
    assert max_relative_error(bf16, reference.selective_scan_reference(**inputs)) <= 2e-2


def test_reverse_equals_flipped_forward():
    inputs = scan_inputs(1, 50, 8, dtype=torch.float32)
    flipped = {k: v.flip(1) if v.dim() == 3 else v for k, v in inputs.items()}
    assert max_relative_error(cpu.selective_scan(**inputs, reverse=True),
                              cpu.selective_scan(**flipped).flip(1)) <= 1e-6


@pytest.mark.parametrize("reverse", [False, True])
def test_conv_matches_reference_with_gradients(reverse):
    x = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 1, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    expected = reference.causal_conv1d_reference(x, w, b, reverse)
    actual = cpu.causal_conv1d(x, w, b, reverse)
    assert max_relative_error(actual, expected) <= 1e-12
    g = torch.randn_like(expected)
    grads_expected = torch.autograd.grad(expected, (x, w, b), g)
    grads_actual = torch.autograd.grad(actual, (x, w, b), g)
    for a, e in zip(grads_actual, grads_expected, strict=True):
        assert max_relative_error(a, e) <= 1e-12
    short = torch.randn(1, 2, 6, dtype=torch.float64)  # shorter than the kernel
    assert max_relative_error(cpu.causal_conv1d(short, w, None, reverse),
                              reference.causal_conv1d_reference(short, w, None, reverse)) <= 1e-12


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape", ["strided", "shorter than the kernel", "split over threads"])
def test_inference_conv_matches_reference(reverse, with_bias, silu, shape):
    """Float32 without gradients takes the fused numba pass when numba is installed."""
    g = torch.Generator().manual_seed(0)
    if shape == "split over threads":
        x = torch.randn(3, 2000, 64, generator=g, dtype=torch.float64)
    else:  # the x half of a wider projection, as in the model
        x = torch.randn(2, 700 if shape == "strided" else 2, 128, generator=g, dtype=torch.float64)[..., :64]
    w, b = torch.randn(64, 1, 4, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    b = b if with_bias else None
    expected = reference.causal_conv1d_reference(x, w, b, reverse, silu)
    with torch.no_grad():
        actual = ops.causal_conv1d(x.float(), w.float(), None if b is None else b.float(), reverse, silu)
    assert actual.dtype == torch.float32
    assert max_relative_error(actual, expected) <= 1e-6


def test_rms_norm_fused_add():
    x, r, w = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(8)
    normed, summed = ops.rms_norm(x, w, r)
    assert torch.equal(summed, x + r)
    expected = (x + r) / ((x + r).pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w
    assert max_relative_error(normed, expected) <= 1e-6


def test_dispatch_picks_and_forces_backends(monkeypatch):
    assert ops.get_backend("cpu").name == "torch"
    with ops.use_backend("reference"):
        assert ops.get_backend("cpu").name == "reference"
    assert ops.get_backend("cpu").name == "torch"
    monkeypatch.setenv("CADUCEUS_BACKEND", "reference")
    assert ops.get_backend("cpu").name == "reference"
    with pytest.raises(ValueError, match="unknown or unavailable kernel backend 'cuda-magic'"):
        ops.set_backend("cuda-magic")
    assert "reference" in ops.available_backends() and "torch" in ops.available_backends()


def test_rocm_builds_do_not_get_the_triton_backend():
    """ROCm GPUs are "cuda" devices too, but the Triton kernels carry NVIDIA inline assembly: the torch backend serves
    them (a subprocess, so that this process keeps its imports)."""
    code = (
        "import torch; torch.version.hip = '6.2'\n"
        "from caduceus import ops\n"
        "assert ops.get_backend('cuda').name == 'torch', ops.get_backend('cuda').name\n"
        "try:\n    import caduceus.ops.triton\nexcept ImportError as e:\n    assert 'ROCm' in str(e), e\n"
        "else:\n    raise AssertionError('imported')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_training_saves_no_per_step_states(scan_engine):
    """What autograd keeps for the backward is O(B·L·D), never the (B, L, D, N) states."""
    batch, length, dim, n_state = 1, 1000, 64, 16
    inputs = {k: v.float().requires_grad_() for k, v in scan_inputs(batch, length, dim, n_state).items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = cpu.selective_scan(**inputs)
    y.sum().backward()  # recomputation inside the backward is transient and not counted
    per_step_states = batch * length * dim * n_state
    assert saved and max(saved) <= per_step_states / 8
    assert sum(saved) < per_step_states / 2


def test_512_bit_vectors_only_where_numba_features_are_unset(monkeypatch):
    scan_numba = pytest.importorskip("caduceus.ops.scan_numba")

    class Features(dict):
        def flatten(self):
            return ",".join(("+" if on else "-") + name for name, on in self.items())

    monkeypatch.setattr(scan_numba.binding, "get_host_cpu_features", lambda: Features(avx512f=True, avx2=True))
    monkeypatch.setattr(scan_numba.config, "CPU_FEATURES", None)
    scan_numba._prefer_512_bit_vectors()
    assert scan_numba.config.CPU_FEATURES == "+avx512f,+avx2,-prefer-256-bit"
    monkeypatch.setattr(scan_numba.config, "CPU_FEATURES", "+avx2")  # the user's NUMBA_CPU_FEATURES wins
    scan_numba._prefer_512_bit_vectors()
    assert scan_numba.config.CPU_FEATURES == "+avx2"
    monkeypatch.setattr(scan_numba.config, "CPU_FEATURES", None)
    monkeypatch.setattr(scan_numba.binding, "get_host_cpu_features", lambda: Features(avx512f=False, avx2=True))
    scan_numba._prefer_512_bit_vectors()
    assert scan_numba.config.CPU_FEATURES is None
