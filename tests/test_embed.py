"""``caduceus embed`` on records cut from the committed HNF4A slice of GRCh37 chr20."""

import json

import numpy as np
import pytest
from safetensors import safe_open

from caduceus._genomics import Reference
from caduceus.api import Caduceus, CaduceusConfig
from caduceus.cli import main
from caduceus.data import DataError
from caduceus.embed import embed_sequences, window_starts
from tests.analysis_data import SLICE, write_fasta
from tests.conftest import FIXTURES

PH, PS = FIXTURES / "ph_d32_n2", FIXTURES / "ps_d32_n2"


@pytest.fixture(scope="module")
def bases():
    return Reference(SLICE).bases("chr20", 10_000, 10_300)


@pytest.mark.parametrize(("length", "window", "overlap"), [(10, 64, 16), (64, 64, 16), (65, 64, 16), (300, 64, 0),
                                                           (301, 100, 99)])
def test_windows_cover_the_sequence_and_end_at_its_end(length, window, overlap):
    starts = window_starts(length, window, overlap)
    covered = np.zeros(length, dtype=int)
    for start in starts:
        covered[start : start + window] += 1
    assert covered.min() >= 1 and starts[0] == 0 and min(starts[-1] + window, length) == length
    assert all(b - a <= window - overlap for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("model", [PH, PS], ids=["ph", "ps"])
def test_short_sequence_is_the_api_embedding(model, bases):
    api = Caduceus(CaduceusConfig(model_name=model, rc="average", device="cpu"))
    expected = api.get_embeddings(api.process_data([bases[:50]]), per_token=True)[0]
    [per_token] = embed_sequences([bases[:50]], model, window=64, per_token=True, device="cpu")
    np.testing.assert_allclose(per_token, expected, rtol=1e-5, atol=1e-6)
    [pooled] = embed_sequences([bases[:50]], model, window=64, device="cpu")
    np.testing.assert_allclose(pooled, expected.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_long_sequence_windows_are_averaged_base_by_base(bases):
    [per_token] = embed_sequences([bases], PS, window=64, overlap=16, per_token=True)
    assert per_token.shape == (300, 32)
    api = Caduceus(CaduceusConfig(model_name=PS, rc="average", max_length=64))
    windows = api.get_embeddings(api.process_data([bases[0:64], bases[48:112]]), per_token=True)
    np.testing.assert_allclose(per_token[:48], windows[0][:48], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(per_token[48:64], (windows[0][48:] + windows[1][:16]) / 2, rtol=1e-5, atol=1e-6)
    [mean] = embed_sequences([bases], PS, window=64, overlap=16)
    np.testing.assert_allclose(mean, per_token.mean(axis=0), rtol=1e-5, atol=1e-6)
    [largest] = embed_sequences([bases], PS, window=64, overlap=16, pooling="max")
    assert (largest >= per_token.max(axis=0) - 1e-6).all()


def test_command_npy_with_names(tmp_path, bases, capsys):
    fasta = write_fasta(tmp_path / "in.fa", {"short": bases[:40], "long": bases})
    out = tmp_path / "emb.npy"
    assert main(["embed", "--fasta", str(fasta), "--model", str(PH), "--out", str(out), "--window", "64"]) == 0
    assert np.load(out).shape == (2, 32)
    assert (tmp_path / "emb.names.txt").read_text() == "short\t40\nlong\t300\n"
    assert "embed: 2 records x 32 dims" in capsys.readouterr().err
    per_token = tmp_path / "tokens.npy"
    assert main(["embed", "--fasta", str(fasta), "--model", str(PH), "--out", str(per_token), "--window", "64",
                 "--per-token"]) == 0
    assert np.load(per_token).shape == (340, 32)


def test_command_safetensors_per_token(tmp_path, bases):
    fasta = write_fasta(tmp_path / "in.fa", {"a": bases[:40], "b": bases[:100]})
    out = tmp_path / "emb.safetensors"
    assert main(["embed", "--fasta", str(fasta), "--model", str(PS), "--out", str(out), "--window", "64",
                 "--overlap", "8", "--per-token"]) == 0
    with safe_open(str(out), "np") as handle:
        assert sorted(handle.keys()) == ["a", "b"]
        assert handle.get_tensor("b").shape == (100, 32)
        metadata = handle.metadata()
    assert json.loads(metadata["names"]) == ["a", "b"] and json.loads(metadata["lengths"]) == [40, 100]
    assert json.loads(metadata["window"]) == 64 and json.loads(metadata["overlap"]) == 8


def test_bad_input_is_refused_before_work(tmp_path, capsys):
    fasta = write_fasta(tmp_path / "bad.fa", {"good": "ACGT", "bad": "ACXGT"})
    out = tmp_path / "emb.npy"
    assert main(["embed", "--fasta", str(fasta), "--model", str(PH), "--out", str(out)]) == 1
    assert f"{fasta}: record bad: invalid character 'X' at position 2" in capsys.readouterr().err
    assert main(["embed", "--fasta", str(tmp_path / "none.fa"), "--model", str(PH), "--out", str(out)]) == 1
    assert "FASTA file not found" in capsys.readouterr().err
    assert main(["embed", "--fasta", str(fasta), "--model", str(PH), "--out", str(tmp_path / "emb.txt")]) == 1
    assert "output must end with one of .npy, .safetensors" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match="overlap must be"):
        embed_sequences(["ACGT"], PH, window=64, overlap=64)
    with pytest.raises(DataError, match="sequence 1 is empty"):
        embed_sequences(["ACGT", ""], PH, window=64)
