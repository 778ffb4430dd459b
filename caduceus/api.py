"""The Helical-compatible API: ``CaduceusConfig`` and ``Caduceus`` (embeddings).

Drop-in for ``helical.models.caduceus``: the same arguments, defaults, ``.config`` keys, errors, token
ids and padding (see docs/helical-api.md), with the reference's bugs fixed: it runs on any device,
pooling uses only the real bases (so an embedding does not depend on the rest of the batch), ``first``
and ``last`` pooling work, a single string is one sequence, and weights come from the Hugging Face Hub,
a local directory or the package itself.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from caduceus import hub
from caduceus.dna_dataset import DNADataset, base_mask, build_dataset, collate_batch, read_sequences
from caduceus.modeling import CaduceusForMaskedLM
from caduceus.tokenizer import CaduceusTokenizer, reverse_complement_batch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "caduceus-dna-ph-4L-1k-d118-grch37"  # bundled: works offline
POOLING_STRATEGIES = ["mean", "max", "last", "first"]
RC_MODES = ("none", "average", "concat")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

RcMode = Literal["none", "average", "concat"]


class CaduceusConfig:
    """Settings of a ``Caduceus`` model; the reference's arguments first, with its defaults.

    Args:
        model_name: a published name (``caduceus-{ph,ps}-4L-seqlen-1k-d{118,256}``,
            ``caduceus-{ph,ps}-16L-seqlen-131k-d256``), a bundled model, a Hugging Face repo id named
            like the published ones, or a local directory with ``config.json`` + ``model.safetensors``.
        batch_size: sequences per forward pass (embeddings, training, outputs).
        pooling_strategy: ``mean``, ``max``, ``first`` or ``last``, over the real bases of a sequence.
        nproc: processes that load batches (as in the reference, the DataLoader's workers; it does not
            parallelise process_data). 1, the default, loads in the calling process itself, so scripts
            without a ``__main__`` guard work on macOS / Windows too.
        device: ``"auto"`` (cuda, then mps, then cpu) or a torch device string such as ``"cuda:1"``.
        dtype: ``"float32"`` or ``"bfloat16"``: the precision of the forward pass (autocast; the weights
            stay float32, so fine-tuning stays stable).
        max_length: bases kept per sequence (default: the model's ``input_size``; no cap when unknown).
        rc: strand handling of embeddings: ``"none"`` (forward strand), ``"average"`` (both strands,
            averaged; exactly reverse-complement invariant for PS) or, for PS only, ``"concat"`` (the
            reference's 2·d_model layout). Default: ``"none"`` for Ph, ``"concat"`` for PS.
        progress: show progress bars (``None``: only on a terminal, and only once a run takes a while).
        revision, cache_dir, local_files_only, token: passed to ``huggingface_hub`` downloads.
    """

    def __init__(
        self,
        model_name: str | os.PathLike = DEFAULT_MODEL_NAME,
        batch_size: int = 5,
        pooling_strategy: str = "mean",
        nproc: int = 1,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "float32",
        max_length: int | None = None,
        rc: RcMode | None = None,
        progress: bool | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
    ) -> None:
        if pooling_strategy not in POOLING_STRATEGIES:
            message = f"Pooling strategy {pooling_strategy} not found in available strategies: {POOLING_STRATEGIES}"
            logger.error(message)
            raise ValueError(message)
        info = hub.model_info(model_name)
        if info is None:
            available = {name: None for name in hub.available_models()}.keys()
            message = (f"Model name {model_name} not found in available models: {available} "
                       "(or pass a local directory or a Hugging Face repo id named like the published ones)")
            logger.error(message)
            raise ValueError(message)
        check_device_name(device)
        for name, value, least in (("batch_size", batch_size, 1), ("nproc", nproc, 0)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        if rc is not None and rc not in RC_MODES:
            raise ValueError(f"rc must be one of {RC_MODES}, got {rc!r}")
        self.model_name = model_name
        self.hub_kwargs = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        self.list_of_files_to_download = [f"caduceus/{model_name}/{name}" for name in reversed(hub.MODEL_FILES)]
        self.files_config = {"model_files_dir": Path(model_name) if Path(model_name).is_dir() else None}
        self.config = {
            "input_size": info.input_size,
            "embedding_size": info.embedding_size,
            "model_name": str(model_name),
            "pooling_strategy": pooling_strategy,
            "batch_size": batch_size,
            "device": str(device),
            "nproc": nproc,
            "n_layer": info.n_layer,
            "dtype": str(resolve_dtype(dtype)).removeprefix("torch."),
            "max_length": max_length,
            "rc": rc,
            "progress": progress,
        }


def check_device_name(device: str | torch.device) -> None:
    """Raise a clear error for a device string torch does not know (availability is checked later)."""
    if isinstance(device, torch.device) or device == "auto":
        return
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda, then mps, then cpu; an explicit device must exist on this machine."""
    check_device_name(device)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r} was requested but CUDA is not available; use device='auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {str(device)!r} was requested but there are {torch.cuda.device_count()} GPUs")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' was requested but Apple MPS is not available; use device='auto'")
    return device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")


def autocast(device: str | torch.device, dtype: torch.dtype) -> torch.autocast:
    """Run in ``dtype`` (bfloat16, float16) under autocast; a no-op for float32."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)


def flip_bases(hidden: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """Reverse each row's run of real bases in place (pads and [SEP] stay put): maps the hidden states of
    a reverse-complement run onto the forward positions of the bases they belong to."""
    count = bases.sum(dim=1, keepdim=True)
    start = bases.int().argmax(dim=1, keepdim=True)
    positions = torch.arange(bases.shape[1], device=bases.device).expand_as(bases)
    index = torch.where(bases, 2 * start + count - 1 - positions, positions)
    return hidden.gather(1, index.unsqueeze(-1).expand_as(hidden))


def pool(hidden: torch.Tensor, bases: torch.Tensor, strategy: str) -> torch.Tensor:
    """Pool (B, L, C) over the real bases only: mean, max, or the first / last base (not a pad, not [SEP])."""
    hidden = hidden.float()
    if strategy == "mean":
        weights = bases.unsqueeze(-1).float()
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    if strategy == "max":
        return hidden.masked_fill(~bases.unsqueeze(-1), float("-inf")).max(dim=1).values
    start = bases.int().argmax(dim=1)
    position = start if strategy == "first" else start + bases.sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), position]


def progress_bar(iterable: object, enabled: bool | None, desc: str, **kwargs: object) -> tqdm:
    """A tqdm bar: ``enabled=None`` shows it only on a terminal and only after two seconds."""
    if enabled is None:
        return tqdm(iterable, desc=desc, disable=None, delay=2, **kwargs)
    return tqdm(iterable, desc=desc, disable=not enabled, **kwargs)


class Caduceus:
    """Caduceus embeddings, Helical style: ``process_data`` then ``get_embeddings``.

    Attributes (as in the reference): ``configurer``, ``config`` (the configurer's dict), ``files_config``,
    ``device``, ``pretrained_config`` (the model config), ``model`` (the backbone, with ``.backbone``;
    it stays on the CPU until first used, then lives on ``device``), ``tokenizer``.
    """

    def __init__(self, configurer: CaduceusConfig | None = None) -> None:
        self.configurer = configurer if configurer is not None else CaduceusConfig()
        self.config = self.configurer.config
        self.files_config = self.configurer.files_config
        self.device = str(resolve_device(self.config["device"]))
        self.dtype = resolve_dtype(self.config["dtype"])
        model_dir = hub.resolve_model_dir(self.configurer.model_name, **self.configurer.hub_kwargs)
        self.files_config["model_files_dir"] = model_dir
        self.model = CaduceusForMaskedLM.from_pretrained(model_dir).caduceus
        self.pretrained_config = self.model.config
        self.model.eval()
        self.max_length = self.config["max_length"] or self.config["input_size"]
        self.tokenizer = CaduceusTokenizer(model_max_length=self.max_length)

    @property
    def is_ps(self) -> bool:
        """Whether the model is reverse-complement equivariant (PS, ``rcps``) rather than Ph."""
        return self.pretrained_config.rcps

    def process_data(
        self,
        sequences: list[str] | str | os.PathLike | object,
        return_tensors: str = "pt",
        padding: str | bool = "max_length",
        truncation: bool = True,
        windows: bool = False,
    ) -> DNADataset:
        """Tokenise sequences: a list of str, one str, a DataFrame with a ``Sequence`` column, or a FASTA
        path (needs pyfaidx). Rows are left-padded to ``min(longest, max_length) + 1`` with a trailing [SEP].

        Sequences longer than ``max_length`` bases are truncated with one warning (``truncation=True``),
        kept whole (``truncation=False``), or cut into windows (``windows=True``) whose embeddings
        ``get_embeddings`` combines into one per sequence.
        """
        if return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        if padding not in ("max_length", "longest", True):
            raise ValueError(f"rows are always padded to one width; padding={padding!r} is not supported")
        sequences, names = read_sequences(sequences)
        max_bases = self.max_length if truncation or windows else None
        return build_dataset(sequences, self.tokenizer, max_bases, windows=windows, names=names)

    def _dataloader(self, dataset: DNADataset, shuffle: bool = False, generator: torch.Generator | None = None):
        if not isinstance(dataset, DNADataset):
            raise TypeError(f"expected the dataset returned by process_data, got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        workers = self.config["nproc"] if self.config["nproc"] > 1 else 0
        return DataLoader(
            dataset, batch_size=self.config["batch_size"], shuffle=shuffle, generator=generator,
            num_workers=workers, pin_memory=self.device.startswith("cuda"), collate_fn=collate_batch,
        )

    def _strands(self, input_ids: torch.Tensor, bases: torch.Tensor, both: bool) -> list[torch.Tensor]:
        """Hidden states (B, L, d_model) of the forward strand, and with ``both`` of the reverse-complement
        strand, each position holding the state of the same base pair.

        The model sees the real bases only (``bases`` is its attention mask): [SEP] stays in the ids, as
        in the reference layout, but is masked like padding, because the published models were
        pre-trained without it and because it sits at the end of one strand only, which would make the
        two strands see different inputs. PS: one pass carries both strands (the RC half channel-reversed).
        Ph: the reverse complement is a second pass in the same batch, flipped back onto the bases.
        """
        if self.is_ps:
            forward, reverse = self.model(input_ids, bases)[0].chunk(2, dim=-1)
            return [forward, reverse.flip(-1)] if both else [forward]
        if not both:
            return [self.model(input_ids, bases)[0]]
        rc_ids = reverse_complement_batch(input_ids, bases)
        hidden = self.model(torch.cat([input_ids, rc_ids]), torch.cat([bases, bases]))[0]
        forward, reverse = hidden.chunk(2, dim=0)
        return [forward, flip_bases(reverse, bases)]

    def _rc_mode(self, rc: RcMode | None) -> str:
        rc = rc or self.config["rc"] or ("concat" if self.is_ps else "none")
        if rc not in RC_MODES:
            raise ValueError(f"rc must be one of {RC_MODES}, got {rc!r}")
        if rc == "concat" and not self.is_ps:
            raise ValueError("rc='concat' needs a PS model (both strands in one pass); use 'none' or 'average'")
        return rc

    def get_embeddings(
        self,
        dataset: DNADataset,
        rc: RcMode | None = None,
        per_token: bool = False,
        progress: bool | None = None,
    ) -> np.ndarray | list[np.ndarray]:
        """Embeddings, float32 (N, C): one per input sequence, pooled over its real bases.

        ``rc``: ``"none"`` (C = d_model, the forward strand), ``"average"`` (C = d_model, both strands
        averaged position by position; for PS exactly reverse-complement invariant with mean/max pooling)
        or, PS only, ``"concat"`` (C = 2·d_model: forward half then the channel-reversed RC half, the
        reference layout). ``per_token=True`` returns instead a list of (bases, C) arrays, one per sequence.
        Windows of one sequence are combined as the pooling combines bases: mean weighted by bases, max,
        first window's first base, last window's last base.
        """
        rc = self._rc_mode(rc)
        progress = self.config["progress"] if progress is None else progress
        loader = self._dataloader(dataset)
        self.model.to(self.device).eval()
        rows, counts = [], []
        with torch.inference_mode(), autocast(self.device, self.dtype):
            for batch in progress_bar(loader, progress, "Embeddings", unit="batch"):
                input_ids = batch["input_ids"].to(self.device)
                bases = base_mask(input_ids, batch["attention_mask"].to(self.device))
                strands = self._strands(input_ids, bases, both=rc != "none")
                if per_token:
                    strands = [s.float() for s in strands]
                    hidden = _combine_strands(strands, rc)
                    rows += [h[b].cpu().numpy() for h, b in zip(hidden, bases)]
                else:
                    rows.append(_combine_strands([pool(s, bases, self.config["pooling_strategy"]) for s in strands],
                                                 rc).cpu())
                counts.append(bases.sum(dim=1).cpu())
        if per_token:
            return _join_windows_per_token(rows, dataset.sequence_index)
        embeddings = _join_windows(torch.cat(rows), torch.cat(counts), dataset.sequence_index,
                                   self.config["pooling_strategy"])
        return embeddings.numpy().astype(np.float32, copy=False)


def _combine_strands(strands: list[torch.Tensor], rc: str) -> torch.Tensor:
    """One strand as is; two averaged, or (PS ``concat``) side by side in the model's own layout."""
    if rc == "none":
        return strands[0]
    if rc == "average":
        return (strands[0] + strands[1]) / 2
    return torch.cat([strands[0], strands[1].flip(-1)], dim=-1)


def _join_windows(pooled: torch.Tensor, counts: torch.Tensor, owner: torch.Tensor, strategy: str) -> torch.Tensor:
    """Combine the pooled rows of each sequence's windows (rows of one sequence are consecutive)."""
    if len(owner) == int(owner.max()) + 1:
        return pooled
    groups = torch.split(torch.arange(len(owner)), torch.bincount(owner).tolist())
    if strategy == "mean":
        return torch.stack([(pooled[g] * counts[g, None]).sum(0) / counts[g].sum() for g in groups])
    if strategy == "max":
        return torch.stack([pooled[g].max(dim=0).values for g in groups])
    return torch.stack([pooled[g[0] if strategy == "first" else g[-1]] for g in groups])


def _join_windows_per_token(rows: list[np.ndarray], owner: torch.Tensor) -> list[np.ndarray]:
    groups: dict[int, list[np.ndarray]] = {}
    for row, index in zip(rows, owner.tolist()):
        groups.setdefault(index, []).append(row)
    return [np.concatenate(groups[i]).astype(np.float32, copy=False) for i in range(len(groups))]
