"""Rebuild the VEP test data in this folder from GRCh37 chr20 and the CAGI5 HNF4A VCF.

    python tests/data/vep/make_hnf4a_slice.py --fasta grch37_chr20_chrX.fa \
        --vcf ../shared/data/vep/cagi5_hnf4a_grch37.vcf

``--fasta`` is any indexed FASTA with GRCh37 chr20 as record ``20`` (``caduceus data grch37 DIR`` writes
one; the sequence comes from the Debian package vt-examples). It writes:

- ``hnf4a_slice.fa``: chr20:42,974,001-42,994,000 (20,000 bp around the HNF4A P2 promoter), as one record
  named ``chr20``; position p of the record is chr20:p + 42,974,000.
- ``hnf4a_cagi5.vcf``: the 186 CAGI5 variants with positions shifted into the slice, contig kept as ``20``
  (so reading it against the slice exercises the ``20`` / ``chr20`` naming).
- ``cases.vcf``: records that each exercise one bad-input rule, built on real slice bases.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyfaidx

CHROM = "20"
RECORD_NAME = "chr20"
SLICE_START = 42_974_000  # 0-based start; the slice is [SLICE_START, SLICE_END)
SLICE_END = 42_994_000
LINE_WIDTH = 60
HERE = Path(__file__).parent
VCF_HEADER = """##fileformat=VCFv4.2
##reference=GRCh37 chr20:42,974,001-42,994,000 as record chr20 (positions shifted by -42,974,000)
##contig=<ID=20,length=20000>
##INFO=<ID=EFFECT,Number=1,Type=Float,Description="MPRA log2 effect size">
##INFO=<ID=CONF,Number=1,Type=Float,Description="MPRA confidence score">
##INFO=<ID=ELEMENT,Number=1,Type=String,Description="Regulatory element">
##INFO=<ID=CASE,Number=1,Type=String,Description="Which input rule the record exercises">
#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO
"""


def write_slice(sequence: str) -> None:
    lines = [sequence[i : i + LINE_WIDTH] for i in range(0, len(sequence), LINE_WIDTH)]
    header = f">{RECORD_NAME} GRCh37 chr20:{SLICE_START + 1:,}-{SLICE_END:,} (Debian vt-examples 20.fa.gz)"
    (HERE / "hnf4a_slice.fa").write_text("\n".join([header, *lines]) + "\n")


def write_cagi5(vcf: Path) -> list[list[str]]:
    records = []
    for line in vcf.read_text().splitlines():
        if line.startswith("#"):
            continue
        fields = line.split("\t")
        fields[1] = str(int(fields[1]) - SLICE_START)
        records.append(fields)
    (HERE / "hnf4a_cagi5.vcf").write_text(VCF_HEADER + "".join("\t".join(r) + "\n" for r in records))
    return records


def write_cases(sequence: str, cagi5: list[list[str]]) -> None:
    """One record per rule; REF is read from the slice unless the case is about a wrong REF."""

    def ref(pos: int, length: int = 1) -> str:
        return sequence[pos - 1 : pos - 1 + length]

    snv = cagi5[4]  # a CAGI5 variant with CONF 1
    pos = int(snv[1])
    other = next(b for b in "ACGT" if b != ref(pos + 10))
    last = len(sequence) - 2
    cases = [
        (CHROM, pos, ref(pos), snv[4], "snv"),
        (CHROM, pos + 10, ref(pos + 10), ",".join(b for b in "ACGT" if b != ref(pos + 10)), "multi_allelic"),
        (CHROM, pos + 20, next(b for b in "ACGT" if b != ref(pos + 20)), ref(pos + 20), "ref_mismatch"),
        ("21", pos, ref(pos), other, "unknown_chrom"),
        (CHROM, pos + 30, ref(pos + 30, 3), ref(pos + 30), "deletion"),
        (CHROM, pos + 40, ref(pos + 40), ref(pos + 40) + "GATTACA", "insertion"),
        (CHROM, 3, ref(3), next(b for b in "ACGT" if b != ref(3)), "near_start"),
        (CHROM, last, ref(last), next(b for b in "ACGT" if b != ref(last)), "near_end"),
        (CHROM, pos + 50, ref(pos + 50), "<DEL>", "symbolic"),
        (CHROM, pos + 60, ref(pos + 60), ".", "no_alt"),
        (CHROM, len(sequence) + 100, "A", "C", "out_of_range"),
    ]
    body = "".join(f"{c}\t{p}\t.\t{r}\t{a}\t.\t.\tCASE={case}\n" for c, p, r, a, case in cases)
    (HERE / "cases.vcf").write_text(VCF_HEADER + body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fasta", type=Path, required=True, help="indexed FASTA with GRCh37 chr20 as record 20")
    parser.add_argument("--vcf", type=Path, required=True, help="cagi5_hnf4a_grch37.vcf")
    args = parser.parse_args()
    sequence = pyfaidx.Fasta(str(args.fasta), as_raw=True)[CHROM][SLICE_START:SLICE_END].upper()
    write_slice(sequence)
    write_cases(sequence, write_cagi5(args.vcf))


if __name__ == "__main__":
    main()
