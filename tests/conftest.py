from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from caduceus.modeling import CaduceusForMaskedLM

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
REFERENCE_MODELS = ["ph_d32_n2", "ps_d32_n2", "ph_d48_n3_ewmul"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (absolute error where e is all zero); NaN anywhere gives inf, so it never passes."""
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.double().abs().max().clamp(min=1e-30)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def load_reference(name: str) -> tuple[CaduceusForMaskedLM, dict[str, torch.Tensor]]:
    """A published-format fixture model and the inputs/outputs the upstream code gave for it."""
    return CaduceusForMaskedLM.from_pretrained(FIXTURES / name), load_file(FIXTURES / name / "io.safetensors")
