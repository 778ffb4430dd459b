"""Triton backend against the float64 reference (CUDA only; skipped on CPU-only machines such as CI).

benchmarks/check_triton.py runs the long-sequence sweep; these are the quick cases.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("the Triton backend needs a CUDA GPU", allow_module_level=True)

from caduceus import ops  # noqa: E402
from caduceus.configuration import CaduceusModelConfig  # noqa: E402
from caduceus.modeling import CaduceusForMaskedLM  # noqa: E402
from caduceus.ops import reference  # noqa: E402
from caduceus.ops.testing import TOLERANCE, relative_error, scan_errors, scan_inputs, training_errors  # noqa: E402
from caduceus.ops.triton import causal_conv1d, rms_norm, scan, selective_scan  # noqa: E402
from tests.conftest import REFERENCE_MODELS, load_reference  # noqa: E402
from tests.ops.checks import poison  # noqa: E402


def test_registered_for_cuda() -> None:
    assert "triton" in ops.available_backends()
    assert ops.get_backend("cuda").name == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
# (32, 300, 256) has enough (batch, channel block) programs to run in one time segment (with the forward's "_idle"
# settings); (64, 40, 512) has enough to take scan.FWD_CONFIG's "busy" settings; the others have
# few and are cut into time segments where long enough.
@pytest.mark.parametrize(("batch", "length", "dim"), [(1, 1, 236), (3, 300, 236), (2, 513, 512), (32, 300, 256),
                                                      (64, 40, 512)])
@pytest.mark.parametrize("full", [True, False])
def test_selective_scan(dtype, reverse, batch, length, dim, full) -> None:
    _check_scan(dtype, reverse, batch, length, dim, full)


# fp16 takes the same paths as bf16 (2-byte rows through the shared-memory ring where the channels allow): one time
# segment with the ring and many programs (256 channels), and time segments (512).
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("batch", "length", "dim"), [(2, 513, 512), (32, 300, 256)])
def test_selective_scan_fp16(reverse, batch, length, dim) -> None:
    _check_scan(torch.float16, reverse, batch, length, dim, full=True)


# Forward launch settings other than the default that benchmarks/bench_gpu.py --sweep times: the configuration before
# the shared-memory ring (rows prefetched into registers, 4 states per lane in one segment), the one before 2026-12-07
# (no sharing of per-channel work, a branch around the state store), the default's depths and tiles without the ring,
# each switch alone, and the "_idle" tiles of 4 states per lane with the ring.
@pytest.mark.parametrize("config", [{"ring": False, "depth": 1, "depth_idle": 3, "BD_idle": 8, "NV_idle": 4},
                                    {"ring": False, "depth": 1, "depth_idle": 3, "group": False, "pred_store": False},
                                    {"ring": False}, {"group": False}, {"pred_store": False},
                                    {"depth": 1, "depth_idle": 3}, {"BD_idle": 8, "NV_idle": 4}])
@pytest.mark.parametrize(("dtype", "reverse"), [(torch.bfloat16, False), (torch.float32, True)])
@pytest.mark.parametrize(("batch", "length", "dim"), [(3, 300, 236), (2, 513, 512), (64, 40, 512), (32, 300, 256)])
def test_selective_scan_forward_settings(config, dtype, reverse, batch, length, dim, monkeypatch) -> None:
    for key, value in config.items():
        monkeypatch.setitem(scan.FWD_CONFIG, key, value)
    _check_scan(dtype, reverse, batch, length, dim, full=True)


# Backward launch settings other than the default that benchmarks/bench_gpu.py --sweep times: the dB/dC channel sums
# by the shuffle butterfly (it needs the bf16 B/C layout these shapes give), no L2 prefetch, a register cap (spills),
# pieces of 2 steps under the same cap (no spills in the loops; prefetch 4 pieces: the same 8 steps ahead), states
# saved every 256 steps (64 by default), no shared-memory ring (rows from L2, prefetched 2 pieces ahead), the ring for
# the adjoint walk only, and the ring's copies 1 and 4 pieces ahead.
@pytest.mark.parametrize("config", [{"smem_sums": False}, {"prefetch": 0}, {"maxnreg": 168},
                                    {"SUB": 2, "maxnreg": 168, "prefetch": 4}, {"chunk": 256},
                                    {"ring": False, "ring_adj": False}, {"ring_adj": False}, {"prefetch": 1},
                                    {"prefetch": 4}])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("batch", "length", "dim"), [(2, 513, 512), (32, 300, 256)])
def test_selective_scan_backward_settings(config, reverse, batch, length, dim, monkeypatch) -> None:
    for key, value in config.items():
        monkeypatch.setitem(scan.BWD_CONFIG, key, value)
    _check_scan(torch.bfloat16, reverse, batch, length, dim, full=True)


def _check_scan(dtype: torch.dtype, reverse: bool, batch: int, length: int, dim: int, full: bool) -> None:
    """Output and every gradient against the float64 reference; u and z slices of one tensor, and B and C
    rows 8 bytes off a 16-byte boundary in bf16 (dt_rank 4): the kernels' strided, unaligned loads."""
    inputs = scan_inputs(batch, length, dim, dtype, device="cuda", full=full, shared_rows=True, dt_rank=4,
                         seed=length + dim)
    errors = scan_errors(selective_scan, inputs, reverse, before=poison)
    assert max(errors.values()) < TOLERANCE[dtype], errors


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("n_seg", [1, 31, 32, 33, 70])
def test_chain_segments(reverse, n_seg) -> None:
    """The parallel chaining of time segments against the sequential recurrence, over one or several tiles."""
    torch.manual_seed(n_seg)
    seg = torch.randn(2, n_seg, 5, 16, device="cuda")
    seg_dt = torch.rand(2, n_seg, 5, device="cuda") * 2
    A = -torch.rand(5, 16, device="cuda")
    expected = torch.empty_like(seg)
    received = torch.zeros(2, 5, 16, device="cuda")
    for k in range(n_seg - 1, -1, -1) if reverse else range(n_seg):
        expected[:, k] = received
        received = torch.exp(seg_dt[:, k, :, None] * A) * received + seg[:, k]
    assert relative_error(scan._chain_segments(seg, seg_dt, A, reverse), expected) < 1e-5


