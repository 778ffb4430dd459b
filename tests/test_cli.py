"""The ``caduceus`` command line: ``data`` and ``pretrain``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from caduceus.cli import main
from caduceus.modeling import CaduceusForMaskedLM

DATA = Path(__file__).parent / "data"
TINY = ["--seq-len", "64", "--extend-to", "0", "--d-model", "16", "--n-layer", "1", "--batch-size", "8",
        "--eval-windows", "8", "--num-workers", "0", "--no-progress"]


@pytest.fixture
def slice_files(tmp_path: Path) -> tuple[str, str]:
    for suffix in ("fa", "bed"):
        shutil.copy(DATA / f"grch37_chr20_slice.{suffix}", tmp_path / f"slice.{suffix}")
    return str(tmp_path / "slice.fa"), str(tmp_path / "slice.bed")


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "pretrain" in out and "data" in out


def test_pretrain_from_fasta_then_from_packed_data(slice_files, tmp_path, capsys):
    fasta, bed = slice_files
    assert main(["pretrain", "--fasta", fasta, "--bed", bed, "--max-steps", "2", "--out-dir", str(tmp_path / "a"),
                 *TINY]) == 0
    assert "step 2: finished" in capsys.readouterr().out
    assert CaduceusForMaskedLM.from_pretrained(tmp_path / "a" / "model").config.d_model == 16

    assert main(["data", "pack", str(tmp_path / "packed"), "--fasta", fasta, "--bed", bed]) == 0
    assert main(["pretrain", "--packed", str(tmp_path / "packed"), "--max-steps", "2",
                 "--out-dir", str(tmp_path / "b"), *TINY]) == 0
    weights = [(tmp_path / run / "model" / "model.safetensors").read_bytes() for run in ("a", "b")]
    assert weights[0] == weights[1]  # the packed genome trains exactly like the FASTA


def test_stopped_pretraining_says_how_to_resume(slice_files, tmp_path, capsys):
    fasta, bed = slice_files
    assert main(["pretrain", "--fasta", fasta, "--bed", bed, "--max-steps", "4", "--stop-after-steps", "1",
                 "--out-dir", str(tmp_path / "run"), *TINY]) == 0
    assert "step 1: stopped; run the same command to resume" in capsys.readouterr().out


def test_sigterm_ends_the_segment_with_a_checkpoint(slice_files, tmp_path):
    fasta, bed = slice_files
    out = tmp_path / "run"
    command = [sys.executable, "-m", "caduceus.cli", "pretrain", "--fasta", fasta, "--bed", bed,
               "--max-steps", "100000", "--log-every", "1", "--out-dir", str(out), *TINY]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "NUMBA_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.csv", time.time() + 60
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-2000:]
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert step >= 2 and f"step {step}: stopped" in stdout


def test_bad_bed_is_reported_without_traceback(slice_files, tmp_path, capsys):
    fasta, _ = slice_files
    bed = tmp_path / "bad.bed"
    bed.write_text("chr20_35000000_35080000\t0\t90000\ttrain\n")
    assert main(["pretrain", "--fasta", fasta, "--bed", str(bed), "--out-dir", str(tmp_path / "run"), *TINY]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"caduceus pretrain: error: {bed}:1: interval") and "Traceback" not in err


def test_data_grch37_without_apt_get(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    assert main(["data", "grch37", str(tmp_path / "grch37")]) == 1
    assert "`apt-get` not found" in capsys.readouterr().err
