"""Masked-LM pretraining of Caduceus, written as one readable loop (nanoGPT style, no framework).

Defaults follow the published recipe (spec section 5): AdamW lr 8e-3, betas (0.9, 0.95), weight decay
0.1 except on biases, A_log, D and the embedding; timm's cosine schedule with a 10 % linear warm-up
from 1e-6 down to 1e-4; gradient clipping 1.0; bf16 autocast on GPU (fp32 on CPU); 2^20 tokens per step.

A run is defined by its length (``max_steps`` or ``max_tokens``, which fixes the schedule) and may be
cut into segments: ``time_limit`` / ``stop_after_steps`` / SIGTERM end a segment with a checkpoint, and
running the same command again continues exactly where it stopped (bitwise on CPU), because the
batch of a step depends on the step number only (see ``caduceus.data``).

Under ``torchrun`` (WORLD_SIZE > 1) the same code runs with DDP, each process taking its share of the
global batch. The loss is the sum of the per-token losses divided by the number of targets in the
whole global batch, so N processes compute exactly the gradient that one process would.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from caduceus.configuration import CaduceusModelConfig
from caduceus.data import (
    DEFAULT_EXTEND_TO,
    DEFAULT_MASK_PROB,
    MaskedLMDataset,
    StepBatchSampler,
    WindowDataset,
    open_data,
)
from caduceus.files import atomic_write
from caduceus.modeling import CaduceusForMaskedLM
from caduceus.tokenizer import PAD_ID

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "caduceus-pretrain-checkpoint-v1"
METRICS_NAME = "metrics.csv"
MODEL_DIR_NAME = "model"
SUMMARY_NAME = "training_summary.json"
DEFAULT_STEPS = 10_000  # the published 1k models
NO_WEIGHT_DECAY = ("bias", "A_log", "D")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unreadable, or written by a different run)."""


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs. Fields up to ``seed`` define the run: a resumed segment must
    agree on them. The fields after it only steer this process and may change between segments."""

    out_dir: str = "pretrain-out"
    # data: a FASTA or a packed genome, and optionally a BED of splits
    fasta: str | None = None
    packed: str | None = None
    bed: str | None = None
    seq_len: int = 1024
    extend_to: int = DEFAULT_EXTEND_TO
    mask_prob: float = DEFAULT_MASK_PROB
    rc_aug: bool | None = None  # None: on for Ph, off for PS (which is RC-equivariant by construction)
    # model
    d_model: int = 118
    n_layer: int = 4
    rcps: bool = False
    # optimisation
    batch_size: int = 1024  # sequences per step, over all processes
    max_steps: int | None = None  # length of the run; default DEFAULT_STEPS unless max_tokens is given
    max_tokens: int | None = None  # alternatively: max_steps = max_tokens // (batch_size * seq_len)
    lr: float = 8e-3
    min_lr: float = 1e-4
    warmup_init_lr: float = 1e-6
    warmup_fraction: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    # this process only
    micro_batch_size: int | None = None  # sequences per forward pass per process; default: the whole share
    activation_checkpointing: bool = False
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 otherwise), fp32, bf16, fp16
    device: str = "auto"
    time_limit: float | None = None  # seconds for this process, then checkpoint and stop
    stop_after_steps: int | None = None  # end this segment at this global step
    eval_every: int = 500
    eval_windows: int = 512
    checkpoint_every: int = 500
    log_every: int = 10
    num_workers: int = 2
    plot: bool = False
    progress: bool = True

    def run_identity(self) -> dict[str, object]:
        """The fields a resumed segment must share with the checkpoint (all up to ``seed``)."""
        names = [f.name for f in fields(self)]
        identity = {name: getattr(self, name) for name in names[names.index("seq_len") : names.index("seed") + 1]}
        identity.update(rc_aug=self.resolved_rc_aug(), max_steps=self.total_steps(), max_tokens=None)
        return identity

    def total_steps(self) -> int:
        if self.max_steps is not None and self.max_tokens is not None:
            raise ValueError("give max_steps or max_tokens, not both")
        if self.max_tokens is not None:
            return max(1, self.max_tokens // (self.batch_size * self.seq_len))
        return self.max_steps if self.max_steps is not None else DEFAULT_STEPS

    def resolved_rc_aug(self) -> bool:
        return (not self.rcps) if self.rc_aug is None else self.rc_aug


@dataclass
class PretrainResult:
    step: int  # global step reached
    finished: bool  # reached the end of the run (and exported the model)
    out_dir: Path
    train_loss: float | None  # last logged training loss
    valid: dict[str, float] | None  # last validation metrics


# ----------------------------------------------------------------------------------------------
# Processes and devices


@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device
    owns_process_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor


def init_distributed(device_name: str) -> Distributed:
    """One process, or (WORLD_SIZE > 1, as torchrun sets) one rank of a process group: nccl on CUDA, gloo
    on CPU, each rank on GPU LOCAL_RANK."""
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(0, 1, device, owns_process_group=False)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), device, owns)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    choices = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in choices:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16; got {precision!r}")
    return choices[precision]


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay everything except biases, A_log, D and the embedding (and so the tied head), as published;
    RMSNorm weights are decayed. Tied parameters are listed once."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        skip = name.rsplit(".", 1)[-1] in NO_WEIGHT_DECAY or "embedding" in name
        (no_decay if skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, total_steps: int, config: PretrainConfig) -> float:
    """timm ``CosineLRScheduler`` as configured upstream (per step, warmup_prefix=False): linear warm-up
    from ``warmup_init_lr`` over the first ``warmup_fraction`` of the steps, then the cosine of step/total."""
    warmup_steps = int(config.warmup_fraction * total_steps)
    if step < warmup_steps:
        return config.warmup_init_lr + (config.lr - config.warmup_init_lr) * step / warmup_steps
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * step / total_steps))


# ----------------------------------------------------------------------------------------------
# Checkpoints


def rng_states() -> dict:
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {**numpy_state, "state": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                                           "pos": numpy_state["state"]["pos"]}},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    key = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state({**numpy_state, "state": {"key": key, "pos": numpy_state["state"]["pos"]}})
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write)


def load_checkpoint(path: Path, config: PretrainConfig) -> dict:
    """Read a checkpoint and check that it belongs to this run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({type(error).__name__}: {error}); delete it to start afresh"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a caduceus pretraining checkpoint")
    saved, now = state["identity"], config.run_identity()
    differences = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in now.items() if saved.get(k) != v]
    if differences:
        raise CheckpointError(
            f"{path} belongs to a different run ({'; '.join(differences)}); use another out_dir or the same settings"
        )
    return state


