"""``caduceus track`` on the committed HNF4A slice of GRCh37 chr20."""

import numpy as np
import pytest
import torch

from caduceus._genomics import Reference, parse_region
from caduceus.cli import main
from caduceus.data import DataError
from caduceus.modeling import CaduceusForMaskedLM, conjoined_logits
from caduceus.tokenizer import MASK_ID, CaduceusTokenizer
from caduceus.track import _tiles, entropy_path, score_region
from tests.analysis_data import SLICE, write_fasta
from tests.conftest import FIXTURES

PH, PS = FIXTURES / "ph_d32_n2", FIXTURES / "ps_d32_n2"


@pytest.mark.parametrize(("start", "end", "chrom_length", "window"),
                         [(0, 1000, 20_000, 64), (19_950, 20_000, 20_000, 64), (5, 17, 40, 64), (100, 333, 400, 31)])
def test_tiles_cover_each_base_once_inside_the_chromosome(start, end, chrom_length, window):
    covered = []
    for tile_start, tile_end, core_start, core_end in _tiles(start, end, chrom_length, window):
        assert 0 <= tile_start <= core_start < core_end <= tile_end <= chrom_length
        assert tile_end - tile_start == min(window, chrom_length)
        covered += range(core_start, core_end)
    assert covered == list(range(start, end))


def test_one_masked_base_per_pass_equals_the_direct_computation():
    """A stride as long as the region masks one base per pass: the result must be the direct one."""
    scores = score_region(SLICE, "chr20", 10_200, 10_204, PH, window=32, stride=4)
    model = CaduceusForMaskedLM.from_pretrained(PH).eval()
    reference = Reference(SLICE)
    for position in range(10_200, 10_204):
        tile_start, tile_end, _, _ = next(t for t in _tiles(10_200, 10_204, 20_000, 32) if t[2] <= position < t[3])
        bases = reference.bases("chr20", tile_start, tile_end)
        ids = CaduceusTokenizer(add_special_tokens=False)(bases).input_ids
        ids[0, position - tile_start] = MASK_ID
        with torch.no_grad():
            probs = conjoined_logits(model, ids)[0, position - tile_start, 7:11].softmax(-1).numpy()
        i = position - 10_200
        assert scores.ref_prob[i] == pytest.approx(probs["ACGT".index(bases[position - tile_start])], rel=1e-5)
        assert scores.entropy[i] == pytest.approx(-(probs * np.log2(probs)).sum(), rel=1e-5)


def test_values_are_probabilities_and_n_gets_none(tmp_path):
    bases = Reference(SLICE).bases("chr20", 10_000, 10_300)
    fasta = write_fasta(tmp_path / "n.fa", {"chr1": bases[:100] + "NNNNN" + bases[105:]})
    scores = score_region(fasta, "1", 50, 250, PS, window=64, stride=4)
    assert np.isnan(scores.ref_prob[50:55]).all() and np.isnan(scores.entropy[50:55]).all()
    known = np.delete(np.arange(200), np.arange(50, 55))
    assert ((scores.ref_prob[known] > 0) & (scores.ref_prob[known] < 1)).all()
    assert ((scores.entropy[known] >= 0) & (scores.entropy[known] <= 2)).all()


def test_command_writes_bedgraph_pair(tmp_path, capsys):
    out = tmp_path / "hnf4a.bedgraph"
    assert main(["track", "--fasta", str(SLICE), "--region", "20:10,201-10,300", "--model", str(PS),
                 "--out", str(out), "--window", "64"]) == 0
    for path, name in [(out, "P(reference base)"), (entropy_path(out), "entropy (bits)")]:
        header, *lines = path.read_text().splitlines()
        assert header == f'track type=bedGraph name="{name}"'
        fields = [line.split("\t") for line in lines]
        assert [(f[0], int(f[1]), int(f[2])) for f in fields] == [("20", p, p + 1) for p in range(10_200, 10_300)]
    assert "track: scored 100 of 100 bases (0 N)" in capsys.readouterr().err


def test_command_plots(tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "hnf4a.png"
    assert main(["track", "--fasta", str(SLICE), "--region", "chr20:10201-10240", "--model", str(PH),
                 "--out", str(tmp_path / "t.bedgraph"), "--window", "32", "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_writes_bigwig(tmp_path):
    pyBigWig = pytest.importorskip("pyBigWig")
    out = tmp_path / "hnf4a.bw"
    assert main(["track", "--fasta", str(SLICE), "--region", "chr20:10201-10232", "--model", str(PH),
                 "--out", str(out), "--window", "32"]) == 0
    bigwig = pyBigWig.open(str(out))
    assert bigwig.chroms() == {"chr20": 20_000}
    values = np.array(bigwig.values("chr20", 10_200, 10_232))
    assert ((values > 0) & (values < 1)).all()


@pytest.mark.parametrize(("region", "message"), [
    ("chr21:1-100", "chromosome 'chr21' is not in"),
    ("chr20:19990-20010", "outside chr20"),
    ("chr20:200-100", "outside chr20"),
    ("chr20:a-b", "integer positions"),
])
def test_bad_region(region, message):
    with pytest.raises(DataError, match=message):
        parse_region(region, Reference(SLICE))


def test_command_reports_bad_region_before_work(tmp_path, capsys):
    out = tmp_path / "t.bedgraph"
    assert main(["track", "--fasta", str(SLICE), "--region", "chr20:0-10", "--model", str(PH), "--out", str(out)]) == 1
    assert "region 'chr20:0-10' is outside chr20 (1-20000) or empty" in capsys.readouterr().err
    assert not out.exists()


def test_one_pass_scores_every_stride_th_base(monkeypatch):
    import caduceus._genomics as genomics

    rows_per_call = []

    def counting(model, input_ids, attention_mask=None):
        rows_per_call.append(((input_ids == MASK_ID).sum(dim=1)).tolist())
        return conjoined_logits(model, input_ids, attention_mask)

    monkeypatch.setattr(genomics, "conjoined_logits", counting)
    score_region(SLICE, "chr20", 10_000, 10_200, PS, window=64, stride=8, batch_size=16)
    masked_per_pass = [n for call in rows_per_call for n in call]
    assert len(masked_per_pass) == 7 * 8  # 7 tiles with a 32-bp core, 8 passes each
    assert sum(masked_per_pass) == 200 and max(masked_per_pass) == 4
    assert len(rows_per_call) == 4  # 56 passes, 16 per forward call


def test_bundled_default_model_predicts_the_reference_better_than_chance(tmp_path):
    """No --model: the bundled pretrained Ph model, its own 1,024-bp window."""
    out = tmp_path / "default.bedgraph"
    assert main(["track", "--fasta", str(SLICE), "--region", "chr20:10101-10300", "--out", str(out)]) == 0
    values = np.array([float(line.split("\t")[3]) for line in out.read_text().splitlines()[1:]])
    assert len(values) == 200 and values.mean() > 0.3  # measured 0.317; uniform guessing gives 0.25
