"""``caduceus benchmark`` on a tiny real sample: 24/16 Genomic Benchmarks sequences and the CAGI5 HNF4A
variants on the committed chr20 slice (tests/data/benchmark, tests/data/vep)."""

import json

import numpy as np
import pytest
import torch

from caduceus.benchmark import GenomicBenchmarksCNN, Settings, load_split, run_benchmark, stratified_subset
from caduceus.cli import main
from tests.analysis_data import SLICE, VEP_DATA
from tests.conftest import FIXTURES

pytest.importorskip("sklearn")
pytest.importorskip("scipy")
SAMPLE = VEP_DATA.parent / "benchmark"
PH = FIXTURES / "ph_d32_n2"


def test_stratified_subset_keeps_class_proportions():
    labels = np.array([0] * 30 + [1] * 10 + [2] * 60)
    chosen = stratified_subset(labels, 20, np.random.default_rng(0))
    assert np.bincount(labels[chosen]).tolist() == [6, 2, 12]
    assert len(set(chosen.tolist())) == 20
    assert stratified_subset(labels, None, np.random.default_rng(0)).tolist() == list(range(100))


def test_cnn_is_the_papers_three_layer_network():
    model = GenomicBenchmarksCNN(num_classes=2, input_length=500)
    convolutions = [m for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convolutions] == [
        (100, 16, (8,)), (16, 8, (8,)), (8, 4, (8,))]
    assert model.dense[0].in_features == 4 * 56  # 500 -> 493/2 -> 239/2 -> 112/2 positions, 4 filters
    assert model(torch.zeros(3, 500, dtype=torch.long)).shape == (3, 2)


def test_quick_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["benchmark", "--quick", "--data", str(SAMPLE), "--fasta", str(SLICE), "--cagi5-vcf",
                 str(VEP_DATA / "hnf4a_cagi5.vcf"), "--cagi5-window", "32", "--models", str(PH),
                 "--datasets", "human_enhancers_cohn", "--cnn-epochs", "2", "--out-dir", str(out)]) == 0
    table = (out / "results.md").read_text()
    assert "| task | n train / test | metric | k-mer LR | CNN | ph_d32_n2 | random-init |" in table
    assert "| human_enhancers_cohn | 24 / 16 | accuracy |" in table
    assert "| cagi5_hnf4a | 186 variants | Spearman(llr, EFFECT) |" in table
    assert "| cagi5_hnf4a | 186 variants | AUROC abs(llr) |" in table
    assert "SVM" not in table  # --quick: llr only
    results = json.loads((out / "results.json").read_text())["results"]
    cohn, cagi5 = results
    for method in ("k-mer LR", "CNN", "ph_d32_n2", "random-init"):
        assert 0 <= cohn["scores"][method]["accuracy"] <= 1 and 0 <= cohn["scores"][method]["auroc"] <= 1
    assert set(cagi5["scores"]) == {"ph_d32_n2", "random-init"}
    assert -1 <= cagi5["scores"]["ph_d32_n2"]["spearman_llr_effect"] <= 1
    if pytest.importorskip("matplotlib"):
        assert (out / "roc_human_enhancers_cohn.png").is_file() and (out / "roc_cagi5_hnf4a.png").is_file()
    assert "| human_enhancers_cohn |" in capsys.readouterr().out


def test_parallel_jobs_give_the_scores_of_one_process(tmp_path):
    settings = dict(data_dir=SAMPLE, fasta=SLICE, cagi5_vcf=VEP_DATA / "hnf4a_cagi5.vcf", cagi5_window=32,
                    models=[str(PH)], datasets=("human_enhancers_cohn",), cnn_epochs=1, device="cpu")
    serial = run_benchmark(Settings.quick(out_dir=tmp_path / "serial", **settings))
    parallel = run_benchmark(Settings.quick(out_dir=tmp_path / "parallel", jobs=2, **settings))
    assert [r.task for r in parallel] == [r.task for r in serial] == ["human_enhancers_cohn", "cagi5_hnf4a"]
    for one, other in zip(serial, parallel):
        assert other.scores.keys() == one.scores.keys()
        for method, values in one.scores.items():
            assert other.scores[method] == pytest.approx(values, abs=1e-5), (one.task, method)


def test_bad_input_is_refused_before_work(tmp_path, capsys):
    assert main(["benchmark", "--data", str(tmp_path), "--out-dir", str(tmp_path / "out")]) == 1
    assert "genomic_benchmarks_grch37_subset/human_enhancers_cohn/train.tsv.gz: not found" in capsys.readouterr().err
    assert main(["benchmark", "--data", str(SAMPLE), "--datasets", "mouse", "--out-dir", str(tmp_path)]) == 1
    assert "unknown dataset(s) mouse" in capsys.readouterr().err
    assert main(["benchmark", "--data", str(SAMPLE), "--jobs", "0", "--out-dir", str(tmp_path)]) == 1
    assert "--jobs must be at least 1, got 0" in capsys.readouterr().err
    assert main(["benchmark", "--data", str(SAMPLE), "--datasets", "human_enhancers_cohn", "--models", "nonexistent",
                 "--cagi5-vcf", str(VEP_DATA / "hnf4a_cagi5.vcf"), "--out-dir", str(tmp_path)]) == 1
    assert "'nonexistent' is neither a model directory nor a known model name" in capsys.readouterr().err


def test_sample_is_real_genomic_benchmarks_data():
    sequences, labels = load_split(SAMPLE, "human_enhancers_cohn", "train")
    assert len(sequences) == 24 and np.bincount(labels).tolist() == [12, 12]
    assert {len(s) for s in sequences} == {500} and set("".join(sequences)) <= set("ACGTN")
