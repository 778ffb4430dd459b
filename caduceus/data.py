"""Pretraining data: a genome (FASTA or packed), BED splits, fixed-length windows and masked-LM examples.

The recipe is the published one (HyenaDNA / Caduceus hg38 loader): every interval of a split is
extended to ``extend_to`` bases from its start and cut into non-overlapping windows of ``seq_len``;
a window running past the chromosome end is shifted back inside; N (and any other non-ACGT base)
becomes [PAD], which the loss ignores. Masking draws 15 % of the positions, of which 80 % become
[MASK], 10 % a random id out of all 12 and 10 % stay; the targets are the original ids there and
[PAD] elsewhere.

Every random choice of an example (masking, reverse-complement coin) is drawn from a generator seeded
by (seed, split, epoch, window index), never from a global stream. The batch for a step is therefore
a pure function of the step number, which is what makes resumed runs exact and lets N processes with
a share of the batch each see exactly what one process with the whole batch sees.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from caduceus.files import atomic_write
from caduceus.tokenizer import A_ID, C_ID, COMPLEMENT_IDS, G_ID, MASK_ID, PAD_ID, T_ID, VOCAB_SIZE

SPLITS = ("train", "valid", "test")
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
DEFAULT_EXTEND_TO = 2**20
DEFAULT_MASK_PROB = 0.15
PACKED_GENOME_NAME = "genome.npz"
PACKED_BED_NAME = "splits.bed"

# FASTA byte -> token id. Pretraining ignores anything that is not a plain base, so N and IUPAC codes
# become [PAD] here (the loss skips [PAD] targets), as in the published hg38 loader.
BYTE_TO_ID = np.full(256, PAD_ID, dtype=np.uint8)
for _base, _id in zip("ACGT", (A_ID, C_ID, G_ID, T_ID), strict=True):
    BYTE_TO_ID[ord(_base)] = BYTE_TO_ID[ord(_base.lower())] = _id
COMPLEMENT = COMPLEMENT_IDS.astype(np.uint8)


class DataError(ValueError):
    """Unusable input data (file, line and reason in the message)."""


# ----------------------------------------------------------------------------------------------
# Genomes: named sequences that hand out token ids


class Genome(Protocol):
    chrom_lengths: Mapping[str, int]

    def fetch(self, chrom: str, start: int, end: int) -> np.ndarray:
        """Token ids (uint8) of ``chrom[start:end]``."""
        ...


class FastaGenome:
    """Random access to a FASTA (plain, or bgzip with biopython installed) through pyfaidx.

    The file is reopened in each process, because forked DataLoader workers would otherwise share
    one file offset and read each other's sequence.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: FASTA file not found")
        if self.path.stat().st_size == 0:
            raise DataError(f"{self.path}: FASTA file is empty")
        self._fasta = None
        self._pid = None
        fasta = self._open()
        self.chrom_lengths = {name: len(record) for name, record in fasta.records.items()}
        if not self.chrom_lengths or sum(self.chrom_lengths.values()) == 0:
            raise DataError(f"{self.path}: FASTA file has no sequence (no '>' record with bases)")

    def _open(self):
        if self._fasta is None or self._pid != os.getpid():
            try:
                import pyfaidx
            except ImportError:
                raise DataError(
                    f"{self.path}: reading FASTA needs pyfaidx (pip install 'caduceus-dna[genomics]'); "
                    "or train from a packed genome (`caduceus data pack`, then --packed)"
                ) from None
            try:
                self._fasta = pyfaidx.Fasta(str(self.path), as_raw=True, sequence_always_upper=False)
            except pyfaidx.UnsupportedCompressionFormat:
                raise DataError(
                    f"{self.path}: gzip-compressed FASTA cannot be read at random; recompress it with bgzip "
                    f"(`gunzip -c {self.path.name} | bgzip > new.fa.gz`) or decompress it (`gunzip`)"
                ) from None
            except ImportError as error:
                raise DataError(f"{self.path}: reading bgzip FASTA needs biopython ({error})") from None
            except (ValueError, pyfaidx.FastaIndexingError) as error:
                raise DataError(f"{self.path}: not a readable FASTA file: {error}") from None
            self._pid = os.getpid()
        return self._fasta

    def fetch(self, chrom: str, start: int, end: int) -> np.ndarray:
        sequence = self._open()[chrom][start:end]
        return BYTE_TO_ID[np.frombuffer(sequence.encode("ascii"), dtype=np.uint8)]