# ----------------------------------------------------------------------------------------------
# Logging


class MetricsLog:
    """metrics.csv (one row per logged step and split), and TensorBoard events when tensorboard is
    installed. On resume, rows after the checkpoint's step (written before an interruption) are dropped."""

    COLUMNS = ("step", "tokens", "elapsed_s", "split", "loss", "accuracy", "perplexity", "lr", "grad_norm",
               "tokens_per_s")

    def __init__(self, out_dir: Path, resume_step: int) -> None:
        self.path = out_dir / METRICS_NAME
        kept = []
        if resume_step > 0 and self.path.is_file():
            with open(self.path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]

        def write(temporary: str) -> None:
            with open(temporary, "w", newline="") as handle:
                writer = csv.DictWriter(handle, self.COLUMNS)
                writer.writeheader()
                writer.writerows(kept)

        atomic_write(self.path, write)
        self.handle = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.handle, self.COLUMNS)
        try:
            from torch.utils.tensorboard import SummaryWriter

            purge_after = resume_step + 1 if resume_step else None  # events logged after the checkpoint
            self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge_after)
        except ImportError:
            self.tensorboard = None

    def write(self, step: int, split: str, **values: float) -> None:
        self.writer.writerow({"step": step, "split": split, **values})
        self.handle.flush()
        if self.tensorboard is not None:
            for name, value in values.items():
                if name not in ("tokens", "elapsed_s"):
                    self.tensorboard.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def plot_metrics(csv_path: Path, png_path: Path) -> None:
    """Training and validation loss against step, as a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    figure, axis = plt.subplots(figsize=(7, 4))
    for split in ("train", "valid"):
        points = [(int(r["step"]), float(r["loss"])) for r in rows if r["split"] == split]
        if points:
            axis.plot(*zip(*points, strict=True), label=f"{split} MLM loss", marker="o" if split == "valid" else None)
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy (nats)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(png_path, lambda path: figure.savefig(path, format="png", dpi=120))
    plt.close(figure)


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: MaskedLMDataset,
    keys: list[tuple[int, int]],
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    processes: Distributed,
) -> dict[str, float] | None:
    """Masked-LM loss, accuracy and perplexity over the targets of ``keys`` (shared out over processes)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, targets
    mine = keys[processes.rank :: processes.world_size]
    for start in range(0, len(mine), batch_size):
        examples = [dataset[key] for key in mine[start : start + batch_size]]
        inputs, targets = (torch.stack(column).to(device).long() for column in zip(*examples, strict=True))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(inputs).logits.float()
        selected = targets != PAD_ID
        totals[0] += F.cross_entropy(logits[selected], targets[selected], reduction="sum")
        totals[1] += (logits[selected].argmax(-1) == targets[selected]).sum()
        totals[2] += selected.sum()
    model.train(was_training)
    loss_sum, correct, count = processes.all_reduce_sum(totals).tolist()
    if count == 0:
        return None
    return {"loss": loss_sum / count, "accuracy": correct / count, "perplexity": math.exp(loss_sum / count)}