@pytest.mark.parametrize("reverse", [False, True])
def test_selective_scan_many_segments(reverse, monkeypatch) -> None:
    """Time cut into 40 segments (more than one tile of the chaining kernel) in the forward and the backward."""
    for config in (scan.FWD_CONFIG, scan.BWD_CONFIG):
        monkeypatch.setitem(config, "cut_below", 1 << 30)
        monkeypatch.setitem(config, "programs", 80)
    inputs = scan_inputs(1, 40 * scan.BWD_CONFIG["chunk"], 32, torch.float32, device="cuda", seed=40)
    errors = scan_errors(selective_scan, inputs, reverse, before=poison)
    assert max(errors.values()) < TOLERANCE[torch.float32], errors


def test_selective_scan_saves_no_states_without_grad() -> None:
    """Under no_grad the forward keeps no states for a backward even when a parameter requires grad (a model's
    inference): the same output and peak memory as with A that does not."""
    torch.manual_seed(5)
    batch, length, dim, n = 1, 64 * scan.BWD_CONFIG["chunk"], 512, 16
    u, delta, z = (torch.randn(batch, length, dim, device="cuda") for _ in range(3))
    B, C = (torch.randn(batch, length, n, device="cuda") for _ in range(2))
    A0 = -torch.rand(dim, n, device="cuda") * n
    outs, peaks = [], []
    for requires_grad in (False, True):
        A = A0.clone().requires_grad_(requires_grad)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            outs.append(selective_scan(u, delta, A, B, C, z=z))
        peaks.append(torch.cuda.max_memory_allocated() - start)
    states_bytes = batch * length // scan.BWD_CONFIG["chunk"] * dim * n * 4
    assert torch.equal(outs[0], outs[1])
    assert peaks[1] < peaks[0] + states_bytes // 2, (peaks, states_bytes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("dim,width", [(236, 400), (237, 237), (512, 1024)])  # rows aligned to 4, 1 and 8 channels