class PackedGenome:
    """A genome written by ``pack_genome``: 2 bits per base plus the runs of non-ACGT bases.

    Loading unpacks everything to one byte per base in memory (133 MB for the GRCh37 data), so that
    a window is a slice; no pyfaidx needed. The file is small enough to carry to a GPU machine.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        file = path / PACKED_GENOME_NAME if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"{file}: packed genome not found (write one with `caduceus data pack`)")
        try:
            with np.load(file) as packed:
                names = [str(n) for n in packed["names"]]
                lengths, offsets = packed["lengths"], packed["offsets"]
                codes, other_runs = packed["codes"], packed["other_runs"]
        except (OSError, KeyError, ValueError) as error:
            raise DataError(f"{file}: not a packed genome written by `caduceus data pack` ({error})") from None
        two_bit_to_id = np.array([A_ID, C_ID, G_ID, T_ID], dtype=np.uint8)
        unpacked = two_bit_to_id[(codes[:, None] >> np.array([6, 4, 2, 0], dtype=np.uint8)) & 3].reshape(-1)
        self.chrom_lengths = {name: int(n) for name, n in zip(names, lengths, strict=True)}
        self._ids = {}
        for index, (name, length, offset) in enumerate(zip(names, lengths, offsets, strict=True)):
            ids = unpacked[4 * offset : 4 * offset + length].copy()
            for start, end in other_runs[other_runs[:, 0] == index, 1:]:
                ids[start:end] = PAD_ID
            self._ids[name] = ids

    def fetch(self, chrom: str, start: int, end: int) -> np.ndarray:
        return self._ids[chrom][start:end]


def pack_genome(genome: Genome, path: str | os.PathLike) -> None:
    """Write ``genome`` as 2-bit codes (A C G T = 0 1 2 3, four per byte) plus the runs of non-ACGT
    bases (kept as [PAD] when read back), each chromosome starting on a byte boundary."""
    names = list(genome.chrom_lengths)
    lengths = np.array([genome.chrom_lengths[n] for n in names], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum((lengths + 3) // 4)[:-1]]).astype(np.int64)
    id_to_two_bit = np.zeros(256, dtype=np.uint8)
    id_to_two_bit[[A_ID, C_ID, G_ID, T_ID]] = [0, 1, 2, 3]
    chunks, runs = [], []
    for index, name in enumerate(names):
        ids = genome.fetch(name, 0, genome.chrom_lengths[name])
        other = np.concatenate([[False], ids == PAD_ID, [False]])
        edges = np.flatnonzero(np.diff(other.astype(np.int8)))
        runs.extend((index, start, end) for start, end in zip(edges[::2], edges[1::2], strict=True))
        two_bit = id_to_two_bit[np.pad(ids, (0, -len(ids) % 4), constant_values=A_ID)].reshape(-1, 4)
        chunks.append((two_bit[:, 0] << 6) | (two_bit[:, 1] << 4) | (two_bit[:, 2] << 2) | two_bit[:, 3])
    arrays = {
        "names": np.array(names),
        "lengths": lengths,
        "offsets": offsets,
        "codes": np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8),
        "other_runs": np.array(runs, dtype=np.int64).reshape(-1, 3),
    }

    def write(temporary: str) -> None:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------
# BED splits


@dataclass(frozen=True)
class Interval:
    chrom: str
    start: int
    end: int
    split: str


def read_bed(path: str | os.PathLike, chrom_lengths: Mapping[str, int]) -> list[Interval]:
    """Intervals of a BED in the Enformer ``sequences_human.bed`` layout: chrom, start, end, split
    (train/valid/test), 0-based half-open. Every line is checked against the genome before use."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: BED file not found")
    intervals = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#") or fields[0] in ("track", "browser"):
                continue
            where = f"{path}:{line_number}"
            if len(fields) < 4:
                raise DataError(f"{where}: expected 4 columns (chrom start end split), got {len(fields)}")
            chrom, start_text, end_text, split = fields[:4]
            try:
                start, end = int(start_text), int(end_text)
            except ValueError:
                raise DataError(f"{where}: start and end must be integers, got {start_text!r} {end_text!r}") from None
            if split not in SPLITS:
                raise DataError(f"{where}: split must be one of {', '.join(SPLITS)}; got {split!r}")
            if chrom not in chrom_lengths:
                known = ", ".join(list(chrom_lengths)[:10]) + (" …" if len(chrom_lengths) > 10 else "")
                raise DataError(f"{where}: chromosome {chrom!r} is not in the FASTA (it has: {known})")
            if not 0 <= start < end <= chrom_lengths[chrom]:
                raise DataError(
                    f"{where}: interval {chrom}:{start}-{end} is out of range "
                    f"(need 0 <= start < end <= {chrom_lengths[chrom]}, the length of {chrom})"
                )
            intervals.append(Interval(chrom, start, end, split))
    if not intervals:
        raise DataError(f"{path}: BED file has no intervals")
    return intervals


