"""caduceus.ops.testing: the checks every kernel backend is held to."""

from __future__ import annotations

import pytest
import torch

from caduceus.configuration import CaduceusModelConfig
from caduceus.modeling import CaduceusForMaskedLM
from caduceus.ops.testing import TOLERANCE, relative_error, training_errors


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
