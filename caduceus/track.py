"""Per-base scores along a region: ``caduceus track`` and ``score_region``.

At every base the masked-LM distribution over A, C, G, T with that base masked (renormalised over the
four bases; both strands, as in ``caduceus.vep``) gives two tracks: the probability of the reference
base, and the entropy of the distribution in bits (0 = certain, 2 = uniform). Bases that are N get no
value.

Cost: a tile of ``window`` bases scores its central half (a quarter of the window of context on either
side, shifted inside the chromosome at its ends), and one forward pass masks every ``stride``-th base
of that half at once (default 8: 12.5 % masked, close to the 15 % seen in pretraining), so ``stride``
passes score a whole tile, instead of one pass per base.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caduceus._genomics import (
    Reference,
    add_model_argument,
    batched,
    check_output_path,
    masked_base_log_probs,
    model_input_size,
    parse_region,
)
from caduceus.api import progress_bar, resolve_device
from caduceus.data import DataError
from caduceus.files import atomic_write
from caduceus.modeling import CaduceusForMaskedLM

DEFAULT_STRIDE = 8
DEFAULT_BATCH_SIZE = 16
BEDGRAPH_SUFFIXES = (".bedgraph", ".bg")
BIGWIG_SUFFIXES = (".bw", ".bigwig")
_BASE_INDEX = {base: i for i, base in enumerate("ACGT")}


@dataclass
class RegionScores:
    """Scores of ``chrom[start:end]`` (0-based, half-open), one value per base, NaN on N."""

    chrom: str
    start: int
    end: int
    ref_prob: np.ndarray
    entropy: np.ndarray


def _tiles(start: int, end: int, chrom_length: int, window: int) -> list[tuple[int, int, int, int]]:
    """(tile_start, tile_end, core_start, core_end) covering [start, end) with cores of half a window."""
    context = window // 4
    core = max(window - 2 * context, 1)
    tiles = []
    for core_start in range(start, end, core):
        tile_start = min(max(core_start - context, 0), max(chrom_length - window, 0))
        tiles.append((tile_start, min(tile_start + window, chrom_length), core_start, min(core_start + core, end)))
    return tiles


def score_region(
    reference: Reference | str | os.PathLike,
    chrom: str,
    start: int,
    end: int,
    model: str | os.PathLike,
    window: int | None = None,
    stride: int = DEFAULT_STRIDE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    progress: bool | None = None,
) -> RegionScores:
    """Reference-base probability and entropy at each base of ``chrom[start:end]`` (0-based, half-open;
    ``chrom`` as in the FASTA or its ``chr`` alias). ``window`` defaults to the model's input size."""
    reference = reference if isinstance(reference, Reference) else Reference(reference)
    name = reference.resolve(chrom)
    if name is None:
        raise DataError(f"chromosome {chrom!r} is not in {reference.path}")
    if not 0 <= start < end <= reference.chrom_lengths[name]:
        raise DataError(f"{chrom}:{start}-{end} is outside {name} (0-{reference.chrom_lengths[name]}) or empty")
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    window = window or model_input_size(model)
    lm = CaduceusForMaskedLM.from_pretrained(model).to(resolve_device(device)).eval()
    passes = []  # (tile_start, tile bases, masked positions): one forward pass each
    for tile_start, tile_end, core_start, core_end in _tiles(start, end, reference.chrom_lengths[name], window):
        bases = reference.bases(name, tile_start, tile_end)
        for phase in range(stride):
            first = core_start + (phase - core_start) % stride
            positions = [p for p in range(first, core_end, stride) if bases[p - tile_start] != "N"]
            if positions:
                passes.append((tile_start, bases, positions))
    ref_prob = np.full(end - start, np.nan, dtype=np.float32)
    entropy = np.full(end - start, np.nan, dtype=np.float32)
    with progress_bar(None, progress, "track", total=len(passes), unit="pass") as bar:
        for chunk in batched(passes, batch_size):
            log_probs = masked_base_log_probs(lm, [bases for _, bases, _ in chunk],
                                              [[p - s for p in positions] for s, _, positions in chunk])
            for (tile_start, bases, positions), values in zip(chunk, log_probs):
                index = np.array(positions) - start
                ref_index = [_BASE_INDEX[bases[p - tile_start]] for p in positions]
                ref_prob[index] = np.exp(values[np.arange(len(positions)), ref_index])
                entropy[index] = -(np.exp(values) * values).sum(axis=1) / math.log(2)
            bar.update(len(chunk))
    return RegionScores(name, start, end, ref_prob, entropy)


