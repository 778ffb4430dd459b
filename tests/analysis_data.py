"""Shared by the tests of vep, track, embed and benchmark: the committed HNF4A slice and tiny FASTAs."""

from pathlib import Path

VEP_DATA = Path(__file__).parent / "data" / "vep"
SLICE = VEP_DATA / "hnf4a_slice.fa"


def write_fasta(path: Path, records: dict[str, str]) -> Path:
    path.write_text("".join(f">{name}\n{sequence}\n" for name, sequence in records.items()))
    return path
