"""caduceus.ops.testing: the checks every kernel backend is held to."""

from __future__ import annotations

import pytest
import torch

from caduceus.configuration import CaduceusModelConfig
from caduceus.modeling import CaduceusForMaskedLM
from caduceus.ops.reference import selective_scan_reference
from caduceus.ops.testing import TOLERANCE, relative_error, scan_errors, scan_inputs, training_errors


def test_relative_error() -> None:
    assert relative_error(torch.tensor([1.0, 1.1]), torch.ones(2)) == pytest.approx(0.1 / 2**0.5)
    assert relative_error(torch.tensor([1.0, float("nan")]), torch.ones(2)) == float("inf")
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0


def test_torch_backend_trains_as_the_reference() -> None:
    torch.manual_seed(0)
    model = CaduceusForMaskedLM(CaduceusModelConfig(d_model=16, n_layer=2))
    calls = []
    errors = training_errors(model, torch.randint(3, 11, (2, 40)), "torch", torch.float32,
                             before=lambda: calls.append(1))
    assert set(errors) == {"logits", *(name for name, _ in model.named_parameters())}
    assert 0 < max(errors.values()) < TOLERANCE[torch.float32]  # float32 against float64: close, not equal
    assert len(calls) == 2
    assert model.lm_head.weight.grad is None  # the steps ran on copies


@pytest.mark.parametrize("full", [True, False])
def test_scan_inputs_are_laid_out_as_a_mixer_passes_them(full) -> None:
    inputs = scan_inputs(2, 30, 8, shared_rows=True, dt_rank=8, full=full)
    assert list(inputs) == ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    assert inputs["u"].dtype == torch.bfloat16 and inputs["A"].dtype == torch.float32
    assert inputs["B"].stride() == inputs["C"].stride() == (30 * 40, 40, 1)
    assert inputs["B"].data_ptr() - inputs["B"]._base.data_ptr() == 8 * 2
    assert inputs["u"].stride(1) == 3 * 8
    assert (inputs["A"] < 0).all()
    if full:
        dt = torch.nn.functional.softplus(inputs["delta_bias"])
        assert ((dt > 0.99e-3) & (dt < 0.101)).all()
    else:
        assert inputs["D"] is None and inputs["z"] is None and inputs["delta_bias"] is None
        assert (inputs["delta"] >= 0).all()
    assert torch.equal(inputs["u"], scan_inputs(2, 30, 8, shared_rows=True, dt_rank=8, full=full)["u"])


def test_scan_errors() -> None:
    inputs = scan_inputs(2, 30, 8, torch.float32)
    errors = scan_errors(selective_scan_reference, inputs, reverse=True)
    assert set(errors) == {"out", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"}
    assert 0 < max(errors.values()) < 1e-6  # float32 against float64
    forward_only = scan_errors(lambda **kw: selective_scan_reference(**dict(kw, reverse=False)), inputs, reverse=True,
                               grads=False)
    assert set(forward_only) == {"out"} and forward_only["out"] > 0.1  # the wrong direction is caught
    with pytest.raises(TypeError, match="torch.float64 for torch.float32"):
        scan_errors(lambda **kw: selective_scan_reference(**kw).double(), inputs, grads=False)
