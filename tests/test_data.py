"""Pretraining data: genomes, BED splits, windows, masking, batch sharding, packing, the GRCh37 builder."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from caduceus import grch37
from caduceus.data import (
    BYTE_TO_ID,
    DataError,
    FastaGenome,
    Interval,
    MaskedLMDataset,
    PackedGenome,
    StepBatchSampler,
    WindowDataset,
    atomic_write,
    mask_tokens,
    open_data,
    read_bed,
    reverse_complement_ids,
    write_packed,
)
from caduceus.tokenizer import A_ID, C_ID, G_ID, MASK_ID, PAD_ID, T_ID, VOCAB_SIZE

DATA = Path(__file__).parent / "data"
SLICE = "chr20_35000000_35080000"


@pytest.fixture
def slice_files(tmp_path: Path) -> tuple[Path, Path]:
    """The committed chr20 slice, copied so that pyfaidx writes its index outside the repository."""
    fasta, bed = tmp_path / "slice.fa", tmp_path / "slice.bed"
    shutil.copy(DATA / "grch37_chr20_slice.fa", fasta)
    shutil.copy(DATA / "grch37_chr20_slice.bed", bed)
    return fasta, bed


def write_fasta(path: Path, records: dict[str, str], width: int = 60) -> Path:
    with open(path, "w") as out:
        for name, sequence in records.items():
            out.write(f">{name}\n")
            out.writelines(sequence[i : i + width] + "\n" for i in range(0, len(sequence), width))
    return path


def ids_of(text: str) -> np.ndarray:
    return BYTE_TO_ID[np.frombuffer(text.encode(), dtype=np.uint8)]


# ---------------------------------------------------------------- genomes


def test_fasta_genome_reads_the_slice(slice_files):
    genome = FastaGenome(slice_files[0])
    assert genome.chrom_lengths == {SLICE: 80_000}
    text = "".join(line.strip() for line in (DATA / "grch37_chr20_slice.fa").read_text().splitlines()[1:])
    np.testing.assert_array_equal(genome.fetch(SLICE, 1000, 1100), ids_of(text[1000:1100]))
    assert set(np.unique(genome.fetch(SLICE, 0, 80_000))) <= {A_ID, C_ID, G_ID, T_ID}


def test_non_acgt_becomes_pad_and_case_is_ignored(tmp_path):
    genome = FastaGenome(write_fasta(tmp_path / "g.fa", {"c": "ACGTacgtNnRY"}))
    np.testing.assert_array_equal(genome.fetch("c", 0, 12), [A_ID, C_ID, G_ID, T_ID] * 2 + [PAD_ID] * 4)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty"), (b">only_a_header\n", "no sequence"), (gzip.compress(b">c\nACGT\n", mtime=0), "bgzip")],
    ids=["empty", "header only", "plain gzip"],  # stable ids: pytest-xdist workers must collect the same tests
)
def test_unusable_fasta_is_refused(tmp_path, content, message):
    path = tmp_path / ("bad.fa.gz" if content.startswith(b"\x1f\x8b") else "bad.fa")
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as error:
        FastaGenome(path)
    assert str(path) in str(error.value)


def test_bgzip_fasta_is_read_through_its_index(tmp_path):
    bgzf = pytest.importorskip("Bio.bgzf")
    writer = bgzf.BgzfWriter(str(tmp_path / "g.fa.gz"), "wb")
    writer.write(b">c\nACGTNACGTA\nGG\n")
    writer.close()
    genome = FastaGenome(tmp_path / "g.fa.gz")
    np.testing.assert_array_equal(genome.fetch("c", 2, 12), ids_of("GTNACGTAGG"))


def test_missing_fasta_is_refused(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_data(fasta=tmp_path / "absent.fa")


def test_packed_genome_equals_fasta(tmp_path):
    rng = np.random.default_rng(0)
    records = {f"c{n}": "".join(rng.choice(list("ACGTacgtNR"), size=n)) for n in (1, 7, 1001)}
    records["c_n"] = "ACGT" + "N" * 50 + "TTGCA"
    fasta = write_fasta(tmp_path / "g.fa", records)
    bed = tmp_path / "s.bed"
    bed.write_text("c1001\t0\t900\ttrain\nc1001\t900\t1001\tvalid\n")
    write_packed(fasta, bed, tmp_path / "packed")
    genome, intervals = open_data(packed=tmp_path / "packed")
    reference = FastaGenome(fasta)
    assert isinstance(genome, PackedGenome) and genome.chrom_lengths == reference.chrom_lengths
    for name, length in reference.chrom_lengths.items():
        np.testing.assert_array_equal(genome.fetch(name, 0, length), reference.fetch(name, 0, length))
    assert intervals == [Interval("c1001", 0, 900, "train"), Interval("c1001", 900, 1001, "valid")]


def test_damaged_packed_genome_is_refused(tmp_path):
    (tmp_path / "genome.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a packed genome"):
        open_data(packed=tmp_path)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")

    def failing_write(path: str) -> None:
        Path(path).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing_write)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["file.txt"]


# ---------------------------------------------------------------- BED


def test_bed_is_read_with_comments_and_track_lines(tmp_path):
    bed = tmp_path / "s.bed"
    bed.write_text("# comment\ntrack name=x\n\nchr1\t0\t10\ttrain\nchr1 10 20 test extra columns\n")
    assert read_bed(bed, {"chr1": 20}) == [Interval("chr1", 0, 10, "train"), Interval("chr1", 10, 20, "test")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("chr2\t0\t10\ttrain", "chromosome 'chr2' is not in the FASTA"),
        ("chr1\t0\t101\ttrain", "out of range"),
        ("chr1\t-5\t10\ttrain", "out of range"),
        ("chr1\t10\t10\ttrain", "out of range"),
        ("chr1\t0\t10", "expected 4 columns"),
        ("chr1\tzero\t10\ttrain", "must be integers"),
        ("chr1\t0\t10\tvalidation", "split must be one of"),
    ],
)
def test_bad_bed_line_names_file_and_line(tmp_path, line, message):
    bed = tmp_path / "s.bed"
    bed.write_text(f"chr1\t0\t5\ttrain\n{line}\n")
    with pytest.raises(DataError, match=message) as error:
        read_bed(bed, {"chr1": 100})
    assert f"{bed}:2:" in str(error.value)


def test_bed_naming_a_chromosome_the_fasta_lacks_fails_before_any_work(slice_files, tmp_path):
    bed = tmp_path / "other.bed"
    bed.write_text(f"{SLICE}\t0\t100\ttrain\nchrX\t0\t100\ttest\n")
    with pytest.raises(DataError, match=rf"{bed}:2: chromosome 'chrX' is not in the FASTA \(it has: {SLICE}\)"):
        open_data(fasta=slice_files[0], bed=bed)


def test_empty_bed_is_refused(tmp_path):
    bed = tmp_path / "s.bed"
    bed.write_text("# nothing\n")
    with pytest.raises(DataError, match="no intervals"):
        read_bed(bed, {"chr1": 100})


# ---------------------------------------------------------------- windows


class ArrayGenome:
    def __init__(self, **chromosomes: np.ndarray) -> None:
        self.arrays = chromosomes
        self.chrom_lengths = {name: len(a) for name, a in chromosomes.items()}

    def fetch(self, chrom, start, end):
        return self.arrays[chrom][start:end]


def window_starts(dataset: WindowDataset) -> list[tuple[str, int]]:
    return [(dataset.chrom_names[c], int(s)) for c, s in zip(dataset.chroms, dataset.starts, strict=True)]


def test_windows_are_non_overlapping_chunks_of_the_split():
    genome = ArrayGenome(a=np.full(1000, A_ID, np.uint8), b=np.full(300, C_ID, np.uint8))
    intervals = [Interval("a", 0, 350, "train"), Interval("a", 350, 1000, "valid"), Interval("b", 0, 300, "train")]
    train = WindowDataset(genome, intervals, "train", seq_len=100, extend_to=0)
    assert window_starts(train) == [("a", 0), ("a", 100), ("a", 200), ("b", 0), ("b", 100), ("b", 200)]
    assert all(len(train[i]) == 100 for i in range(len(train)))
    assert len(WindowDataset(genome, intervals, "test", 100, extend_to=0)) == 0


def test_intervals_are_extended_but_not_past_the_chromosome_end():
    genome = ArrayGenome(a=np.full(1000, A_ID, np.uint8))
    extended = WindowDataset(genome, [Interval("a", 100, 150, "train")], "train", seq_len=100, extend_to=400)
    assert window_starts(extended) == [("a", 100), ("a", 200), ("a", 300), ("a", 400)]
    at_end = WindowDataset(genome, [Interval("a", 700, 750, "train")], "train", seq_len=100, extend_to=4096)
    assert window_starts(at_end) == [("a", 700), ("a", 800), ("a", 900)]


def test_short_interval_at_the_end_is_shifted_back_inside_and_short_chromosome_padded():
    genome = ArrayGenome(a=np.arange(1000, dtype=np.uint8) % 4 + A_ID, tiny=np.full(30, G_ID, np.uint8))
    shifted = WindowDataset(genome, [Interval("a", 960, 1000, "train")], "train", seq_len=100, extend_to=0)
    assert window_starts(shifted) == [("a", 900)]
    np.testing.assert_array_equal(shifted[0], genome.arrays["a"][900:])
    padded = WindowDataset(genome, [Interval("tiny", 0, 30, "train")], "train", seq_len=100, extend_to=0)
    np.testing.assert_array_equal(padded[0], [G_ID] * 30 + [PAD_ID] * 70)


# ---------------------------------------------------------------- masking


def test_masking_follows_80_10_10():
    ids = np.random.default_rng(1).choice(np.array([A_ID, C_ID, G_ID, T_ID], np.uint8), size=400_000)
    inputs, targets = mask_tokens(ids, np.random.default_rng(2))
    selected = targets != PAD_ID
    assert abs(selected.mean() - 0.15) < 0.003
    np.testing.assert_array_equal(targets[selected], ids[selected])
    np.testing.assert_array_equal(inputs[~selected], ids[~selected])
    as_mask = (inputs[selected] == MASK_ID).mean()
    unchanged = (inputs[selected] == ids[selected]).mean()
    assert abs(as_mask - 0.8) < 0.01
    # a random id equals the original 1/12 of the time: unchanged ≈ 10 % + 10 %/12
    assert abs(unchanged - (0.1 + 0.1 / VOCAB_SIZE)) < 0.01
    random_ids = inputs[selected & (inputs != MASK_ID) & (inputs != ids)]
    assert set(np.unique(random_ids).tolist()) == set(range(VOCAB_SIZE)) - {MASK_ID}  # uniform over all 12 ids


def test_mask_only_protocol_masks_the_same_positions():
    ids = np.full(10_000, A_ID, np.uint8)
    inputs, targets = mask_tokens(ids, np.random.default_rng(3))
    clean_inputs, clean_targets = mask_tokens(ids, np.random.default_rng(3), mask_only=True)
    np.testing.assert_array_equal(targets, clean_targets)
    assert ((clean_inputs == MASK_ID) == (clean_targets != PAD_ID)).all()


def test_examples_depend_only_on_their_key_and_rc_augmentation_flips_half():
    genome = ArrayGenome(a=np.random.default_rng(4).integers(A_ID, T_ID + 1, 64_000).astype(np.uint8))
    windows = WindowDataset(genome, [Interval("a", 0, 64_000, "train")], "train", seq_len=64, extend_to=0)
    data = MaskedLMDataset(windows, seed=5, rc_aug=True)
    first, again = data[(2, 17)], data[(2, 17)]
    assert all((x == y).all() for x, y in zip(first, again, strict=True))
    assert not (data[(3, 17)][1] == first[1]).all()
    flipped = 0
    for index in range(200):
        _, targets = data[(0, index)]
        selected = targets.numpy() != PAD_ID
        forward, reverse = windows[index], reverse_complement_ids(windows[index])
        is_reverse = (targets.numpy()[selected] == reverse[selected]).all()
        assert is_reverse or (targets.numpy()[selected] == forward[selected]).all()
        flipped += is_reverse
    assert 70 < flipped < 130


# ---------------------------------------------------------------- batch sharding


def test_ranks_cover_the_global_batch_exactly_once():
    full = StepBatchSampler(100, batch_size=8, micro_batch_size=8, seed=0, start_step=0, end_step=30)
    shards = [list(StepBatchSampler(100, 8, 2, 0, 0, 30, rank=r, world_size=2)) for r in range(2)]
    batches = list(full)
    assert len(batches) == 30 and all(len(shard) == 60 for shard in shards)
    for step, batch in enumerate(batches):
        assert batch == full.global_batch(step)
        ranks = [sum(shard[2 * step : 2 * step + 2], []) for shard in shards]
        assert ranks[0] + ranks[1] == batch
    epochs = [key[0] for batch in batches for key in batch]
    assert epochs == [0] * 96 + [1] * 96 + [2] * 48  # 12 steps of 8 per epoch of 100 windows
    assert len({key for batch in batches[:12] for key in batch}) == 96


def test_resumed_sampler_continues_the_same_sequence():
    whole = list(StepBatchSampler(100, 8, 4, 0, 0, 20))
    assert list(StepBatchSampler(100, 8, 4, 0, 7, 20)) == whole[14:]


@pytest.mark.parametrize(("batch", "micro", "world"), [(8, 3, 1), (9, 3, 2)])
def test_batch_that_does_not_split_is_refused(batch, micro, world):
    with pytest.raises(DataError, match="must split"):
        StepBatchSampler(100, batch, micro, 0, 0, 1, world_size=world)


def test_batch_larger_than_the_split_is_refused():
    with pytest.raises(DataError, match="fewer than one batch"):
        StepBatchSampler(5, 8, 8, 0, 0, 1)


# ---------------------------------------------------------------- GRCh37 builder


def fake_sources(tmp_path: Path) -> dict[str, Path]:
    """Small gzipped FASTAs standing in for the Debian files, with their md5s."""
    files = {}
    for package, header, sequence in [("vt-examples", ">20", "ACGTN" * 30), ("smalt-examples", ">X  gi|1|", "GT" * 40)]:
        path = tmp_path / f"{package}.fa.gz"
        path.write_bytes(gzip.compress((header + "\n" + sequence + "\n").encode()))
        files[package] = path
    return files


@pytest.fixture
def small_grch37(tmp_path, monkeypatch):
    files = fake_sources(tmp_path)
    md5 = {name: hashlib.md5(path.read_bytes()).hexdigest() for name, path in files.items()}
    sources = tuple(grch37.DebianSource(p, f"{p}.fa.gz", md5[p], record, length)
                    for p, record, length in [("vt-examples", "20", 150), ("smalt-examples", "X", 80)])
    monkeypatch.setattr(grch37, "SOURCES", sources)
    monkeypatch.setattr(grch37, "SPLIT_BLOCKS", (("20", 0, 100, "train"), ("20", 100, None, "valid"),
                                                 ("X", 0, 60, "train"), ("X", 60, None, "test")))
    return lambda source, workdir: files[source.package]


def test_build_grch37_writes_indexed_fasta_and_splits(tmp_path, small_grch37):
    out = tmp_path / "out"
    fasta = grch37.build_grch37(out, pack=True, fetch=small_grch37)
    assert sorted(p.name for p in out.iterdir()) == ["grch37_chr20_chrX.fa", "grch37_chr20_chrX.fa.fai", "packed",
                                                     "splits.bed"]
    genome, intervals = open_data(fasta=fasta, bed=out / "splits.bed")
    assert genome.chrom_lengths == {"20": 150, "X": 80}
    assert intervals[-1] == Interval("X", 60, 80, "test")
    packed, packed_intervals = open_data(packed=out / "packed")
    np.testing.assert_array_equal(packed.fetch("20", 0, 150), genome.fetch("20", 0, 150))
    assert packed_intervals == intervals


def test_build_grch37_refuses_a_wrong_md5_and_writes_nothing(tmp_path, small_grch37, monkeypatch):
    bad = grch37.SOURCES[0].__class__(**{**grch37.SOURCES[0].__dict__, "md5": "0" * 32})
    monkeypatch.setattr(grch37, "SOURCES", (bad, grch37.SOURCES[1]))
    with pytest.raises(DataError, match="md5"):
        grch37.build_grch37(tmp_path / "out", fetch=small_grch37)
    assert list((tmp_path / "out").iterdir()) == []


def test_build_grch37_checks_record_length(tmp_path, small_grch37, monkeypatch):
    wrong = grch37.SOURCES[1].__class__(**{**grch37.SOURCES[1].__dict__, "length": 81})
    monkeypatch.setattr(grch37, "SOURCES", (grch37.SOURCES[0], wrong))
    with pytest.raises(DataError, match="has 80 bases, expected 81"):
        grch37.build_grch37(tmp_path / "out", fetch=small_grch37)


def test_missing_apt_get_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    with pytest.raises(DataError, match="`apt-get` not found.*caduceus pretrain --fasta"):
        grch37.build_grch37(tmp_path / "out")
    assert not (tmp_path / "out" / grch37.FASTA_NAME).exists()


def test_published_split_layout():
    lines = grch37.split_bed_lines({"20": 63_025_520, "X": 69_999_930})
    assert lines == ["20\t0\t55000000\ttrain\n", "20\t55000000\t60000000\tvalid\n", "20\t60000000\t63025520\ttrain\n",
                     "X\t0\t60000000\ttrain\n", "X\t60000000\t69999930\ttest\n"]


@pytest.mark.skipif(not os.environ.get("CADUCEUS_NETWORK_TESTS"), reason="downloads 90 MB: CADUCEUS_NETWORK_TESTS=1")
def test_build_grch37_for_real(tmp_path):
    fasta = grch37.build_grch37(tmp_path)
    genome, intervals = open_data(fasta=fasta, bed=tmp_path / "splits.bed")
    assert genome.chrom_lengths == {"20": 63_025_520, "X": 69_999_930}
    assert Interval("X", 60_000_000, 69_999_930, "test") in intervals
