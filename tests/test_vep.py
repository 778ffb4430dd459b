"""``caduceus vep`` on a committed slice of GRCh37 chr20 around HNF4A (tests/data/vep, see its script)."""

import csv
import gzip
import shutil

import numpy as np
import pytest
import torch

from caduceus._genomics import Reference
from caduceus.cli import main
from caduceus.data import DataError
from caduceus.modeling import CaduceusForMaskedLM
from caduceus.tokenizer import MASK_ID, CaduceusTokenizer, reverse_complement
from caduceus.vep import read_vcf, score_variants, variant_labels
from tests.analysis_data import SLICE, VEP_DATA, write_fasta
from tests.conftest import FIXTURES

CASES = VEP_DATA / "cases.vcf"
CAGI5 = VEP_DATA / "hnf4a_cagi5.vcf"
PH, PS = FIXTURES / "ph_d32_n2", FIXTURES / "ps_d32_n2"
WINDOW = 64
VCF_HEADER = "##fileformat=VCFv4.2\n##contig=<ID=chr1>\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"


def rows_by_case(model):
    variants = read_vcf(CASES, ["CASE"])
    scores = score_variants(variants, Reference(SLICE), model, window=WINDOW)
    by_case = {}
    for row in scores.rows:
        by_case.setdefault(row["CASE"], []).append(row)
    return scores, by_case


