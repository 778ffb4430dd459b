"""Pieces the analysis commands (vep, track, embed, benchmark) share: a reference FASTA read by
chromosome name whatever its ``chr`` convention, windows placed inside a chromosome, models by name,
and result tables written atomically.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from caduceus import hub
from caduceus.api import DEFAULT_MODEL_NAME
from caduceus.data import DataError, FastaGenome
from caduceus.files import atomic_write
from caduceus.modeling import CaduceusForMaskedLM, conjoined_logits
from caduceus.tokenizer import A_ID, BASE_IDS, C_ID, G_ID, MASK_ID, T_ID, CaduceusTokenizer

# The longest input of a model whose name does not tell it (a local directory): that of the 1k models.
DEFAULT_INPUT_SIZE = 1024
TABLE_SUFFIXES = (".tsv", ".parquet")

_ID_TO_BASE = np.full(256, ord("N"), dtype=np.uint8)
_ID_TO_BASE[[A_ID, C_ID, G_ID, T_ID]] = [ord(b) for b in "ACGT"]


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """The commands' ``--model`` option, defaulting to the bundled model so that they work offline."""
    parser.add_argument("--model", default=DEFAULT_MODEL_NAME,
                        help="model name or directory (default: %(default)s, bundled with the package)")


def model_input_size(model: str | os.PathLike) -> int:
    """The input length (bases) a model was trained on, ``DEFAULT_INPUT_SIZE`` when its name does not say."""
    info = hub.model_info(model)
    if info is None:
        raise ValueError(f"{model}: not a model directory nor a known model name ({', '.join(hub.available_models())})")
    return info.input_size or DEFAULT_INPUT_SIZE


def chrom_aliases(name: str) -> list[str]:
    """Names the same chromosome goes by: ``20`` / ``chr20``, and ``M`` / ``MT`` / ``chrM`` / ``chrMT``."""
    bare = name[3:] if name.lower().startswith("chr") else name
    bares = ["M", "MT"] if bare.upper() in ("M", "MT") else [bare]
    return [form for b in bares for form in (b, f"chr{b}")]


class Reference:
    """An indexed FASTA (plain, or bgzip with biopython; the ``.fai`` is built when missing) read by
    chromosome name, accepting either naming convention."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._genome = FastaGenome(self.path)
        self.chrom_lengths = dict(self._genome.chrom_lengths)

    def resolve(self, chrom: str) -> str | None:
        """The FASTA record for ``chrom`` (``20`` finds ``chr20`` and the reverse), ``None`` if absent."""
        if chrom in self.chrom_lengths:
            return chrom
        return next((alias for alias in chrom_aliases(chrom) if alias in self.chrom_lengths), None)

    def bases(self, chrom: str, start: int, end: int) -> str:
        """Upper-case bases of ``chrom[start:end]`` (0-based, half-open); anything but A C G T reads N."""
        return _ID_TO_BASE[self._genome.fetch(chrom, start, end)].tobytes().decode("ascii")


def centred_window(position: int, length: int, chrom_length: int) -> tuple[int, int]:
    """``[start, end)`` of ``length`` bases centred on the 0-based ``position``, shifted to lie inside the
    chromosome (the position is then off-centre); the whole chromosome when it is shorter."""
    start = min(max(position - length // 2, 0), max(chrom_length - length, 0))
    return start, min(start + length, chrom_length)


def parse_region(region: str, reference: Reference) -> tuple[str, int, int]:
    """``chr:start-end`` (1-based, inclusive, commas allowed) or ``chr`` -> (FASTA record, start, end)
    0-based half-open, checked against the reference."""
    name, _, span = region.replace(",", "").partition(":")
    chrom = reference.resolve(name)
    if chrom is None:
        raise DataError(f"region {region!r}: chromosome {name!r} is not in {reference.path} "
                        f"(it has: {', '.join(list(reference.chrom_lengths)[:10])})")
    length = reference.chrom_lengths[chrom]
    if not span:
        return chrom, 0, length
    first, _, last = span.partition("-")
    try:
        start, end = int(first) - 1, int(last)
    except ValueError:
        raise DataError(f"region {region!r}: expected chr:start-end with integer positions") from None
    if not 0 <= start < end <= length:
        raise DataError(f"region {region!r} is outside {chrom} (1-{length}) or empty")
    return chrom, start, end


@torch.inference_mode()
def masked_base_log_probs(lm: CaduceusForMaskedLM, windows: Sequence[str],
                          masked: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """For each window, log P(A), P(C), P(G), P(T) (renormalised over the four bases) at each offset of
    ``masked``, all of a window's offsets masked in one pass; both strands (``conjoined_logits``).

    Windows of different lengths are left-padded together; the padding is masked, so it changes nothing.
    """
    encoding = CaduceusTokenizer(add_special_tokens=False)(list(windows))
    width = encoding.input_ids.shape[1]
    rows = torch.tensor([i for i, offsets in enumerate(masked) for _ in offsets], dtype=torch.long)
    columns = torch.tensor([width - len(w) + o for w, offsets in zip(windows, masked) for o in offsets],
                           dtype=torch.long)
    input_ids = encoding.input_ids.clone()
    input_ids[rows, columns] = MASK_ID
    device = next(lm.parameters()).device
    logits = conjoined_logits(lm, input_ids.to(device), encoding.attention_mask.to(device))
    log_probs = torch.log_softmax(logits[rows, columns][:, list(BASE_IDS)], dim=-1).cpu().numpy()
    return np.split(log_probs, np.cumsum([len(offsets) for offsets in masked])[:-1])


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def check_output_path(path: str | os.PathLike, suffixes: Iterable[str]) -> Path:
    """Fail before any work when an output cannot be written: unknown format or missing directory."""
    path = Path(path)
    suffixes = tuple(suffixes)
    if not path.name.lower().endswith(suffixes):
        raise DataError(f"{path}: output must end with one of {', '.join(suffixes)}")
    if not path.parent.is_dir():
        raise DataError(f"{path}: directory {path.parent} does not exist")
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise DataError(f"{path}: writing Parquet needs pyarrow (pip install pyarrow), or write .tsv") from None
    return path


def _tsv_value(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NA"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_table(rows: list[dict], columns: list[str], path: str | os.PathLike) -> None:
    """Rows as TSV (missing values ``NA``) or Parquet (by suffix), written whole or not at all."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow
        import pyarrow.parquet

        table = pyarrow.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
        atomic_write(path, lambda temporary: pyarrow.parquet.write_table(table, temporary))
        return

    def write(temporary: str) -> None:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(columns)
            writer.writerows([_tsv_value(row.get(c)) for c in columns] for row in rows)

    atomic_write(path, write)
