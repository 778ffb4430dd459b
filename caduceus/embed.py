"""Embeddings of the records of a FASTA file: ``caduceus embed`` and ``embed_sequences``.

A record up to ``window`` bases (default: the model's input size) is embedded whole. A longer one is cut
into windows of ``window`` bases overlapping by ``overlap`` bases (default: a quarter of the window), the
last one moved back to end at the record's end. Per-token output averages the windows that cover a base;
pooled ``mean`` is the mean over the bases of that per-token embedding (every base counts once, however
many windows cover it); pooled ``max`` is the maximum over every window's bases. The embeddings
themselves come from ``caduceus.api``, with both strands averaged by default (``rc``).

Output: ``.npy`` (pooled: (records, C); per-token: the records' (bases, C) arrays one after the other)
with ``NAME.names.txt`` beside it (record name and length per line, in row order), or ``.safetensors``
(pooled: tensor ``embeddings``; per-token: one tensor per record name; names, lengths and settings in
the metadata).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from caduceus._genomics import add_model_argument, batched, check_output_path, model_input_size
from caduceus.api import RC_MODES, Caduceus, CaduceusConfig, progress_bar
from caduceus.data import DataError
from caduceus.dna_dataset import read_sequences
from caduceus.files import atomic_write
from caduceus.tokenizer import encode_sequence

POOLINGS = ("mean", "max")
DEFAULT_BATCH_SIZE = 8
OUTPUT_SUFFIXES = (".npy", ".safetensors")


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Starts of the windows that cover ``length`` bases; the last one ends at the end."""
    if length <= window:
        return [0]
    return [*range(0, length - window, window - overlap), length - window]


def embed_sequences(
    sequences: Sequence[str],
    model: str | os.PathLike,
    window: int | None = None,
    overlap: int | None = None,
    per_token: bool = False,
    pooling: str = "mean",
    rc: str = "average",
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    progress: bool | None = None,
    names: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """One float32 array per sequence: (C,) pooled, or (bases, C) with ``per_token``; see the module doc.
    Every sequence is checked first; an error names it by ``names`` (FASTA records) or its index."""
    window = window or model_input_size(model)
    overlap = window // 4 if overlap is None else overlap
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be at least 0 and less than the window ({window}), got {overlap}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    for index, sequence in enumerate(sequences):
        which = f"record {names[index]}" if names else f"sequence {index}"
        if not sequence:
            raise DataError(f"{which} is empty")
        try:
            encode_sequence(sequence, index)
        except ValueError as error:
            raise DataError(f"{which}: {str(error).split(': ', 1)[1]}") from None
    embedder = Caduceus(CaduceusConfig(model_name=model, batch_size=batch_size, device=device, max_length=window,
                                       rc=rc, progress=False))
    jobs = [(i, start) for i, s in enumerate(sequences) for start in window_starts(len(s), window, overlap)]
    coverage = [np.zeros(len(s), dtype=np.float32) for s in sequences]
    for i, start in jobs:
        coverage[i][start : start + window] += 1
    totals: list[np.ndarray | None] = [None] * len(sequences)
    with progress_bar(None, progress, "embed", total=len(jobs), unit="window") as bar:
        for chunk in batched(jobs, 4 * batch_size):
            pieces = [sequences[i][start : start + window] for i, start in chunk]
            hidden = embedder.get_embeddings(embedder.process_data(pieces), per_token=True, progress=False)
            for (i, start), h in zip(chunk, hidden):
                covered = slice(start, start + len(h))
                if per_token:
                    if totals[i] is None:
                        totals[i] = np.zeros((len(sequences[i]), h.shape[1]), dtype=np.float32)
                    totals[i][covered] += h / coverage[i][covered, None]
                elif pooling == "mean":
                    contribution = (h / coverage[i][covered, None]).sum(axis=0) / len(sequences[i])
                    totals[i] = contribution if totals[i] is None else totals[i] + contribution
                else:
                    totals[i] = h.max(axis=0) if totals[i] is None else np.maximum(totals[i], h.max(axis=0))
            bar.update(len(chunk))
    return [t.astype(np.float32, copy=False) for t in totals]


def write_embeddings(path: Path, names: list[str], lengths: list[int], embeddings: list[np.ndarray],
                     per_token: bool, settings: dict[str, object]) -> list[Path]:
    """Write as the module doc says; returns the files written."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.numpy import save_file

        tensors = dict(zip(names, embeddings)) if per_token else {"embeddings": np.stack(embeddings)}
        metadata = {"names": json.dumps(names), "lengths": json.dumps(lengths),
                    **{key: json.dumps(value) for key, value in settings.items()}}
        atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))
        return [path]
    array = np.concatenate(embeddings) if per_token else np.stack(embeddings)
    names_path = path.with_name(path.name[: -len(path.suffix)] + ".names.txt")

    def write_array(temporary: str) -> None:
        with open(temporary, "wb") as handle:
            np.save(handle, array)

    atomic_write(path, write_array)
    atomic_write(names_path, lambda temporary: Path(temporary).write_text(
        "".join(f"{name}\t{length}\n" for name, length in zip(names, lengths)), encoding="utf-8"))
    return [path, names_path]


def add_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "embed", help="embed the records of a FASTA file (long ones in overlapping windows)",
        description=__doc__.split("\n\n", 1)[1].strip(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--fasta", required=True, type=Path, help="input FASTA (plain, or bgzip with biopython)")
    add_model_argument(parser)
    parser.add_argument("--out", required=True, type=Path, help="output: .npy (+ .names.txt) or .safetensors")
    parser.add_argument("--per-token", action="store_true", help="one embedding per base instead of pooled")
    parser.add_argument("--pooling", choices=POOLINGS, default="mean", help="pooling over bases (default mean)")
    parser.add_argument("--window", type=int, help="window length in bases (default: the model's input size)")
    parser.add_argument("--overlap", type=int, help="overlap of consecutive windows (default: a quarter window)")
    parser.add_argument("--rc", choices=RC_MODES, default="average",
                        help="strands: average (default), none (forward only) or concat (PS only)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="windows per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    out = check_output_path(args.out, OUTPUT_SUFFIXES)
    if not args.fasta.is_file():
        raise DataError(f"{args.fasta}: FASTA file not found")
    sequences, names = read_sequences(args.fasta)
    if not sequences:
        raise DataError(f"{args.fasta}: no FASTA records")
    window = args.window or model_input_size(args.model)
    overlap = window // 4 if args.overlap is None else args.overlap
    try:
        embeddings = embed_sequences(sequences, args.model, window, overlap, args.per_token, args.pooling, args.rc,
                                     args.batch_size, args.device, names=names)
    except DataError as error:
        raise DataError(f"{args.fasta}: {error}") from None
    settings = {"model": str(args.model), "window": window, "overlap": overlap, "per_token": args.per_token,
                "pooling": None if args.per_token else args.pooling, "rc": args.rc}
    written = write_embeddings(out, names, [len(s) for s in sequences], embeddings, args.per_token, settings)
    shape = f"{sum(len(s) for s in sequences)} bases" if args.per_token else f"{len(sequences)} records"
    print(f"embed: {shape} x {embeddings[0].shape[-1]} dims; wrote {', '.join(map(str, written))}", file=sys.stderr)