def test_causal_conv1d(dtype, reverse, silu, dim, width) -> None:
    x = torch.randn(2, 333, width, device="cuda").to(dtype)[..., width - dim:]
    w, b = torch.randn(dim, 1, 4, device="cuda"), torch.randn(dim, device="cuda")
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    refs = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    poison()
    out = causal_conv1d(*leaves, reverse, silu)
    ref = reference.causal_conv1d_reference(*refs, reverse, silu)
    assert relative_error(out, ref) < TOLERANCE[dtype]
    with torch.no_grad():
        assert torch.equal(causal_conv1d(x, w, b, reverse, silu), out)
    grad = torch.randn_like(ref)
    poison()
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for leaf, r in zip(leaves, refs):
        assert relative_error(leaf.grad, r.grad) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(dtype, residual) -> None:
    x = torch.randn(2, 77, 236, device="cuda").to(dtype)
    r = torch.randn(2, 77, 236, device="cuda").to(dtype) if residual else None
    w = torch.rand(236, device="cuda") + 0.5
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, r)]
    refs = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, r)]
    poison()
    out, summed = rms_norm(leaves[0], leaves[1], leaves[2])
    ref_out, ref_sum = reference.rms_norm_reference(refs[0], refs[1], refs[2])
    assert relative_error(out, ref_out) < TOLERANCE[dtype] and relative_error(summed, ref_sum) < TOLERANCE[dtype]
    g1, g2 = torch.randn_like(ref_out), torch.randn_like(ref_sum)
    torch.autograd.backward([out, summed], [g1.to(dtype), g2.to(dtype)])
    torch.autograd.backward([ref_out, ref_sum], [g1, g2])
    for leaf, r in zip(leaves, refs):
        if leaf is not None:
            assert relative_error(leaf.grad, r.grad) < TOLERANCE[dtype]


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_published_fixtures_on_cuda(name: str) -> None:
    """The whole model on the Triton backend computes what the upstream code computed (fp32)."""
    model, expected = load_reference(name)
    model = model.cuda().eval()
    poison()
    with torch.no_grad():
        out = model(expected["input_ids"].cuda(), output_hidden_states=True)
    assert relative_error(out.logits, expected["logits"].cuda()) <= TOLERANCE[torch.float32]
    assert relative_error(out.last_hidden_state, expected["last_hidden_state"].cuda()) <= TOLERANCE[torch.float32]
    for i, hidden in enumerate(out.hidden_states):
        assert relative_error(hidden, expected[f"hidden_states.{i}"].cuda()) <= TOLERANCE[torch.float32], i


def _assert_trains_as_reference(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """A training step of ``model`` on the Triton backend (fp32) gives the logits and every gradient of the float64
    reference backend."""
    for name, error in training_errors(model, ids, "triton", torch.float32, before=poison).items():
        assert error < TOLERANCE[torch.float32], name


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_published_fixtures_gradients_on_cuda(name: str) -> None:
    model, io = load_reference(name)
    _assert_trains_as_reference(model, io["input_ids"].cuda())


@pytest.mark.parametrize("rcps", [False, True])
def test_padded_channels_on_cuda(rcps: bool) -> None:
    """d_model 118: on Triton the mixers' channels (236, or 118 a strand for PS) are padded to a multiple of 16;
    logits and gradients (fp32) are those of the float64 reference backend, which pads nothing."""
    torch.manual_seed(0)
    model = CaduceusForMaskedLM(CaduceusModelConfig(d_model=118, n_layer=2, rcps=rcps))
    assert ops.channel_multiple("cuda") == 16
    _assert_trains_as_reference(model, torch.randint(3, 11, (2, 300), device="cuda"))
