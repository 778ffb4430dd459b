"""Pretraining on CPU with tiny models on the committed chr20 slice: learning, exact resume, DDP, bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from caduceus.configuration import CaduceusModelConfig
from caduceus.modeling import CaduceusForMaskedLM
from caduceus.pretrain import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    MODEL_DIR_NAME,
    SUMMARY_NAME,
    CheckpointError,
    PretrainConfig,
    learning_rate,
    parameter_groups,
    pretrain,
)

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parent.parent


@pytest.fixture
def tiny(tmp_path: Path) -> PretrainConfig:
    """A d_model 16, one-layer model on 64-bp windows of the chr20 slice (files copied: pyfaidx writes a .fai)."""
    for suffix in ("fa", "bed"):
        shutil.copy(DATA / f"grch37_chr20_slice.{suffix}", tmp_path / f"slice.{suffix}")
    return PretrainConfig(
        out_dir=str(tmp_path / "run"), fasta=str(tmp_path / "slice.fa"), bed=str(tmp_path / "slice.bed"),
        seq_len=64, extend_to=0, d_model=16, n_layer=1, batch_size=8, max_steps=12, eval_every=4, eval_windows=16,
        checkpoint_every=100, log_every=1, num_workers=0, progress=False,
    )


def load_state(out_dir: str) -> dict:
    return torch.load(Path(out_dir) / CHECKPOINT_NAME, weights_only=True)


def logged(out_dir: str) -> list[tuple]:
    """The logged metrics without the wall-clock columns."""
    with open(Path(out_dir) / METRICS_NAME, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [(r["step"], r["split"], r["loss"], r["accuracy"], r["lr"], r["grad_norm"]) for r in rows]


def train_losses(out_dir: str) -> list[float]:
    return [float(row[2]) for row in logged(out_dir) if row[1] == "train"]


def test_a_few_steps_on_real_sequence_lower_the_loss(tiny):
    result = pretrain(replace(tiny, d_model=32, batch_size=16, max_steps=40, eval_every=40, eval_windows=64))
    losses = train_losses(tiny.out_dir)
    assert result.finished and result.step == 40 and len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert result.valid["loss"] < math.log(4) + 0.05  # near or below a uniform guess over A C G T
    assert result.valid["perplexity"] == pytest.approx(math.exp(result.valid["loss"]))
    model = CaduceusForMaskedLM.from_pretrained(Path(tiny.out_dir) / MODEL_DIR_NAME)
    assert model.config.d_model == 32
    summary = json.loads((Path(tiny.out_dir) / MODEL_DIR_NAME / SUMMARY_NAME).read_text())
    assert summary["steps"] == 40 and summary["tokens"] == 40 * 16 * 64 and summary["valid"] == result.valid
    again = pretrain(replace(tiny, d_model=32, batch_size=16, max_steps=40, eval_every=40, eval_windows=64))
    assert again.finished and json.loads((Path(tiny.out_dir) / MODEL_DIR_NAME / SUMMARY_NAME).read_text()) == summary


def test_interrupted_and_resumed_equals_uninterrupted(tiny, tmp_path):
    config = replace(tiny, micro_batch_size=4, checkpoint_every=3)
    whole = replace(config, out_dir=str(tmp_path / "whole"))
    assert pretrain(whole).finished

    pieces = replace(config, out_dir=str(tmp_path / "pieces"))
    assert pretrain(replace(pieces, stop_after_steps=5)).step == 5
    # A crash at step 8 after the periodic checkpoint at step 6: metrics of steps 7-8 were logged, then lost.
    assert pretrain(replace(pieces, stop_after_steps=6)).step == 6
    shutil.copy(Path(pieces.out_dir) / CHECKPOINT_NAME, tmp_path / "at_step_6.pt")
    assert pretrain(replace(pieces, stop_after_steps=8)).step == 8
    shutil.copy(tmp_path / "at_step_6.pt", Path(pieces.out_dir) / CHECKPOINT_NAME)
    assert pretrain(pieces).finished

    expected, resumed = load_state(whole.out_dir), load_state(pieces.out_dir)
    assert resumed["step"] == expected["step"] == 12
    for name, tensor in expected["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    for index, slot in expected["optimizer"]["state"].items():
        for key, value in slot.items():
            assert torch.equal(resumed["optimizer"]["state"][index][key], value), (index, key)
    assert logged(pieces.out_dir) == logged(whole.out_dir)


def test_time_limit_stops_with_a_checkpoint_and_the_next_run_continues(tiny):
    stopped = pretrain(replace(tiny, time_limit=1e-3))
    assert not stopped.finished and stopped.step == 0 and (Path(tiny.out_dir) / CHECKPOINT_NAME).is_file()
    assert pretrain(replace(tiny, max_steps=None, max_tokens=12 * 8 * 64)).finished  # the same run, in tokens


def test_gradient_accumulation_matches_one_big_batch(tiny, tmp_path):
    one = pretrain(replace(tiny, max_steps=3, out_dir=str(tmp_path / "one")))
    four = pretrain(replace(tiny, max_steps=3, micro_batch_size=2, out_dir=str(tmp_path / "four")))
    assert one.step == four.step == 3
    for (name, a), b in zip(load_state(one.out_dir)["model"].items(), load_state(four.out_dir)["model"].values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_data_loader_workers_give_the_same_training(tiny, tmp_path):
    inline = pretrain(replace(tiny, max_steps=2, out_dir=str(tmp_path / "inline")))
    workers = pretrain(replace(tiny, max_steps=2, num_workers=2, out_dir=str(tmp_path / "workers")))
    for a, b in zip(load_state(inline.out_dir)["model"].values(), load_state(workers.out_dir)["model"].values(),
                    strict=True):
        assert torch.equal(a, b)


def test_ddp_with_gloo_equals_one_process(tiny, tmp_path):
    single = replace(tiny, max_steps=4, out_dir=str(tmp_path / "single"))
    pretrain(single)
    ddp_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "caduceus.cli", "pretrain", "--fasta", tiny.fasta, "--bed", tiny.bed, "--seq-len", "64",
               "--extend-to", "0", "--d-model", "16", "--n-layer", "1", "--batch-size", "8", "--max-steps", "4",
               "--eval-every", "4", "--eval-windows", "16", "--log-every", "1", "--num-workers", "0",
               "--device", "cpu", "--no-progress", "--out-dir", str(ddp_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert train_losses(str(ddp_dir)) == pytest.approx(train_losses(single.out_dir), rel=1e-6, abs=1e-6)
    for (name, a), b in zip(load_state(single.out_dir)["model"].items(), load_state(str(ddp_dir))["model"].values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_batches_of_only_n_give_zero_loss_not_nan(tmp_path):
    fasta = tmp_path / "n.fa"
    fasta.write_text(">allN\n" + "N" * 2048 + "\n")
    config = PretrainConfig(out_dir=str(tmp_path / "run"), fasta=str(fasta), seq_len=64, extend_to=0, d_model=16,
                            n_layer=1, batch_size=8, max_steps=3, log_every=1, num_workers=0, progress=False)
    initial = CaduceusForMaskedLM(CaduceusModelConfig(d_model=16, n_layer=1))
    assert pretrain(config).finished
    assert train_losses(config.out_dir) == [0.0, 0.0, 0.0]
    assert all(float(row[5]) == 0.0 for row in logged(config.out_dir))  # no gradient at all
    state = load_state(config.out_dir)["model"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    assert set(state) == set(initial.state_dict())


def test_corrupt_checkpoint_is_a_clear_error(tiny):
    pretrain(replace(tiny, max_steps=2))
    path = Path(tiny.out_dir) / CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{path}: unreadable checkpoint"):
        pretrain(replace(tiny, max_steps=2))
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        pretrain(replace(tiny, max_steps=2))


def test_checkpoint_of_another_run_is_refused(tiny):
    pretrain(replace(tiny, stop_after_steps=1))
    with pytest.raises(CheckpointError, match="different run.*seq_len: checkpoint 64, now 128"):
        pretrain(replace(tiny, seq_len=128))


def test_weight_decay_spares_biases_a_log_d_and_embeddings():
    for rcps in (False, True):
        model = CaduceusForMaskedLM(CaduceusModelConfig(d_model=16, n_layer=2, rcps=rcps))
        decay, no_decay = parameter_groups(model, 0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        spared = {names[id(p)].rsplit(".", 1)[-1] if "embedding" not in names[id(p)] else "embedding"
                  for p in no_decay["params"]}
        decayed = {names[id(p)] for p in decay["params"]}
        assert spared == {"bias", "A_log", "D", "embedding"}
        assert any(name.endswith("norm.weight") for name in decayed) and any("norm_f" in n for n in decayed)
        assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
        assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


def test_learning_rate_schedule_is_timm_cosine_with_linear_warmup():
    config = PretrainConfig()
    total = 1000
    assert learning_rate(0, total, config) == pytest.approx(1e-6)
    assert learning_rate(50, total, config) == pytest.approx(1e-6 + (8e-3 - 1e-6) / 2)
    cosine_at_warmup_end = 1e-4 + 0.5 * (8e-3 - 1e-4) * (1 + math.cos(0.1 * math.pi))  # timm: cosine of step/total
    assert learning_rate(100, total, config) == pytest.approx(cosine_at_warmup_end)
    assert learning_rate(total, total, config) == pytest.approx(1e-4)
    after_warmup = [learning_rate(s, total, config) for s in range(100, total + 1)]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:], strict=False))


def test_activation_checkpointing_gives_the_same_training(tiny, tmp_path):
    plain = pretrain(replace(tiny, max_steps=2, out_dir=str(tmp_path / "plain")))
    recomputed = pretrain(replace(tiny, max_steps=2, activation_checkpointing=True, out_dir=str(tmp_path / "ckpt")))
    for a, b in zip(load_state(plain.out_dir)["model"].values(), load_state(recomputed.out_dir)["model"].values(),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_ps_model_and_bf16_autocast_train_without_nan(tiny):
    result = pretrain(replace(tiny, rcps=True, precision="bf16", max_steps=3))
    assert result.finished and math.isfinite(result.train_loss) and math.isfinite(result.valid["loss"])


def test_loss_plot_on_request(tiny):
    pytest.importorskip("matplotlib")
    pretrain(replace(tiny, max_steps=4, plot=True))
    assert (Path(tiny.out_dir) / "loss.png").read_bytes()[:4] == b"\x89PNG"