def whole_genome_intervals(chrom_lengths: Mapping[str, int]) -> list[Interval]:
    """Without a BED every chromosome is training data."""
    return [Interval(name, 0, length, "train") for name, length in chrom_lengths.items() if length > 0]


def open_data(
    fasta: str | os.PathLike | None = None,
    packed: str | os.PathLike | None = None,
    bed: str | os.PathLike | None = None,
) -> tuple[Genome, list[Interval]]:
    """The genome named by exactly one of ``fasta`` and ``packed``, and its intervals: from ``bed``,
    else from the BED stored in the packed directory, else every chromosome as training data."""
    if (fasta is None) == (packed is None):
        raise DataError("give exactly one of a FASTA file (--fasta) and a packed genome directory (--packed)")
    genome = FastaGenome(fasta) if fasta is not None else PackedGenome(packed)
    if bed is None and packed is not None and (Path(packed) / PACKED_BED_NAME).is_file():
        bed = Path(packed) / PACKED_BED_NAME
    intervals = read_bed(bed, genome.chrom_lengths) if bed is not None else whole_genome_intervals(genome.chrom_lengths)
    return genome, intervals


def write_packed(fasta: str | os.PathLike, bed: str | os.PathLike | None, out_dir: str | os.PathLike) -> None:
    """``caduceus data pack``: a FASTA's genome as 2-bit codes, plus its BED checked against it, in
    ``out_dir``, readable by ``open_data(packed=out_dir)`` without pyfaidx."""
    genome = FastaGenome(fasta)
    bed_text = None
    if bed is not None:
        read_bed(bed, genome.chrom_lengths)
        bed_text = Path(bed).read_text(encoding="utf-8")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pack_genome(genome, out_dir / PACKED_GENOME_NAME)
    if bed_text is None:
        (out_dir / PACKED_BED_NAME).unlink(missing_ok=True)
    else:
        atomic_write(out_dir / PACKED_BED_NAME, lambda path: Path(path).write_text(bed_text, encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# Windows and masked-LM examples


class WindowDataset(Dataset):
    """Token ids (uint8, length ``seq_len``) of the windows cut from one split's intervals.

    Each interval is extended to at least ``extend_to`` bases from its start (as published; extended
    intervals may overlap other intervals), but not past the chromosome end, and cut into non-overlapping
    windows; a remainder shorter than a window is dropped. An interval shorter than one window gives one
    window, shifted back inside the chromosome if it would run past the end; a chromosome shorter than a
    window is padded with [PAD].
    """

    def __init__(
        self,
        genome: Genome,
        intervals: list[Interval],
        split: str,
        seq_len: int,
        extend_to: int = DEFAULT_EXTEND_TO,
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        if seq_len < 1:
            raise DataError(f"sequence length must be positive, got {seq_len}")
        self.genome, self.split, self.seq_len = genome, split, seq_len
        self.chrom_names = list(genome.chrom_lengths)
        chrom_index = {name: i for i, name in enumerate(self.chrom_names)}
        chroms, starts = [np.zeros(0, dtype=np.int32)], [np.zeros(0, dtype=np.int64)]
        for interval in intervals:
            if interval.split != split:
                continue
            chrom_length = genome.chrom_lengths[interval.chrom]
            span_end = min(interval.start + max(interval.end - interval.start, extend_to), chrom_length)
            n_windows = max((span_end - interval.start) // seq_len, 1)
            window_starts = interval.start + seq_len * np.arange(n_windows, dtype=np.int64)
            chroms.append(np.full(len(window_starts), chrom_index[interval.chrom], dtype=np.int32))
            starts.append(np.minimum(window_starts, max(chrom_length - seq_len, 0)))
        self.chroms, self.starts = np.concatenate(chroms), np.concatenate(starts)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> np.ndarray:
        start = int(self.starts[index])
        ids = self.genome.fetch(self.chrom_names[self.chroms[index]], start, start + self.seq_len)
        if len(ids) < self.seq_len:
            ids = np.pad(ids, (0, self.seq_len - len(ids)), constant_values=PAD_ID)
        return ids


def reverse_complement_ids(ids: np.ndarray) -> np.ndarray:
    return COMPLEMENT[ids[::-1]]


def mask_tokens(
    ids: np.ndarray, rng: np.random.Generator, mask_prob: float = DEFAULT_MASK_PROB, mask_only: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking as published: returns (inputs, targets), targets [PAD] where not selected.

    ``mask_only`` turns every selected position into [MASK] (a clean evaluation protocol); the same
    ``rng`` state selects the same positions either way.
    """
    selected = rng.random(ids.shape) < mask_prob
    action = rng.random(ids.shape)
    random_ids = rng.integers(0, VOCAB_SIZE, size=ids.shape, dtype=np.uint8)
    inputs = ids.copy()
    if mask_only:
        inputs[selected] = MASK_ID
    else:
        inputs[selected & (action < 0.8)] = MASK_ID
        replaced = selected & (action >= 0.8) & (action < 0.9)
        inputs[replaced] = random_ids[replaced]
    targets = np.where(selected, ids, np.uint8(PAD_ID)).astype(np.uint8)
    return inputs, targets


class MaskedLMDataset(Dataset):
    """Masked-LM examples keyed by (epoch, window index); the randomness depends only on the key.

    Returns uint8 tensors (inputs, targets) of length ``seq_len``; cast to int64 on the device.
    """

    def __init__(
        self,
        windows: WindowDataset,
        seed: int,
        mask_prob: float = DEFAULT_MASK_PROB,
        rc_aug: bool = False,
        mask_only: bool = False,
    ) -> None:
        self.windows, self.seed, self.mask_prob = windows, seed, mask_prob
        self.rc_aug, self.mask_only = rc_aug, mask_only

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        rng = np.random.default_rng([self.seed, SPLIT_CODES[self.windows.split], epoch, index])
        ids = self.windows[index]
        if self.rc_aug and rng.random() < 0.5:
            ids = reverse_complement_ids(ids)
        inputs, targets = mask_tokens(ids, rng, self.mask_prob, self.mask_only)
        return torch.from_numpy(inputs), torch.from_numpy(targets)


class StepBatchSampler(Sampler):
    """This process's micro-batches of (epoch, window) keys for global steps ``start_step`` to ``end_step``.

    The global batch of a step is a slice of a per-epoch permutation seeded by (seed, epoch), so it
    depends on the step number only. Rank ``r`` of ``world_size`` takes the r-th contiguous share of it
    and yields that share in micro-batches of ``micro_batch_size``: together the ranks cover the global
    batch exactly once, whatever the number of processes.
    """

    def __init__(
        self,
        n_windows: int,
        batch_size: int,
        micro_batch_size: int,
        seed: int,
        start_step: int,
        end_step: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        share, remainder = divmod(batch_size, world_size)
        if remainder or share % micro_batch_size:
            raise DataError(
                f"batch size {batch_size} must split into {world_size} process(es) × micro-batches of "
                f"{micro_batch_size}"
            )
        if n_windows < batch_size:
            raise DataError(f"the training split has {n_windows} windows, fewer than one batch of {batch_size}")
        self.n_windows, self.batch_size, self.micro_batch_size = n_windows, batch_size, micro_batch_size
        self.seed, self.start_step, self.end_step, self.rank, self.share = seed, start_step, end_step, rank, share
        self.steps_per_epoch = n_windows // batch_size
        self._permutation: tuple[int, np.ndarray] | None = None

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        """The (epoch, window) keys of the whole batch of ``step``, over all processes."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._permutation is None or self._permutation[0] != epoch:
            self._permutation = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_windows))
        windows = self._permutation[1][position * self.batch_size : (position + 1) * self.batch_size]
        return [(epoch, int(w)) for w in windows]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.end_step):
            mine = self.global_batch(step)[self.rank * self.share : (self.rank + 1) * self.share]
            for start in range(0, self.share, self.micro_batch_size):
                yield mine[start : start + self.micro_batch_size]

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * (self.share // self.micro_batch_size)


# ----------------------------------------------------------------------------------------------
# `caduceus data ...`


def add_command(subparsers) -> None:
    """Register ``caduceus data grch37`` and ``caduceus data pack``."""
    parser = subparsers.add_parser("data", help="obtain and prepare pretraining data")
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="<data command>")
    grch37 = commands.add_parser(
        "grch37",
        help="GRCh37 chr20 + chrX 0-70 Mb from Debian packages, with a BED of train/valid/test splits",
        description="Fetch GRCh37 chr20 (vt-examples) and chrX 0-70 Mb (smalt-examples) with apt-get, check their "
        "md5, and write DIR/grch37_chr20_chrX.fa (+ .fai) and DIR/splits.bed: chrX 60-70 Mb test, chr20 "
        "55-60 Mb valid, the rest train.",
    )
    grch37.add_argument("directory", type=Path, help="output directory")
    grch37.add_argument("--pack", action="store_true", help="also write DIR/packed/ (see `caduceus data pack`)")
    grch37.set_defaults(run=_run_grch37)
    pack = commands.add_parser(
        "pack",
        help="pack a FASTA (+ BED) into 2 bits per base, to carry to a training machine",
        description="Write OUT_DIR/genome.npz (2 bits per base, non-ACGT runs kept) and OUT_DIR/splits.bed; "
        "train from it with `caduceus pretrain --packed OUT_DIR`, no pyfaidx needed.",
    )
    pack.add_argument("out_dir", type=Path, help="output directory")
    pack.add_argument("--fasta", type=Path, required=True, help="FASTA file (plain, or bgzip with biopython)")
    pack.add_argument("--bed", type=Path, help="BED of splits (chrom start end train|valid|test)")
    pack.set_defaults(run=_run_pack)


def _run_grch37(args) -> None:
    from caduceus.grch37 import build_grch37

    fasta = build_grch37(args.directory, pack=args.pack)
    print(f"wrote {fasta}, {fasta}.fai and {args.directory / 'splits.bed'}")


def _run_pack(args) -> None:
    write_packed(args.fasta, args.bed, args.out_dir)
    print(f"wrote {args.out_dir / PACKED_GENOME_NAME}")