# ----------------------------------------------------------------------------------------------
# Output


def entropy_path(out: Path) -> Path:
    """Where the entropy track goes: beside ``out``, ``.entropy`` before the suffix."""
    return out.with_name(f"{out.stem}.entropy{out.suffix}")


def write_track(path: Path, chrom: str, chrom_length: int, start: int, values: np.ndarray, name: str) -> None:
    """One value per base from ``start`` (NaN skipped), as bedGraph or, for .bw/.bigwig, bigWig."""
    positions = np.flatnonzero(~np.isnan(values))
    if path.suffix.lower() in BIGWIG_SUFFIXES:
        import pyBigWig

        def write(temporary: str) -> None:
            bigwig = pyBigWig.open(temporary, "w")
            bigwig.addHeader([(chrom, chrom_length)])
            bigwig.addEntries([chrom] * len(positions), (positions + start).tolist(),
                              ends=(positions + start + 1).tolist(), values=values[positions].astype(float).tolist())
            bigwig.close()
    else:
        def write(temporary: str) -> None:
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write(f'track type=bedGraph name="{name}"\n')
                handle.writelines(f"{chrom}\t{start + p}\t{start + p + 1}\t{values[p]:.4f}\n" for p in positions)

    atomic_write(path, write)


def plot_track(scores: RegionScores, chrom: str, path: Path) -> None:
    """Both tracks over the region, one panel each, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = np.arange(scores.start, scores.end) + 1
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 4.5))
    top.plot(positions, scores.ref_prob, lw=0.7, color="tab:blue")
    top.set(ylabel="P(reference base)", ylim=(0, 1))
    bottom.plot(positions, scores.entropy, lw=0.7, color="tab:red")
    bottom.set(ylabel="entropy (bits)", ylim=(0, 2), xlabel=f"{chrom} position (1-based)")
    top.set_title(f"{chrom}:{scores.start + 1:,}-{scores.end:,} masked-LM per-base scores")
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    plt.close(figure)


def add_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "track", help="per-base masked-LM probability of the reference base and entropy along a region",
        description=__doc__.split("\n\n", 1)[1].strip(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--fasta", required=True, type=Path, help="reference FASTA")
    parser.add_argument("--region", required=True, help="chr:start-end (1-based, inclusive) or a whole chr")
    add_model_argument(parser)
    parser.add_argument("--out", required=True, type=Path,
                        help="reference-base probability track, .bedgraph or (with pyBigWig) .bw; the entropy "
                             "track is written beside it as NAME.entropy.SUFFIX")
    parser.add_argument("--plot", type=Path, help="also draw both tracks into this PNG (needs matplotlib)")
    parser.add_argument("--window", type=int, help="tile length in bases (default: the model's input size)")
    parser.add_argument("--stride", type=int, default=DEFAULT_STRIDE,
                        help="mask every STRIDE-th base per pass (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="tiles per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    out = check_output_path(args.out, BEDGRAPH_SUFFIXES + BIGWIG_SUFFIXES)
    if out.suffix.lower() in BIGWIG_SUFFIXES:
        try:
            import pyBigWig  # noqa: F401
        except ImportError:
            raise DataError(f"{out}: writing bigWig needs pyBigWig (pip install pyBigWig); or use .bedgraph") from None
    if args.plot is not None:
        check_output_path(args.plot, (".png",))
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise DataError("--plot needs matplotlib: pip install matplotlib") from None
    reference = Reference(args.fasta)
    chrom, start, end = parse_region(args.region, reference)
    scores = score_region(reference, chrom, start, end, args.model, window=args.window, stride=args.stride,
                          batch_size=args.batch_size, device=args.device)
    shown = args.region.partition(":")[0]  # the user's naming (chr20 or 20) in the output
    length = reference.chrom_lengths[chrom]
    write_track(out, shown, length, start, scores.ref_prob, "P(reference base)")
    write_track(entropy_path(out), shown, length, start, scores.entropy, "entropy (bits)")
    if args.plot is not None:
        plot_track(scores, shown, args.plot)
    scored = int((~np.isnan(scores.ref_prob)).sum())
    print(f"track: scored {scored} of {end - start} bases ({end - start - scored} N); wrote {out} and "
          f"{entropy_path(out)}" + (f" and {args.plot}" if args.plot else ""), file=sys.stderr)
