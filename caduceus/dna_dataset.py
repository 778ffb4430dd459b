"""What ``process_data`` returns: tokenised DNA in the reference layout, as a plain torch ``Dataset``.

Rows are left-padded with [PAD]=4 to one width for the whole call and end with [SEP]=1, exactly as the
Helical / upstream tokenizer lays them out; an ``attention_mask`` marks the real tokens, so the model and
the pooling can ignore the padding. Long sequences are truncated (with one warning) or cut into windows.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from caduceus.tokenizer import A_ID, CaduceusTokenizer, encode_sequence

FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".fas", ".fa.gz", ".fasta.gz", ".fna.gz")


class DNADataset(Dataset):
    """Token ids of a batch of sequences, DataLoader-ready (rows are dicts of tensors).

    ``sequence_index[i]`` is the input sequence that row ``i`` came from (rows are windows of a longer
    sequence when the data was windowed); ``names`` are the FASTA record names when read from a file.
    ``dataset["input_ids"]`` returns the column as lists of ints, as a Hugging Face ``Dataset`` does.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        sequence_index: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        names: list[str] | None = None,
    ) -> None:
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.sequence_index = torch.arange(len(input_ids)) if sequence_index is None else sequence_index
        self.labels = labels
        self.names = names

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_sequences(self) -> int:
        return int(self.sequence_index.max()) + 1 if len(self) else 0

    @property
    def is_windowed(self) -> bool:
        return self.num_sequences != len(self)

    @property
    def column_names(self) -> list[str]:
        return ["input_ids", "attention_mask"] + (["labels"] if self.labels is not None else [])

    def __getitem__(self, key: int | str) -> dict[str, torch.Tensor] | list:
        if isinstance(key, str):
            if key not in self.column_names:
                raise KeyError(f"no column {key!r}; columns: {self.column_names}")
            return getattr(self, key).tolist()
        row = {"input_ids": self.input_ids[key], "attention_mask": self.attention_mask[key]}
        if self.labels is not None:
            row["labels"] = self.labels[key]
        return row

    def with_labels(self, labels: torch.Tensor | None) -> DNADataset:
        """The same rows with a label per row (shares the id tensors)."""
        return DNADataset(self.input_ids, self.attention_mask, self.sequence_index, labels, self.names)

    def __repr__(self) -> str:
        return f"DNADataset(rows={len(self)}, width={self.input_ids.shape[1]}, columns={self.column_names})"


def collate_batch(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack rows and drop the left columns that are padding in every row of the batch. The model masks
    padding, so this changes no result; it only saves the work on a short batch of a long dataset."""
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    first_real = int(batch["attention_mask"].any(dim=0).int().argmax())
    for key in ("input_ids", "attention_mask"):
        batch[key] = batch[key][:, first_real:]
    return batch


def base_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """True on the real bases (A C G T N) of each row: not on padding, not on [SEP] or other specials."""
    return attention_mask.bool() & (input_ids >= A_ID)


def read_sequences(data: object) -> tuple[list[str], list[str] | None]:
    """The sequences (and FASTA record names, when read from a file) of any input ``process_data`` takes:
    a list of str, a single str (one sequence), a DataFrame with a ``Sequence`` column, or a FASTA path."""
    if isinstance(data, os.PathLike) or (isinstance(data, str) and _looks_like_fasta_path(data)):
        return _read_fasta(Path(data))
    if isinstance(data, str):
        return [data], None
    pandas = sys.modules.get("pandas")
    if pandas is not None and isinstance(data, pandas.DataFrame):
        if "Sequence" not in data.columns:
            raise KeyError("The DataFrame must have a column named 'Sequence'.")
        return data["Sequence"].tolist(), None
    if isinstance(data, Iterable):
        return list(data), None
    raise TypeError(
        f"expected a list of sequences, a str, a DataFrame with a 'Sequence' column or a FASTA path, "
        f"got {type(data).__name__}"
    )


def _looks_like_fasta_path(text: str) -> bool:
    return text.lower().endswith(FASTA_SUFFIXES) or os.path.isfile(text)


def _read_fasta(path: Path) -> tuple[list[str], list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such FASTA file")
    try:
        import pyfaidx
    except ImportError:
        raise ImportError(
            f"reading the FASTA file {path} needs pyfaidx: pip install pyfaidx "
            "(or the extra: pip install 'caduceus-dna[genomics]')"
        ) from None
    with pyfaidx.Fasta(str(path), as_raw=True, sequence_always_upper=False) as fasta:
        names = list(fasta.keys())
        return [fasta[name][:] for name in names], names


def build_dataset(
    sequences: Sequence[str],
    tokenizer: CaduceusTokenizer,
    max_bases: int | None,
    windows: bool = False,
    names: list[str] | None = None,
) -> DNADataset:
    """Check and tokenise sequences; longer ones than ``max_bases`` are truncated (one warning) or, with
    ``windows``, cut into consecutive windows of ``max_bases`` (the last one shorter), one row each.

    Every sequence is checked before anything is encoded: an error names the sequence index and, for an
    invalid character, its position.
    """
    if len(sequences) == 0:
        raise ValueError("no sequences given: the dataset would be empty")
    for index, sequence in enumerate(sequences):
        if isinstance(sequence, str) and not sequence:
            raise ValueError(f"sequence {index} is empty")
    too_long = [i for i, s in enumerate(sequences) if max_bases is not None and isinstance(s, str)
                and len(s) > max_bases]
    if not (windows and too_long):
        longest = max((len(s) for s in sequences if isinstance(s, str)), default=1)
        encoding = tokenizer(sequences, max_length=max_bases or longest)  # None: no cap, even the tokenizer's
        if too_long:
            warnings.warn(
                f"{len(too_long)} of {len(sequences)} sequences are longer than {max_bases} bases and were "
                f"truncated to their first {max_bases} bases (the first: sequence {too_long[0]}, "
                f"{len(sequences[too_long[0]])} bases). Pass windows=True to process_data to use all bases, "
                "or a larger max_length to CaduceusConfig.",
                stacklevel=3,
            )
        return DNADataset(encoding.input_ids, encoding.attention_mask, names=names)
    for index, sequence in enumerate(sequences):
        encode_sequence(sequence, index)  # errors name the original sequence, not a window
    pieces, owner = [], []
    for index, sequence in enumerate(sequences):
        starts = range(0, len(sequence), max_bases)
        pieces += [sequence[start : start + max_bases] for start in starts]
        owner += [index] * len(starts)
    encoding = tokenizer(pieces, max_length=max_bases)
    return DNADataset(encoding.input_ids, encoding.attention_mask, torch.from_numpy(np.array(owner)), names=names)
