"""The Helical-compatible embeddings API on the small fixture models."""

import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from caduceus import Caduceus, CaduceusConfig, CaduceusForMaskedLM, reverse_complement
from caduceus.api import resolve_device
from caduceus.dna_dataset import DNADataset
from caduceus.hub import PUBLISHED_MODELS
from caduceus.tokenizer import CaduceusTokenizer
from tests.conftest import FIXTURES

PH, PS = FIXTURES / "ph_d32_n2", FIXTURES / "ps_d32_n2"
D = 32
POOLINGS = ["mean", "max", "first", "last"]
SEQUENCES = ["ACGTTGCAAGGCTAACGT" * 3, "GATTACA", "CCGGATNNACGTAGGCTTAGCA" * 2]


def make(model=PH, **kwargs):
    return Caduceus(CaduceusConfig(model_name=model, **kwargs))


@pytest.fixture(scope="module")
def ph():
    return make(PH, batch_size=2)


@pytest.fixture(scope="module")
def ps():
    return make(PS, batch_size=2)


def embed(model, sequences, pooling="mean", **kwargs):
    model.config["pooling_strategy"] = pooling
    try:
        return model.get_embeddings(model.process_data(sequences), **kwargs)
    finally:
        model.config["pooling_strategy"] = "mean"


def bases_hidden(model, sequence):
    """Hidden states of the bases of one sequence run alone, without [SEP] or padding: the ground truth."""
    ids = CaduceusTokenizer(add_special_tokens=False)([sequence]).input_ids
    with torch.no_grad():
        return model.model(ids)[0][0]


# ----- CaduceusConfig -----


def test_config_defaults_and_reference_keys():
    config = CaduceusConfig()
    assert config.model_name == "caduceus-dna-ph-4L-1k-d118-grch37"  # the bundled Ph model: works offline
    reference = {"input_size": 1024, "embedding_size": 118, "model_name": "caduceus-dna-ph-4L-1k-d118-grch37",
                 "pooling_strategy": "mean", "batch_size": 5, "device": "auto", "nproc": 1}
    assert {k: config.config[k] for k in reference} == reference
    published = CaduceusConfig(model_name="caduceus-ph-4L-seqlen-1k-d118")
    assert published.list_of_files_to_download == ["caduceus/caduceus-ph-4L-seqlen-1k-d118/model.safetensors",
                                                   "caduceus/caduceus-ph-4L-seqlen-1k-d118/config.json"]


@pytest.mark.parametrize("name", list(PUBLISHED_MODELS))
def test_config_accepts_the_six_names_without_downloading(name):
    config = CaduceusConfig(model_name=name)  # the config needs no weights (a hub call would fail offline)
    info = PUBLISHED_MODELS[name]
    assert (config.config["input_size"], config.config["embedding_size"]) == (info.input_size, info.embedding_size)


def test_config_accepts_repo_ids_in_the_published_format_and_directories():
    config = CaduceusConfig(model_name="me/caduceus-ps_seqlen-2k_d_model-64_n_layer-3")
    assert (config.config["input_size"], config.config["embedding_size"], config.config["n_layer"]) == (2048, 64, 3)
    assert CaduceusConfig(model_name=PH).config["embedding_size"] == D


@pytest.mark.parametrize("name", ["caduceus-pq-4L-seqlen-1k-d118", "caduceus-ph-9L-seqlen-1k-d256"])
def test_config_rejects_unknown_model_names(name):
    with pytest.raises(ValueError, match=f"Model name {name} not found in available models: dict_keys"):
        CaduceusConfig(model_name=name)


def test_config_checks_pooling_first():
    message = r"Pooling strategy sum not found in available strategies: \['mean', 'max', 'last', 'first'\]"
    with pytest.raises(ValueError, match=message):
        CaduceusConfig(model_name="caduceus-pq-4L-seqlen-1k-d118", pooling_strategy="sum")