@pytest.mark.parametrize("model", [PH, PS], ids=["ph", "ps"])
def test_every_input_rule(model):
    scores, case = rows_by_case(model)
    [snv] = case["snv"]
    assert snv["status"] == "ok" and snv["type"] == "snv"
    assert np.isfinite(snv["llr"]) and snv["embedding_cosine_distance"] > 0 and snv["embedding_l2_distance"] > 0
    # VCF contig "20", FASTA record "chr20": found under its alias
    assert (snv["window_start"], snv["window_end"]) == (snv["pos"] - WINDOW // 2, snv["pos"] + WINDOW // 2 - 1)
    assert [r["alt"] for r in case["multi_allelic"]] == ["A", "G", "T"]
    assert all(r["status"] == "ok" for r in case["multi_allelic"])
    assert len({r["llr"] for r in case["multi_allelic"]}) == 3
    [mismatch] = case["ref_mismatch"]
    assert mismatch["status"] == "ref_mismatch" and mismatch["detail"] == "reference has G"
    assert "llr" not in mismatch and "embedding_l2_distance" not in mismatch
    assert case["unknown_chrom"][0]["status"] == "unknown_chrom"
    for indel in case["deletion"] + case["insertion"]:
        assert indel["status"] == "ok" and indel["type"] == "indel"
        assert "llr" not in indel and indel["embedding_l2_distance"] > 0
    # windows at the chromosome ends are shifted inside, never padded
    assert case["near_start"][0]["status"] == "ok" and case["near_start"][0]["window_start"] == 1
    assert case["near_end"][0]["status"] == "ok" and case["near_end"][0]["window_end"] == 20_000
    assert case["symbolic"][0]["status"] == "symbolic_alt"
    assert case["no_alt"][0]["status"] == "no_alt"
    assert case["out_of_range"][0]["status"] == "position_out_of_range"
    assert scores.summary() == ("scored 8 of 13 variants; skipped: ref_mismatch 1, unknown_chrom 1, symbolic_alt 1, "
                                "no_alt 1, position_out_of_range 1")


def test_llr_is_the_masked_lm_log_ratio_averaged_over_both_strands():
    variant = read_vcf(CASES)[0]
    reference = Reference(SLICE)
    [row] = score_variants([variant], reference, PH, window=WINDOW, embeddings=False).rows
    window = reference.bases("chr20", row["window_start"] - 1, row["window_end"])
    offset = variant.pos - row["window_start"]
    model = CaduceusForMaskedLM.from_pretrained(PH).eval()
    llrs = []
    for sequence, position, ref, alt in [(window, offset, variant.ref, variant.alt),
                                         (reverse_complement(window), WINDOW - 1 - offset,
                                          reverse_complement(variant.ref), reverse_complement(variant.alt))]:
        ids = CaduceusTokenizer(add_special_tokens=False)(sequence).input_ids
        ids[0, position] = MASK_ID
        with torch.no_grad():
            log_probs = model(ids).logits[0, position, 7:11].log_softmax(-1)
        llrs.append(float(log_probs["ACGT".index(alt)] - log_probs["ACGT".index(ref)]))
    assert llrs[0] != pytest.approx(llrs[1], abs=1e-3)  # Ph alone is not strand-symmetric
    assert row["llr"] == pytest.approx(np.mean(llrs), abs=1e-5)


@pytest.mark.parametrize("model", [PH, PS], ids=["ph", "ps"])
def test_scores_do_not_depend_on_the_strand_of_the_reference(model, tmp_path):
    """A chromosome shorter than the window is scored whole, so its reverse complement gives the
    mirrored window: llr and distances must agree (exactly for PS, by conjoining for Ph)."""
    bases = Reference(SLICE).bases("chr20", 10_180, 10_240)
    forward = write_fasta(tmp_path / "forward.fa", {"chr1": bases})
    reverse = write_fasta(tmp_path / "reverse.fa", {"chr1": reverse_complement(bases)})
    position = 25
    ref = bases[position - 1]
    alt = next(b for b in "ACGT" if b != ref)
    plus = read_vcf(_vcf(tmp_path / "plus.vcf", f"chr1\t{position}\t.\t{ref}\t{alt}\t.\t.\t.\n"))
    minus = read_vcf(_vcf(tmp_path / "minus.vcf", f"chr1\t{len(bases) + 1 - position}\t.\t"
                                                  f"{reverse_complement(ref)}\t{reverse_complement(alt)}\t.\t.\t.\n"))
    [a] = score_variants(plus, forward, model, window=WINDOW).rows
    [b] = score_variants(minus, reverse, model, window=WINDOW).rows
    for column in ("llr", "embedding_cosine_distance", "embedding_l2_distance"):
        assert a[column] == pytest.approx(b[column], rel=1e-4, abs=1e-6), column


def _vcf(path, body):
    path.write_text(VCF_HEADER + body)
    return path


def test_n_rich_window_is_reported_with_its_fraction(tmp_path):
    bases = Reference(SLICE).bases("chr20", 10_000, 10_400)
    masked = bases[:210] + "N" * 8 + bases[218:]  # 8 N in the 64-bp window around position 200
    fasta = write_fasta(tmp_path / "n.fa", {"chr1": masked})
    variants = read_vcf(_vcf(tmp_path / "v.vcf", f"chr1\t200\t.\t{bases[199]}\tA,C,G,T\t.\t.\t.\n"))
    variants = [v for v in variants if v.alt != v.ref]
    rows = score_variants(variants, fasta, PS, window=WINDOW).rows
    assert {r["status"] for r in rows} == {"n_rich_window"}
    assert rows[0]["detail"] == "12.5% N in the window (limit 0.5%)"
    relaxed = score_variants(variants, fasta, PS, window=WINDOW, max_n_fraction=0.2).rows
    assert {r["status"] for r in relaxed} == {"ok"}


def test_malformed_vcf_line_names_file_and_line(tmp_path):
    path = _vcf(tmp_path / "bad.vcf", "chr1\t100\t.\tA\tG\t.\t.\t.\nchr1\tabc\t.\tA\tG\t.\t.\t.\n")
    with pytest.raises(DataError, match=rf"{path}:5: malformed VCF record .*'chr1\\tabc"):
        read_vcf(path)
    truncated = _vcf(tmp_path / "short.vcf", "chr1\t100\t.\tA\n")
    with pytest.raises(DataError, match=rf"{truncated}:4: malformed VCF record"):
        read_vcf(truncated)
    (tmp_path / "not.vcf").write_text("hello\n")
    with pytest.raises(DataError, match="not a readable VCF"):
        read_vcf(tmp_path / "not.vcf")
    with pytest.raises(DataError, match="VCF file not found"):
        read_vcf(tmp_path / "missing.vcf")
    with pytest.raises(DataError, match="INFO field.*NOPE.*not declared"):
        read_vcf(CAGI5, ["NOPE"])


def test_reference_problems_are_clear(tmp_path):
    with pytest.raises(DataError, match="FASTA file not found"):
        Reference(tmp_path / "missing.fa")
    plain_gzip = tmp_path / "slice.fa.gz"
    plain_gzip.write_bytes(gzip.compress(SLICE.read_bytes()))
    with pytest.raises(DataError, match="bgzip"):
        Reference(plain_gzip)
    unindexed = shutil.copy(SLICE, tmp_path / "slice.fa")  # no .fai beside it: built on open
    assert Reference(unindexed).chrom_lengths == {"chr20": 20_000}
    assert (tmp_path / "slice.fa.fai").is_file()


def test_bgzip_reference(tmp_path):
    pytest.importorskip("Bio", reason="pyfaidx reads bgzip FASTA through biopython")
    pysam = pytest.importorskip("pysam")
    compressed = tmp_path / "slice.fa.gz"
    pysam.tabix_compress(str(SLICE), str(compressed))
    assert Reference(compressed).bases("chr20", 10_206, 10_210) == Reference(SLICE).bases("chr20", 10_206, 10_210)


def test_chromosome_aliases(tmp_path):
    fasta = write_fasta(tmp_path / "named.fa", {"20": "ACGT", "MT": "AAAA"})
    reference = Reference(fasta)
    assert [reference.resolve(n) for n in ("20", "chr20", "chrM", "M", "21")] == ["20", "20", "MT", "MT", None]
    assert Reference(SLICE).resolve("20") == "chr20"


def test_labels_must_be_usable_before_any_work():
    variants = read_vcf(CAGI5, ["ELEMENT", "CONF"])
    with pytest.raises(DataError, match=rf"{CAGI5}:9: 20:10207 G>A: INFO ELEMENT='HNF4A' is not 0/1"):
        variant_labels(variants, "ELEMENT", path=CAGI5)
    labels = variant_labels(variants, "CONF", threshold=0.1)
    assert sum(labels) == 18 and len(labels) == 186


def test_command_end_to_end_with_supervised_protocol(tmp_path, capsys):
    out = tmp_path / "scores.tsv"
    assert main(["vep", "--fasta", str(SLICE), "--vcf", str(CAGI5), "--model", str(PS), "--out", str(out),
                 "--window", str(WINDOW), "--info", "EFFECT", "--labels", "CONF", "--label-threshold", "0.1",
                 "--batch-size", "64"]) == 0
    with open(out) as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert list(rows[0])[:5] == ["chrom", "pos", "ref", "alt", "status"]
    assert {"llr", "embedding_cosine_distance", "EFFECT", "CONF", "label", "svm_cv_score"} <= set(rows[0])
    assert len(rows) == 186 and {r["status"] for r in rows} == {"ok"}
    assert sum(r["label"] == "1" for r in rows) == 18
    message = capsys.readouterr().err
    assert "vep: scored 186 of 186 variants; wrote" in message
    assert "5-fold cross-validated AUROC" in message


def test_command_refuses_bad_output_before_work(tmp_path, capsys):
    common = ["vep", "--fasta", str(SLICE), "--vcf", str(CASES), "--model", str(PH)]
    assert main([*common, "--out", str(tmp_path / "scores.csv")]) == 1
    assert "output must end with one of .tsv, .parquet" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "missing" / "scores.tsv")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_parquet_output(tmp_path):
    pandas = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    out = tmp_path / "scores.parquet"
    assert main(["vep", "--fasta", str(SLICE), "--vcf", str(CASES), "--model", str(PH), "--out", str(out),
                 "--window", str(WINDOW), "--no-embeddings"]) == 0
    table = pandas.read_parquet(out)
    assert list(table.columns[:5]) == ["chrom", "pos", "ref", "alt", "status"]
    assert (table["status"] == "indel_without_embeddings").sum() == 2
    assert table.loc[table["status"] == "ok", "llr"].notna().all()
