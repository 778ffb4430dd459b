"""Fine-tuning, Helical style: ``CaduceusFineTuningModel`` and its heads.

The constructor, ``train(...)`` (names, order, defaults), ``get_outputs`` and the ``save_model`` /
``load_model`` state-dict layout (``model.backbone.*``, ``fine_tuning_head.linear.*``) are the
reference's (docs/helical-api.md section 4). Fixed or added: shuffling (seeded), RC augmentation,
working conjoined (both-strand) training and evaluation, validation metrics per epoch, early stopping,
multi-output regression labels, gradient clipping, mixed precision on GPU, a returned history, a working
``.eval()`` and ``forward``, input checks before any work, no unpickling, and ``save_pretrained`` /
``from_pretrained`` that restore the head.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import warnings
from abc import ABC, abstractmethod
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from caduceus import metrics
from caduceus.api import Caduceus, CaduceusConfig, autocast, pool, progress_bar
from caduceus.dna_dataset import DNADataset, base_mask
from caduceus.files import atomic_write
from caduceus.modeling import CaduceusForMaskedLM
from caduceus.tokenizer import reverse_complement_batch

HEAD_WEIGHTS_NAME = "fine_tuning_head.safetensors"
FINE_TUNING_CONFIG_NAME = "fine_tuning.json"


class FineTuningHead(nn.Module, ABC):
    """Base class of heads. A head builds its layers in ``set_dim_size`` (called with d_model once the
    backbone is known), maps pooled embeddings (B, d_model) to (B, output_size), and sets ``output_size``."""

    output_size: int

    @abstractmethod
    def set_dim_size(self, dim: int) -> None: ...

    @abstractmethod
    def forward(self, pooled: torch.Tensor) -> torch.Tensor: ...


class LinearHead(FineTuningHead):
    """Dropout then a linear layer, the reference heads."""

    def __init__(self, output_size: int, dropout: float = 0.02) -> None:
        super().__init__()
        if not isinstance(output_size, int) or output_size < 1:
            raise ValueError(f"output_size must be a positive integer, got {output_size!r}")
        self.output_size = output_size
        self.dropout = nn.Dropout(dropout)

    def set_dim_size(self, dim: int) -> None:
        self.linear = nn.Linear(dim, self.output_size)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(pooled))


class ClassificationHead(LinearHead):
    def __init__(self, num_classes: int, dropout: float = 0.02) -> None:
        super().__init__(num_classes, dropout)


class RegressionHead(LinearHead):
    def __init__(self, num_outputs: int, dropout: float = 0.02) -> None:
        super().__init__(num_outputs, dropout)


HEAD_TYPES: dict[str, type[LinearHead]] = {"classification": ClassificationHead, "regression": RegressionHead}


def build_head(fine_tuning_head: str | FineTuningHead, output_size: int | None) -> FineTuningHead:
    """The reference's head choice and its errors: a name needs ``output_size``; an instance is used as is."""
    if isinstance(fine_tuning_head, str):
        if fine_tuning_head not in HEAD_TYPES:
            raise NotImplementedError("Not implemented fine-tuning head.")
        if output_size is None:
            raise ValueError(f"The output_size must be specified for a {fine_tuning_head} head.")
        return HEAD_TYPES[fine_tuning_head](output_size)
    if not isinstance(fine_tuning_head, FineTuningHead):
        raise ValueError(
            "The fine_tuning_head must be 'classification', 'regression' or a valid "
            f"'caduceus.fine_tuning.FineTuningHead' instance, got {type(fine_tuning_head).__name__}."
        )
    return fine_tuning_head


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    name: str = "linear",
    num_warmup_steps: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The common ``transformers.get_scheduler`` schedules (what the reference's ``lr_scheduler_params``
    name), stepped once per batch: linear warm-up, then linear decay, cosine decay or constant."""
    def warmup_then(decay):
        def factor(step: int) -> float:
            if step < num_warmup_steps:
                return step / max(1, num_warmup_steps)
            return decay(min(1.0, (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)))
        return factor

    decays = {
        "linear": lambda progress: 1.0 - progress,
        "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
        "constant_with_warmup": lambda progress: 1.0,
    }
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if name not in decays:
        raise ValueError(f"unknown lr scheduler {name!r}; supported: {['constant', *decays]}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then(decays[name]))


class CaduceusFineTuningModel(nn.Module, Caduceus):
    """A Caduceus backbone with a head, trained on labelled sequences.

    Args:
        caduceus_config: the ``CaduceusConfig`` (model, batch size, pooling, device…).
        fine_tuning_head: ``"classification"``, ``"regression"`` or a ``FineTuningHead`` instance.
        output_size: number of classes or of regression outputs (for a head given by name).

    Submodules: ``model`` (the backbone) and ``fine_tuning_head``. The head sees the pooled d_model
    embedding of each strand it is given (PS: always both; Ph: both when conjoined) and the strands'
    outputs are averaged, so PS outputs are reverse-complement invariant.
    """

    def __init__(
        self,
        caduceus_config: CaduceusConfig,
        fine_tuning_head: str | FineTuningHead,
        output_size: int | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.fine_tuning_head = build_head(fine_tuning_head, output_size)
        Caduceus.__init__(self, caduceus_config)
        self.fine_tuning_head.set_dim_size(self.pretrained_config.d_model)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, conjoin: bool = False
    ) -> torch.Tensor:
        """Head outputs (B, output_size) for left-padded ids; ``conjoin`` runs both strands of a Ph model."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        bases = base_mask(input_ids, attention_mask)
        strands = self._strands(input_ids, bases, both=self.is_ps or conjoin)
        outputs = [self.fine_tuning_head(pool(s, bases, self.config["pooling_strategy"])) for s in strands]
        return torch.stack(outputs).mean(dim=0)

    # ----- training -----

    def train(
        self,
        train_dataset: DNADataset | bool = True,
        train_labels: np.ndarray | list | None = None,
        optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
        optimizer_params: dict = {"lr": 1e-4},  # noqa: B006 (the reference's default; never mutated)
        loss_function: nn.Module = nn.CrossEntropyLoss(),  # noqa: B008 (the reference's default)
        epochs: int = 1,
        trainable_layers: int = 2,
        validation_dataset: DNADataset | None = None,
        validation_labels: np.ndarray | list | None = None,
        lr_scheduler_params: dict | None = None,
        conjoin_train: bool = False,
        conjoin_eval: bool = False,
        shuffle: bool = True,
        seed: int | None = 0,
        rc_augment: bool = False,
        max_grad_norm: float | None = None,
        early_stopping_patience: int | None = None,
        mixed_precision: bool | None = None,
        progress: bool | None = None,
    ) -> dict[str, list[float]] | CaduceusFineTuningModel:
        """Fine-tune on ``train_dataset`` (from ``process_data``) and its labels; returns the history.

        Reference arguments: the optimizer class and its params; the loss (``CrossEntropyLoss`` takes
        class ids; for regression pass e.g. ``nn.MSELoss()`` and float labels (N,) or (N, output_size));
        ``trainable_layers``: with n > 0 only the last n backbone layers and the head train, the embedding
        and final norm stay frozen (and freezing persists across calls); n <= 0 freezes nothing.
        ``lr_scheduler_params``: e.g. ``{"name": "linear", "num_warmup_steps": 0}``, stepped per batch.
        ``conjoin_train`` / ``conjoin_eval``: run both strands of a Ph model in training / evaluation.

        Added: ``shuffle`` (seeded by ``seed``), ``rc_augment`` (each training sequence replaced by its
        reverse complement with probability 1/2, for Ph), ``max_grad_norm`` (clipping),
        ``early_stopping_patience`` (epochs without a better validation loss; the best weights are
        restored), ``mixed_precision`` (``None``: bfloat16 autocast on CUDA or when the config's dtype is
        bfloat16). Validation metrics per epoch: accuracy, MCC, AUROC (classification) or MSE, Pearson.

        ``train(True)`` / ``train(False)`` (as ``nn.Module.train`` and ``.eval()`` call it) set the mode.
        """
        if isinstance(train_dataset, bool):
            return nn.Module.train(self, train_dataset)
        train_data = self._labelled(train_dataset, train_labels, loss_function, "train")
        validation_data = None
        if validation_dataset is not None or validation_labels is not None:
            if validation_dataset is None or validation_labels is None:
                raise ValueError("validation needs both validation_dataset and validation_labels")
            validation_data = self._labelled(validation_dataset, validation_labels, loss_function, "validation")
        if early_stopping_patience is not None and validation_data is None:
            raise ValueError("early stopping needs validation data (validation_dataset and validation_labels)")
        if self.is_ps and rc_augment:
            warnings.warn("rc_augment has no effect on a PS model, which is reverse-complement invariant",
                          stacklevel=2)

        progress = self.config["progress"] if progress is None else progress
        self._freeze(trainable_layers)
        optimizer = optimizer(self.parameters(), **optimizer_params)
        self.to(self.device)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        loader = self._dataloader(train_data, shuffle=shuffle, generator=generator)
        scheduler = None
        if lr_scheduler_params is not None:
            scheduler = make_scheduler(optimizer, num_training_steps=epochs * len(loader), **lr_scheduler_params)
        compute_dtype = self._training_dtype(mixed_precision)
        scaler = torch.amp.GradScaler(torch.device(self.device).type, enabled=compute_dtype == torch.float16)

        history: dict[str, list[float]] = defaultdict(list)
        best_loss, best_state, stale_epochs = math.inf, None, 0
        for epoch in range(1, epochs + 1):
            nn.Module.train(self, True)
            total_loss, seen = 0.0, 0
            bar = progress_bar(loader, progress, f"Fine-Tuning: epoch {epoch}/{epochs}", unit="batch")
            for batch in bar:
                input_ids = batch["input_ids"].to(self.device)
                attention_mask = batch["attention_mask"].to(self.device)
                labels = batch["labels"].to(self.device)
                if rc_augment and not self.is_ps:
                    flip = (torch.rand(len(input_ids), generator=generator) < 0.5).to(self.device)
                    input_ids = torch.where(flip[:, None], reverse_complement_batch(input_ids, attention_mask),
                                            input_ids)
                with autocast(self.device, compute_dtype):
                    outputs = self(input_ids, attention_mask, conjoin=conjoin_train)
                loss = loss_function(outputs.float(), labels)
                optimizer.zero_grad()
                scaler.scale(loss).backward()
                if max_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(self.parameters(), max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                if scheduler is not None:
                    scheduler.step()
                total_loss += loss.item() * len(labels)
                seen += len(labels)
                bar.set_postfix(loss=total_loss / seen)
            history["epoch"].append(epoch)
            history["train_loss"].append(total_loss / seen)
            if validation_data is None:
                continue
            for name, value in self._evaluate(validation_data, loss_function, conjoin_eval, progress).items():
                history[f"val_{name}"].append(value)
            if history["val_loss"][-1] < best_loss:
                best_loss, stale_epochs = history["val_loss"][-1], 0
                if early_stopping_patience is not None:
                    best_state = copy.deepcopy(self.state_dict())
            else:
                stale_epochs += 1
                if early_stopping_patience is not None and stale_epochs >= early_stopping_patience:
                    break
        if best_state is not None:
            self.load_state_dict(best_state)
        nn.Module.train(self, True)  # as the reference leaves it
        return dict(history)

    def _training_dtype(self, mixed_precision: bool | None) -> torch.dtype:
        device_type = torch.device(self.device).type
        if mixed_precision is None:
            mixed_precision = device_type == "cuda" or self.dtype != torch.float32
        if not mixed_precision:
            return torch.float32
        if device_type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16

    def _freeze(self, trainable_layers: int) -> None:
        """The reference's freezing: with n > 0, the backbone is frozen except its last n layers."""
        if trainable_layers <= 0:
            return
        self.model.backbone.requires_grad_(False)
        for layer in self.model.backbone.layers[-trainable_layers:]:
            layer.requires_grad_(True)

    def _labelled(
        self, dataset: DNADataset, labels: object, loss_function: nn.Module, what: str
    ) -> DNADataset:
        """The dataset with its labels checked and attached, or a clear error before any training."""
        if not isinstance(dataset, DNADataset):
            raise TypeError(f"{what}_dataset: expected the dataset returned by process_data, "
                            f"got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError(f"{what}_dataset is empty")
        if dataset.is_windowed:
            raise ValueError(f"{what}_dataset is windowed (process_data(windows=True)); fine-tuning needs one "
                             "row per sequence: process the data with windows=False")
        if labels is None:
            raise ValueError(f"{what}_labels are missing")
        return dataset.with_labels(self._check_labels(np.asarray(labels), len(dataset), loss_function, what))

    def _check_labels(self, labels: np.ndarray, count: int, loss_function: nn.Module, what: str) -> torch.Tensor:
        output_size = self.fine_tuning_head.output_size
        if len(labels) != count:
            raise ValueError(f"{what}_labels: {len(labels)} labels for {count} sequences")
        if labels.dtype.kind not in "iubf":
            raise TypeError(f"{what}_labels must be numbers, got {labels.dtype} values")
        if labels.dtype.kind == "f":
            nan_rows = np.flatnonzero(np.isnan(labels.reshape(count, -1)).any(axis=1))
            if nan_rows.size:
                raise ValueError(f"{what}_labels: NaN at index {nan_rows[0]}")
        if isinstance(loss_function, nn.CrossEntropyLoss):
            if isinstance(self.fine_tuning_head, RegressionHead):
                raise ValueError("a regression head needs a regression loss, e.g. loss_function=torch.nn.MSELoss()")
            if labels.ndim != 1 or labels.dtype.kind not in "iu":
                raise TypeError(f"{what}_labels: CrossEntropyLoss needs one integer class id per sequence, "
                                f"got {labels.dtype} labels of shape {labels.shape}")
            bad = np.flatnonzero((labels < 0) | (labels >= output_size))
            if bad.size:
                raise ValueError(f"{what}_labels: class id {labels[bad[0]]} at index {bad[0]} is outside "
                                 f"0..{output_size - 1} (output_size={output_size})")
            return torch.from_numpy(labels.astype(np.int64))
        targets = labels.astype(np.float32).reshape(count, -1)
        if targets.shape[1] != output_size:
            raise ValueError(f"{what}_labels: {targets.shape[1]} values per sequence for a head with "
                             f"output_size={output_size}")
        return torch.from_numpy(targets)

    # ----- outputs and evaluation -----

    def _predict(self, dataset: DNADataset, conjoin: bool, progress: bool | None, desc: str) -> np.ndarray:
        self.to(self.device)
        nn.Module.train(self, False)
        outputs = []
        with torch.inference_mode(), autocast(self.device, self.dtype):
            for batch in progress_bar(self._dataloader(dataset), progress, desc, unit="batch"):
                outputs.append(self(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                                    conjoin=conjoin).float().cpu())
        return torch.cat(outputs).numpy()

    def get_outputs(self, dataset: DNADataset, conjoin: bool = False, progress: bool | None = None) -> np.ndarray:
        """Raw head outputs (logits for classification), float32 (N, output_size), in evaluation mode."""
        if isinstance(dataset, DNADataset) and dataset.is_windowed:
            raise ValueError("get_outputs needs one row per sequence: process the data with windows=False")
        return self._predict(dataset, conjoin, self.config["progress"] if progress is None else progress,
                             "Generating outputs")

    def _evaluate(
        self, dataset: DNADataset, loss_function: nn.Module, conjoin: bool, progress: bool | None
    ) -> dict[str, float]:
        outputs = self._predict(dataset, conjoin, progress, "Fine-Tuning Validation")
        labels = dataset.labels
        with torch.no_grad():
            loss = loss_function(torch.from_numpy(outputs).to(self.device), labels.to(self.device)).item()
        if isinstance(loss_function, nn.CrossEntropyLoss):
            return {"loss": loss, **metrics.classification_metrics(labels.numpy(), outputs)}
        return {"loss": loss, **metrics.regression_metrics(labels.numpy(), outputs)}

    # ----- checkpoints -----

    def save_model(self, path: str | os.PathLike) -> None:
        """Save the full state dict (``model.backbone.*``, ``fine_tuning_head.*``): a torch file as the
        reference writes it, or safetensors when the path ends in ``.safetensors``."""
        state = self.state_dict()
        if str(path).endswith(".safetensors"):
            save_file({k: v.detach().cpu().clone().contiguous() for k, v in state.items()}, str(path))
        else:
            torch.save(state, path)

    def load_model(self, path: str | os.PathLike) -> None:
        """Load a state dict saved by ``save_model`` (or the reference's): full, backbone under
        ``model.*`` only (with a warning), or a bare backbone. Never unpickles arbitrary objects."""
        state = _read_state_dict(Path(path))
        has_model = any(k.startswith("model.") for k in state)
        has_head = any(k.startswith("fine_tuning_head.") for k in state)
        if has_model and has_head:
            self.load_state_dict(state)
        elif has_model:
            warnings.warn(f"{path}: no fine-tuning head weights; only the backbone was loaded", stacklevel=2)
            self.load_state_dict(state, strict=False)
        else:
            self.model.load_state_dict(state)
        nn.Module.train(self, False)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write a directory that ``from_pretrained`` rebuilds without any other argument: the backbone
        in the published layout (``config.json``, ``model.safetensors``; also a plain model directory),
        the head weights, and ``fine_tuning.json`` (head type and size, pooling, batch size, length cap)."""
        directory = Path(save_directory)
        masked_lm = CaduceusForMaskedLM(self.pretrained_config)
        masked_lm.caduceus = self.model
        masked_lm.tie_weights()
        masked_lm.save_pretrained(directory)
        head = self.fine_tuning_head
        head_type = next((name for name, cls in HEAD_TYPES.items() if type(head) is cls), None)
        settings = {
            "head": {
                "type": head_type or f"{type(head).__module__}.{type(head).__qualname__}",
                "output_size": head.output_size,
                "dropout": head.dropout.p if head_type else None,
            },
            "config": {
                "pooling_strategy": self.config["pooling_strategy"],
                "batch_size": self.config["batch_size"],
                "max_length": self.max_length,
            },
            "base_model": self.config["model_name"],
        }
        head_state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        atomic_write(directory / HEAD_WEIGHTS_NAME, lambda tmp: save_file(head_state, tmp))
        atomic_write(directory / FINE_TUNING_CONFIG_NAME,
                      lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2) + "\n"))

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        fine_tuning_head: FineTuningHead | None = None,
        **config_kwargs: object,
    ) -> CaduceusFineTuningModel:
        """Rebuild a model saved by ``save_pretrained``, in evaluation mode. ``config_kwargs`` override
        the saved settings or add others (``device``, ``dtype``…); a custom head class must be passed as
        a fresh instance (``fine_tuning_head``), as its code is not stored."""
        directory = Path(directory)
        settings_path = directory / FINE_TUNING_CONFIG_NAME
        if not settings_path.is_file():
            raise FileNotFoundError(f"{settings_path}: not found; is {directory} a save_pretrained directory?")
        settings = json.loads(settings_path.read_text(encoding="utf-8"))
        head_settings = settings["head"]
        if fine_tuning_head is None:
            if head_settings["type"] not in HEAD_TYPES:
                raise ValueError(f"{directory} holds a custom head ({head_settings['type']}); pass a new instance "
                                 "of it as fine_tuning_head=")
            head_class = HEAD_TYPES[head_settings["type"]]
            fine_tuning_head = head_class(head_settings["output_size"], head_settings["dropout"])
        config = CaduceusConfig(model_name=directory, **{**settings["config"], **config_kwargs})
        model = cls(config, fine_tuning_head)
        model.fine_tuning_head.load_state_dict(load_file(directory / HEAD_WEIGHTS_NAME))
        nn.Module.train(model, False)
        return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file, refusing anything that needs unpickling."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as handle:
        header = handle.read(9)  # safetensors: 8-byte header length, then the JSON header
    if header[8:9] == b"{":
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path}: holds Python objects beyond tensors (a whole pickled model?); loading it would run "
            "arbitrary code, which this package never does. Load it once where you trust it and save its "
            f"state_dict() instead. ({str(error).splitlines()[0]})"
        ) from None