@pytest.mark.parametrize("kwargs, message", [
    (dict(device="gpu"), "unknown device 'gpu'"),
    (dict(dtype="float16"), "dtype must be one of"),
    (dict(max_length=0), "max_length must be a positive integer"),
    (dict(rc="both"), "rc must be one of"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
])
def test_config_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CaduceusConfig(model_name=PH, **kwargs)


def test_device_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_unavailable_device_fails_at_construction_before_any_download(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        Caduceus(CaduceusConfig(model_name="caduceus-ps-16L-seqlen-131k-d256", device="cuda"))
    with pytest.raises(RuntimeError, match="MPS is not available"):
        Caduceus(CaduceusConfig(model_name=PH, device="mps"))


def test_model_attributes(ph):
    assert ph.config is ph.configurer.config
    assert ph.device == "cpu" and ph.files_config["model_files_dir"] == PH
    assert hasattr(ph.model, "backbone") and ph.pretrained_config.d_model == D and not ph.is_ps
    reference = CaduceusForMaskedLM.from_pretrained(PH).caduceus
    assert all(torch.equal(a, b) for a, b in zip(ph.model.state_dict().values(), reference.state_dict().values()))


# ----- process_data -----


@pytest.mark.parametrize("sequence, ids", [
    ("A", [7, 1]), ("CC", [8, 8, 1]), ("TTTT", [10, 10, 10, 10, 1]), ("ACGTN", [7, 8, 9, 10, 11, 1]),
    ("ACG" * 256, [7, 8, 9] * 256 + [1]),
])
def test_process_data_reference_ids(ph, sequence, ids):
    assert ph.process_data([sequence])["input_ids"] == [ids]


def test_process_data_pads_the_whole_call_on_the_left(ph):
    dataset = ph.process_data(["A", "CC", "TTTT", "ACGTN", "ACG"])
    assert dataset["input_ids"] == [[4, 4, 4, 4, 7, 1], [4, 4, 4, 8, 8, 1], [4, 10, 10, 10, 10, 1],
                                    [7, 8, 9, 10, 11, 1], [4, 4, 7, 8, 9, 1]]
    assert dataset["attention_mask"][0] == [0, 0, 0, 0, 1, 1]


def test_a_single_string_is_one_sequence(ph):
    assert ph.process_data("ACGT")["input_ids"] == [[7, 8, 9, 10, 1]]


def test_process_data_from_a_dataframe():
    pandas = pytest.importorskip("pandas")
    model = make(PH)
    frame = pandas.DataFrame({"Sequence": ["ACGT", "GG"], "label": [0, 1]})
    assert model.process_data(frame)["input_ids"] == [[7, 8, 9, 10, 1], [4, 4, 9, 9, 1]]
    with pytest.raises(KeyError, match="must have a column named 'Sequence'"):
        model.process_data(frame.rename(columns={"Sequence": "seq"}))


def test_process_data_from_a_fasta_file(ph, tmp_path):
    pytest.importorskip("pyfaidx")
    fasta = tmp_path / "two.fa"
    fasta.write_text(">first\nACGT\nAC\n>second some description\nggn\n")
    for source in (fasta, str(fasta)):
        dataset = ph.process_data(source)
        assert dataset.names == ["first", "second"]
        assert dataset["input_ids"] == [[7, 8, 9, 10, 7, 8, 1], [4, 4, 4, 9, 9, 11, 1]]
    with pytest.raises(FileNotFoundError, match="missing.fa"):
        ph.process_data(str(tmp_path / "missing.fa"))


def test_fasta_without_pyfaidx_says_what_to_install(ph, tmp_path, monkeypatch):
    fasta = tmp_path / "one.fasta"
    fasta.write_text(">a\nACGT\n")
    monkeypatch.setitem(sys.modules, "pyfaidx", None)
    with pytest.raises(ImportError, match="pip install pyfaidx"):
        ph.process_data(fasta)


def test_the_dataset_is_dataloader_ready(ph):
    dataset = ph.process_data(SEQUENCES)
    assert isinstance(dataset, DNADataset) and len(dataset) == 3 and dataset.column_names == [
        "input_ids", "attention_mask"]
    batches = list(DataLoader(dataset, batch_size=2))
    assert batches[0]["input_ids"].shape == (2, dataset.input_ids.shape[1]) and len(batches) == 2


def test_long_sequences_are_truncated_with_one_warning():
    model = make(PH, max_length=10)
    with pytest.warns(UserWarning, match="2 of 3 sequences are longer than 10 bases") as caught:
        dataset = model.process_data(["ACGT" * 5, "AC", "G" * 11])
    assert len(caught) == 1
    assert dataset["input_ids"][0] == [7, 8, 9, 10] * 2 + [7, 8, 1]  # max_length bases, then [SEP]
    assert len(model.process_data(["ACGT" * 5], truncation=False)["input_ids"][0]) == 21


@pytest.mark.parametrize("data, error, message", [
    (["ACGT", "ACXT"], ValueError, "sequence 1: invalid character 'X' at position 2"),
    (["ACGT", ""], ValueError, "sequence 1 is empty"),
    ([], ValueError, "no sequences given"),
    (["ACGT", 7], TypeError, "sequence 1: expected a str"),
    (42, TypeError, "expected a list of sequences"),
])
def test_process_data_bad_input(ph, data, error, message):
    with pytest.raises(error, match=message):
        ph.process_data(data)


def test_windows_check_the_whole_sequence_before_cutting():
    model = make(PH, max_length=4)
    with pytest.raises(ValueError, match="sequence 0: invalid character '!' at position 9"):
        model.process_data(["ACGTACGTA!"], windows=True)


# ----- get_embeddings -----


@pytest.mark.parametrize("model_fixture, rc, width", [
    ("ph", None, D), ("ph", "average", D), ("ps", None, 2 * D), ("ps", "none", D), ("ps", "average", D),
])
def test_embedding_shapes(request, model_fixture, rc, width):
    model = request.getfixturevalue(model_fixture)
    embeddings = embed(model, SEQUENCES, rc=rc)
    assert embeddings.shape == (3, width) and embeddings.dtype == np.float32


def test_concat_needs_a_ps_model(ph):
    with pytest.raises(ValueError, match="rc='concat' needs a PS model"):
        embed(ph, SEQUENCES, rc="concat")


@pytest.mark.parametrize("pooling", POOLINGS)
def test_pooling_uses_the_real_bases_only(ph, pooling):
    embeddings = embed(ph, SEQUENCES, pooling)
    for row, sequence in zip(embeddings, SEQUENCES):
        hidden = bases_hidden(ph, sequence)
        expected = {"mean": hidden.mean(0), "max": hidden.max(0).values, "first": hidden[0], "last": hidden[-1]}
        np.testing.assert_allclose(row, expected[pooling].numpy(), atol=2e-5)


@pytest.mark.parametrize("model_fixture", ["ph", "ps"])
@pytest.mark.parametrize("rc", ["none", "average"])
def test_embeddings_do_not_depend_on_the_batch(request, model_fixture, rc):
    """Every base's embedding is the same alone or batched (so is then any pooling over the bases)."""
    model = request.getfixturevalue(model_fixture)
    alone = [embed(model, [s], rc=rc, per_token=True)[0] for s in SEQUENCES]
    for batch_size in (2, 3):
        model.config["batch_size"] = batch_size
        try:
            batched = embed(model, SEQUENCES, rc=rc, per_token=True)
        finally:
            model.config["batch_size"] = 2
        for one, other in zip(alone, batched):
            np.testing.assert_allclose(one, other, atol=2e-5)


@pytest.mark.parametrize("model_fixture", ["ph", "ps"])
@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_rc_average_is_reverse_complement_invariant(request, model_fixture, pooling):
    model = request.getfixturevalue(model_fixture)
    forward = embed(model, SEQUENCES, pooling, rc="average")
    reverse = embed(model, [reverse_complement(s) for s in SEQUENCES], pooling, rc="average")
    np.testing.assert_allclose(forward, reverse, atol=2e-5)
    assert not np.allclose(embed(model, SEQUENCES, pooling, rc="none"),
                           embed(model, [reverse_complement(s) for s in SEQUENCES], pooling, rc="none"), atol=1e-3)


@pytest.mark.parametrize("model_fixture", ["ph", "ps"])
def test_rc_average_first_base_is_the_last_of_the_reverse_complement(request, model_fixture):
    model = request.getfixturevalue(model_fixture)
    first = embed(model, SEQUENCES, "first", rc="average")
    last_of_rc = embed(model, [reverse_complement(s) for s in SEQUENCES], "last", rc="average")
    np.testing.assert_allclose(first, last_of_rc, atol=2e-5)


def test_ps_concat_is_the_reference_layout_and_average_its_strand_mean(ps):
    concat = embed(ps, SEQUENCES)  # the PS default
    hidden = bases_hidden(ps, SEQUENCES[0])
    np.testing.assert_allclose(concat[0], hidden.mean(0).numpy(), atol=2e-5)
    # reverse complement: the whole 2·d_model vector reverses (the strands swap, channel-reversed)
    reverse = embed(ps, [reverse_complement(s) for s in SEQUENCES])
    np.testing.assert_allclose(reverse, concat[:, ::-1], atol=2e-5)
    average = embed(ps, SEQUENCES, rc="average")
    np.testing.assert_allclose(average, (concat[:, :D] + concat[:, D:][:, ::-1]) / 2, atol=2e-5)
    np.testing.assert_allclose(embed(ps, SEQUENCES, rc="none"), concat[:, :D], atol=2e-5)


@pytest.mark.parametrize("model_fixture", ["ph", "ps"])
def test_per_token_embeddings(request, model_fixture):
    model = request.getfixturevalue(model_fixture)
    tokens = embed(model, SEQUENCES, rc="average", per_token=True)
    assert [t.shape for t in tokens] == [(len(s), D) for s in SEQUENCES] and tokens[0].dtype == np.float32
    np.testing.assert_allclose(np.stack([t.mean(0) for t in tokens]), embed(model, SEQUENCES, rc="average"),
                               atol=2e-5)
    reverse = embed(model, [reverse_complement(s) for s in SEQUENCES], rc="average", per_token=True)
    for forward_tokens, reverse_tokens in zip(tokens, reverse):  # position i pairs with base n-1-i
        np.testing.assert_allclose(forward_tokens, reverse_tokens[::-1], atol=2e-5)


def test_windows_are_combined_as_the_pooling_combines_bases():
    model = make(PH, max_length=10, batch_size=2)
    sequence = SEQUENCES[2]  # 44 bases: windows of 10, 10, 10, 10, 4
    chunks = [sequence[i:i + 10] for i in range(0, len(sequence), 10)]
    dataset = model.process_data([sequence, "ACGT"], windows=True)
    assert len(dataset) == 6 and dataset.num_sequences == 2
    per_chunk = model.get_embeddings(model.process_data(chunks))
    weights = np.array([len(c) for c in chunks], dtype=np.float32)[:, None]
    windowed = model.get_embeddings(dataset)
    assert windowed.shape == (2, D)
    np.testing.assert_allclose(windowed[0], (per_chunk * weights).sum(0) / weights.sum(), atol=2e-5)
    np.testing.assert_allclose(windowed[1], model.get_embeddings(model.process_data(["ACGT"]))[0], atol=2e-5)
    model.config["pooling_strategy"] = "max"
    np.testing.assert_allclose(model.get_embeddings(dataset)[0],
                               model.get_embeddings(model.process_data(chunks)).max(0), atol=2e-5)
    tokens = model.get_embeddings(dataset, per_token=True)
    assert [t.shape[0] for t in tokens] == [44, 4]


def test_bfloat16_runs_in_lower_precision_and_returns_float32():
    full = embed(make(PH), SEQUENCES)
    half = embed(make(PH, dtype="bfloat16"), SEQUENCES)
    assert half.dtype == np.float32 and not np.array_equal(full, half)
    np.testing.assert_allclose(half, full, atol=0.1)


def test_progress_bar_only_when_asked_or_on_a_terminal(ph, capsys):
    dataset = ph.process_data(SEQUENCES)
    ph.get_embeddings(dataset)  # pytest's captured stderr is not a terminal
    assert capsys.readouterr().err == ""
    ph.get_embeddings(dataset, progress=True)
    assert "Embeddings" in capsys.readouterr().err
    ph.get_embeddings(dataset, progress=False)
    assert capsys.readouterr().err == ""


def test_get_embeddings_rejects_what_is_not_a_dataset(ph):
    with pytest.raises(TypeError, match="expected the dataset returned by process_data"):
        ph.get_embeddings(["ACGT"])
    with pytest.raises(ValueError, match="the dataset is empty"):
        ph.get_embeddings(DNADataset(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long)))
