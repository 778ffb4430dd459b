"""Rebuild the tiny Genomic Benchmarks sample in this folder from the shared GRCh37 subset.

    python tests/data/benchmark/make_sample.py ../shared/data/genomic_benchmarks_grch37_subset

Keeps the first rows of each class of ``human_enhancers_cohn`` (real sequences, real labels): 12 per
class from train, 8 per class from test, in the same layout (``<dataset>/{train,test}.tsv.gz``).
"""

from __future__ import annotations

import argparse
import csv
import gzip
from pathlib import Path

DATASET = "human_enhancers_cohn"
PER_CLASS = {"train": 12, "test": 8}
HERE = Path(__file__).parent / "genomic_benchmarks_grch37_subset" / DATASET


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("subset", type=Path, help="the genomic_benchmarks_grch37_subset folder")
    source = parser.parse_args().subset / DATASET
    HERE.mkdir(parents=True, exist_ok=True)
    for split, per_class in PER_CLASS.items():
        with gzip.open(source / f"{split}.tsv.gz", "rt") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            rows, taken = [], {}
            for row in reader:
                if taken.get(row["label"], 0) < per_class:
                    taken[row["label"]] = taken.get(row["label"], 0) + 1
                    rows.append(row)
            fields = reader.fieldnames
        text = "\t".join(fields) + "\n" + "".join("\t".join(r[f] for f in fields) + "\n" for r in rows)
        with gzip.GzipFile(HERE / f"{split}.tsv.gz", "wb", mtime=0) as out:
            out.write(text.encode())


if __name__ == "__main__":
    main()