def evaluation_keys(n_windows: int, count: int) -> list[tuple[int, int]]:
    """A fixed, evenly spread subset of ``count`` windows (masking fixed too: epoch 0)."""
    indices = np.unique(np.linspace(0, n_windows - 1, min(count, n_windows)).round().astype(np.int64))
    return [(0, int(i)) for i in indices] if n_windows else []


# ----------------------------------------------------------------------------------------------
# Training


class StopRequest:
    """Turns SIGTERM / SIGINT into a request to checkpoint and stop at the next step."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: no signal handling
                self.previous[sig] = signal.signal(sig, self.request)
        return self

    def request(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Run (or continue) the pretraining described by ``config``; see the module docstring."""
    processes = init_distributed(config.device)
    try:
        with StopRequest() as stop_request:
            return _pretrain(config, processes, stop_request)
    finally:
        if processes.owns_process_group:
            dist.destroy_process_group()


def _pretrain(config: PretrainConfig, processes: Distributed, stop_request: StopRequest) -> PretrainResult:
    process_start = time.time()
    device, world_size = processes.device, processes.world_size
    total_steps = config.total_steps()
    amp_dtype = autocast_dtype(config.precision, device)
    micro_batch_size = config.micro_batch_size or config.batch_size // world_size
    if config.plot:
        import matplotlib  # noqa: F401  (fail now rather than at the end of the run)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / CHECKPOINT_NAME

    genome, intervals = open_data(config.fasta, config.packed, config.bed)
    train_windows = WindowDataset(genome, intervals, "train", config.seq_len, config.extend_to)
    valid_windows = WindowDataset(genome, intervals, "valid", config.seq_len, config.extend_to)
    train_data = MaskedLMDataset(train_windows, config.seed, config.mask_prob, config.resolved_rc_aug())
    valid_data = MaskedLMDataset(valid_windows, config.seed, config.mask_prob, rc_aug=False)
    valid_keys = evaluation_keys(len(valid_windows), config.eval_windows)

    torch.manual_seed(config.seed)
    model = CaduceusForMaskedLM(CaduceusModelConfig(d_model=config.d_model, n_layer=config.n_layer, rcps=config.rcps))
    model.caduceus.backbone.gradient_checkpointing = config.activation_checkpointing
    model.to(device)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_step, train_seconds = 0, 0.0
    if checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"])
        start_step, train_seconds = state["step"], state["train_seconds"]
        if start_step >= total_steps:  # nothing left to do; keep the exported model and its summary as they are
            return PretrainResult(start_step, True, out_dir, None, None)

    sampler = StepBatchSampler(len(train_windows), config.batch_size, micro_batch_size, config.seed, start_step,
                               total_steps, processes.rank, world_size)
    micro_batches_per_step = sampler.share // micro_batch_size
    loader = DataLoader(train_data, batch_sampler=sampler, num_workers=config.num_workers,
                        pin_memory=device.type == "cuda")
    trained = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world_size > 1 else model
    trained.train()
    tokens_per_step = config.batch_size * config.seq_len
    log = MetricsLog(out_dir, start_step) if processes.is_main else None
    progress = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                    disable=not (processes.is_main and config.progress))

    def checkpoint(step: int) -> None:
        if processes.is_main:
            save_checkpoint(checkpoint_path, {
                "format": CHECKPOINT_FORMAT, "identity": config.run_identity(), "step": step,
                "tokens": step * tokens_per_step, "train_seconds": train_seconds + time.time() - segment_start,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "rng": rng_states(),
            })

    def validate(step: int) -> dict[str, float] | None:
        metrics = evaluate(model, valid_data, valid_keys, micro_batch_size, device, amp_dtype, processes)
        if metrics is not None and log is not None:
            log.write(step, "valid", tokens=step * tokens_per_step, elapsed_s=round(time.time() - process_start, 2),
                      **metrics)
            progress.write(f"step {step}: valid loss {metrics['loss']:.4f} accuracy {metrics['accuracy']:.4f} "
                           f"perplexity {metrics['perplexity']:.4f}")
        return metrics

    step, last_log_step, train_loss, valid_metrics = start_step, start_step, None, None
    interval = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, targets since the last log
    segment_start = interval_start = time.time()
    batches = iter(loader)
    while step < total_steps:
        elapsed = time.time() - process_start
        seconds_per_step = (time.time() - segment_start) / max(step - start_step, 1)
        stop = stop_request.requested or (config.stop_after_steps is not None and step >= config.stop_after_steps) \
            or (config.time_limit is not None and elapsed + 2 * seconds_per_step > config.time_limit)
        micro_batches = [next(batches) for _ in range(micro_batches_per_step)]
        local_targets = sum(int((targets != PAD_ID).sum()) for _, targets in micro_batches)
        # One collective per step: the global number of targets, and whether any process wants to stop.
        agreed = torch.tensor([local_targets, int(stop)], dtype=torch.float64,
                              device=device if world_size > 1 else "cpu")
        n_targets, stop_votes = processes.all_reduce_sum(agreed).tolist()
        if stop_votes > 0:
            break

        lr = learning_rate(step, total_steps, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for index, (inputs, targets) in enumerate(micro_batches):
            inputs = inputs.to(device, non_blocking=True).long()
            targets = targets.to(device, non_blocking=True).long()
            last = index == micro_batches_per_step - 1
            with contextlib.nullcontext() if last or world_size == 1 else trained.no_sync():
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    logits = trained(inputs).logits
                loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                           ignore_index=PAD_ID, reduction="sum")
                # DDP averages gradients over processes: scale so that the average is d(global sum)/n_targets.
                scaler.scale(loss_sum * (world_size / max(n_targets, 1))).backward()
            interval[0] += loss_sum.detach()
        interval[1] += local_targets
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.update()

        if step % config.log_every == 0 or step == total_steps:
            loss_sum_all, targets_all = processes.all_reduce_sum(interval.clone()).tolist()
            now = time.time()
            train_loss = loss_sum_all / max(targets_all, 1)
            tokens_per_s = tokens_per_step * (step - last_log_step) / (now - interval_start)
            if log is not None:
                log.write(step, "train", tokens=step * tokens_per_step, elapsed_s=round(now - process_start, 2),
                          loss=train_loss, lr=lr, grad_norm=float(grad_norm), tokens_per_s=round(tokens_per_s))
            progress.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", lr=f"{lr:.2e}")
            interval.zero_()
            interval_start, last_log_step = now, step
        if valid_keys and (step % config.eval_every == 0 or step == total_steps):
            valid_metrics = validate(step)
        if step % config.checkpoint_every == 0 and step < total_steps:
            checkpoint(step)
    progress.close()

    finished = step == total_steps
    checkpoint(step)
    if finished and processes.is_main:
        export_model(model, out_dir / MODEL_DIR_NAME, config, step, train_seconds + time.time() - segment_start,
                     world_size, device, valid_metrics)
    if log is not None:
        log.close()
        if config.plot:
            plot_metrics(log.path, out_dir / "loss.png")
    if world_size > 1:
        dist.barrier()
    return PretrainResult(step, finished, out_dir, train_loss, valid_metrics)


