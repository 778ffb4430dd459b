"""The bundled pretrained models: present in the package, loadable offline, and actually trained."""

from pathlib import Path

import pytest
import torch

from caduceus import CaduceusForMaskedLM
from caduceus.hub import BUNDLED_MODELS, WEIGHTS_DIR
from caduceus.tokenizer import MASK_ID, CaduceusTokenizer, reverse_complement_ids

SLICE = Path(__file__).parent / "data" / "grch37_chr20_slice.fa"


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    sequence = "".join(line.strip() for line in SLICE.read_text().splitlines() if not line.startswith(">"))
    chunks = [sequence[i : i + 1024] for i in range(0, 16 * 4096, 4096)]
    return CaduceusTokenizer(add_special_tokens=False)(chunks).input_ids


@pytest.mark.parametrize("name", sorted(BUNDLED_MODELS))
def test_bundled_model_predicts_masked_human_bases(name, windows, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = CaduceusForMaskedLM.from_pretrained(name)
    assert model.config.rcps == ("-ps-" in name) and (model.config.d_model, model.config.n_layer) == (118, 4)
    assert (WEIGHTS_DIR / name / "README.md").is_file()
    generator = torch.Generator().manual_seed(0)
    masked = torch.rand(windows.shape, generator=generator) < 0.15
    with torch.no_grad():
        logits = model(windows.masked_fill(masked, MASK_ID)).logits[..., 7:11]  # A C G T
    targets = windows[masked] - 7
    log_probs = logits[masked].log_softmax(-1)
    cross_entropy = -log_probs.gather(1, targets[:, None]).mean().item()
    frequencies = torch.bincount(targets, minlength=4).float() / len(targets)
    frequency_entropy = -(frequencies * frequencies.log()).sum().item()
    accuracy = (log_probs.argmax(-1) == targets).float().mean().item()
    assert accuracy > 0.42 and cross_entropy < frequency_entropy - 0.1, (accuracy, cross_entropy)


def test_bundled_ps_is_rc_equivariant_on_real_dna(windows):
    model = CaduceusForMaskedLM.from_pretrained("caduceus-dna-ps-4L-1k-d118-grch37")
    complement = model.lm_head.complement_map
    with torch.no_grad():
        logits = model(windows[:2]).logits
        logits_rc = model(reverse_complement_ids(windows[:2])).logits
    assert (logits_rc - logits.flip(1)[..., complement]).abs().max() < 1e-4
