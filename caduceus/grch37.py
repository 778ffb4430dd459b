"""The human sequence obtainable offline: GRCh37 chr20 and chrX 0–70 Mb from Debian example packages.

``build_grch37(DIR)`` fetches them with ``apt-get download`` and ``dpkg-deb -x``, checks their md5,
writes one indexed plain FASTA and a BED of splits (chrX 60–70 Mb test, chr20 55–60 Mb valid, the rest
train). Anywhere without apt-get, any FASTA plus a BED in the same layout does the same job.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from caduceus.data import DataError, FastaGenome, write_packed
from caduceus.files import atomic_write

FASTA_NAME = "grch37_chr20_chrX.fa"
BED_NAME = "splits.bed"
PACKED_DIR_NAME = "packed"
MB = 1_000_000


@dataclass(frozen=True)
class DebianSource:
    """One gzipped FASTA inside a Debian package, with what it must contain."""

    package: str
    member: str
    md5: str
    record: str
    length: int


SOURCES = (
    DebianSource("vt-examples", "usr/share/doc/vt/examples/ref/20.fa.gz", "4498a28ce27a5ab21447f74eda17f706",
                 "20", 63_025_520),
    DebianSource("smalt-examples", "usr/share/doc/smalt/test/data/hs37chrXtrunc.fa.gz",
                 "66a9440f0a42849673035df4676f8a32", "X", 69_999_930),
)
# (chrom, start, end, split); end None = the end of the chromosome.
SPLIT_BLOCKS = (
    ("20", 0, 55 * MB, "train"),
    ("20", 55 * MB, 60 * MB, "valid"),
    ("20", 60 * MB, None, "train"),
    ("X", 0, 60 * MB, "train"),
    ("X", 60 * MB, None, "test"),
)

Fetch = Callable[[DebianSource, Path], Path]


def fetch_debian_file(source: DebianSource, workdir: Path) -> Path:
    """Download ``source.package`` into ``workdir`` with apt-get, unpack it there, return the member."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise DataError(
                f"`{tool}` not found: `caduceus data grch37` needs a Debian/Ubuntu system with the Debian 12 "
                "package lists. Elsewhere, pretrain on any FASTA with a BED of splits: "
                "`caduceus pretrain --fasta genome.fa --bed splits.bed`"
            )
    download = subprocess.run(["apt-get", "download", source.package], cwd=workdir, capture_output=True, text=True)
    debs = sorted(workdir.glob(f"{source.package}_*.deb"))
    if download.returncode != 0 or not debs:
        raise DataError(
            f"`apt-get download {source.package}` failed (exit {download.returncode}): {download.stderr.strip()}\n"
            "The package is in Debian 12 (bookworm); `apt-get update` may be needed first."
        )
    unpacked = workdir / f"{source.package}-files"
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], check=True, capture_output=True)
    member = unpacked / source.member
    if not member.is_file():
        raise DataError(f"{debs[-1].name} does not contain {source.member}")
    return member


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def copy_checked_record(source: DebianSource, fasta_gz: Path, out) -> None:
    """Append the single FASTA record of ``fasta_gz`` to ``out``, checking its name and length."""
    with gzip.open(fasta_gz, "rt", encoding="ascii") as handle:
        header = handle.readline()
        if header.split()[:1] != [f">{source.record}"]:
            raise DataError(f"{source.member}: expected a record named {source.record}, got {header.strip()!r}")
        out.write(header)
        length = 0
        for line in handle:
            if line.startswith(">"):
                raise DataError(f"{source.member}: expected one record, found a second: {line.strip()!r}")
            length += len(line.rstrip("\n"))
            out.write(line)
    if length != source.length:
        raise DataError(f"{source.member}: record {source.record} has {length} bases, expected {source.length}")


def split_bed_lines(chrom_lengths: dict[str, int]) -> list[str]:
    return [f"{chrom}\t{start}\t{chrom_lengths[chrom] if end is None else end}\t{split}\n"
            for chrom, start, end, split in SPLIT_BLOCKS]


def build_grch37(directory: str | os.PathLike, pack: bool = False, fetch: Fetch = fetch_debian_file) -> Path:
    """Write ``DIR/grch37_chr20_chrX.fa`` (+ .fai) and ``DIR/splits.bed``; with ``pack`` also
    ``DIR/packed/`` (``caduceus data pack`` output, ≈ 33 MB). Returns the FASTA path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fasta_path = directory / FASTA_NAME
    with tempfile.TemporaryDirectory(dir=directory, prefix=".grch37-") as work:
        work = Path(work)
        fastas_gz = []
        for source in SOURCES:
            print(f"fetching {source.package} ...", flush=True)
            fasta_gz = fetch(source, work)
            found = md5sum(fasta_gz)
            if found != source.md5:
                raise DataError(f"{source.package}:{source.member}: md5 {found}, expected {source.md5}")
            fastas_gz.append(fasta_gz)
        print(f"writing {fasta_path} ...", flush=True)
        temporary_fasta = work / FASTA_NAME
        with open(temporary_fasta, "w", encoding="ascii") as out:
            for source, fasta_gz in zip(SOURCES, fastas_gz, strict=True):
                copy_checked_record(source, fasta_gz, out)
        genome = FastaGenome(temporary_fasta)  # writes the .fai next to it
        os.replace(f"{temporary_fasta}.fai", f"{fasta_path}.fai")
        os.replace(temporary_fasta, fasta_path)
    bed_lines = split_bed_lines(dict(genome.chrom_lengths))
    atomic_write(directory / BED_NAME, lambda path: Path(path).write_text("".join(bed_lines)))
    if pack:
        write_packed(fasta_path, directory / BED_NAME, directory / PACKED_DIR_NAME)
    return fasta_path