def export_model(
    model: CaduceusForMaskedLM,
    directory: Path,
    config: PretrainConfig,
    step: int,
    train_seconds: float,
    world_size: int,
    device: torch.device,
    valid_metrics: dict[str, float] | None,
) -> None:
    """The trained model in the published layout, plus a summary of how it was trained (for its card)."""
    model.save_pretrained(directory)
    summary = {
        "steps": step,
        "tokens": step * config.batch_size * config.seq_len,
        "train_seconds": round(train_seconds, 1),
        "processes": world_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "valid": valid_metrics,
        "config": config.run_identity() | {"data": config.packed or config.fasta, "bed": config.bed},
    }
    atomic_write(directory / SUMMARY_NAME, lambda path: Path(path).write_text(json.dumps(summary, indent=2) + "\n"))


# ----------------------------------------------------------------------------------------------
# `caduceus pretrain`


def add_command(subparsers) -> None:
    """Register ``caduceus pretrain``."""
    defaults = PretrainConfig()
    parser = subparsers.add_parser(
        "pretrain",
        help="masked-LM pretraining from a FASTA (or packed genome) with BED splits; resumable; torchrun-ready",
        description="Masked-LM pretraining with the published Caduceus recipe. Running the same command again "
        "resumes from OUT_DIR/checkpoint.pt. Under torchrun it runs with DDP.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--fasta", help="FASTA file (plain, or bgzip with biopython), indexed on first use")
    data.add_argument("--packed", help="packed genome directory from `caduceus data pack` (uses its splits.bed)")
    data.add_argument("--bed", help="BED of splits: chrom start end train|valid|test (default: all train)")
    data.add_argument("--seq-len", type=int, default=defaults.seq_len)
    data.add_argument("--extend-to", type=int, default=defaults.extend_to,
                      help="extend each interval to this many bases before cutting windows")
    data.add_argument("--mask-prob", type=float, default=defaults.mask_prob)
    data.add_argument("--rc-aug", action=argparse.BooleanOptionalAction, default=None,
                      help="reverse-complement augmentation p=0.5 (default: on for Ph, off for PS)")
    model = parser.add_argument_group("model")
    model.add_argument("--d-model", type=int, default=defaults.d_model)
    model.add_argument("--n-layer", type=int, default=defaults.n_layer)
    model.add_argument("--rcps", action="store_true", help="PS model (RC-equivariant); default Ph")
    model.add_argument("--activation-checkpointing", action="store_true",
                       help="recompute each layer in the backward pass (long sequences)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per step, all ranks")
    optim.add_argument("--micro-batch-size", type=int, help="sequences per forward pass per rank (accumulate)")
    optim.add_argument("--max-steps", type=int, help=f"length of the run (default {DEFAULT_STEPS})")
    optim.add_argument("--max-tokens", type=int, help="length of the run in tokens, instead of --max-steps")
    optim.add_argument("--lr", type=float, default=defaults.lr)
    optim.add_argument("--min-lr", type=float, default=defaults.min_lr)
    optim.add_argument("--warmup-fraction", type=float, default=defaults.warmup_fraction)
    optim.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    optim.add_argument("--grad-clip", type=float, default=defaults.grad_clip)
    optim.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=defaults.precision)
    optim.add_argument("--seed", type=int, default=defaults.seed)
    run = parser.add_argument_group("run")
    run.add_argument("--out-dir", default=defaults.out_dir, help="checkpoint, metrics.csv, model/ at the end")
    run.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1 ...")
    run.add_argument("--time-limit", type=float, help="seconds for this command, then checkpoint and stop")
    run.add_argument("--stop-after-steps", type=int, help="end this segment at this global step")
    run.add_argument("--eval-every", type=int, default=defaults.eval_every)
    run.add_argument("--eval-windows", type=int, default=defaults.eval_windows)
    run.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    run.add_argument("--log-every", type=int, default=defaults.log_every)
    run.add_argument("--num-workers", type=int, default=defaults.num_workers, help="data loader processes")
    run.add_argument("--plot", action="store_true", help="write OUT_DIR/loss.png (needs matplotlib)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    names = {f.name for f in fields(PretrainConfig)}
    result = pretrain(PretrainConfig(**{k: v for k, v in vars(args).items() if k in names}))
    if int(os.environ.get("RANK", "0")) == 0:
        outcome = f"finished; model in {result.out_dir / MODEL_DIR_NAME}" if result.finished else "stopped"
        print(f"step {result.step}: {outcome}" + ("" if result.finished else "; run the same command to resume"))
    return 0
