"""Is the pretrained model any good? Masked-LM perplexity on the held-out test block against baselines.

On the test split (for the GRCh37 data of ``caduceus data grch37``: chrX 60-70 Mb), cut into
non-overlapping windows of ``--seq-len``, 15 % of the positions are selected with a fixed seed and
scored under two protocols:

- ``80/10/10``: the training protocol: 80 % of the selected positions show [MASK], 10 % a random id,
  10 % the true base (which the model may copy and the baselines do not look at);
- ``mask-only``: every selected position shows [MASK] (a clean "predict the hidden base" test).

Every score is over the selected positions whose base is A/C/G/T, with the model's distribution
renormalised over the four bases (the baselines predict only bases). Perplexity = exp(cross-entropy
in nats), so 4 is a uniform guess. Ph models are also scored conjoined (forward and reverse-complement
passes averaged, as the paper does at inference).

Baselines, counted on both strands of the training split:

- ``base frequencies``: the same distribution at every position;
- ``k-mer``: the base given its k left and k right neighbours, interpolated with the (k-1) model as a
  Dirichlet prior of weight alpha (a context with a non-base, or running out of the window, backs off
  to the longest complete one). Two variants: on the model's input (a [MASK]ed neighbour is unknown,
  a randomised one is taken as read: the fair comparison), and on the true neighbours (an oracle that
  sees bases the model does not: an upper reference). k and alpha are chosen on the validation split
  separately for each variant and protocol.

    python benchmarks/pretrain_eval.py --packed /work/grch37/packed --model ph=runs/ph/model --model ps=runs/ps/model
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from caduceus.data import MaskedLMDataset, WindowDataset, open_data, reverse_complement_ids
from caduceus.modeling import CaduceusForMaskedLM, conjoined_logits
from caduceus.pretrain import evaluation_keys
from caduceus.tokenizer import A_ID, PAD_ID

BASES = 4
PROTOCOLS = {"80/10/10": False, "mask-only": True}  # protocol name -> mask_only


@dataclass
class Score:
    name: str
    protocol: str
    positions: int
    cross_entropy: float  # nats per masked base
    accuracy: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.cross_entropy)


def score(name: str, protocol: str, log_probs: np.ndarray, targets: np.ndarray) -> Score:
    """Cross-entropy and accuracy of (positions, 4) log-probabilities for base indices 0-3."""
    picked = log_probs[np.arange(len(targets)), targets]
    return Score(name, protocol, len(targets), float(-picked.mean()), float((log_probs.argmax(1) == targets).mean()))


# ----------------------------------------------------------------------------------------------
# The evaluation set


@dataclass
class MaskedSet:
    """The windows of a split, their masked inputs under each protocol and the selected positions."""

    bases: np.ndarray  # (W, L) uint8 base index 0-3, 255 where not A/C/G/T
    inputs: dict[str, np.ndarray]  # protocol -> (W, L) masked input ids
    selected: np.ndarray  # (W, L) bool: selected and an A/C/G/T base

    @property
    def targets(self) -> np.ndarray:
        return self.bases[self.selected].astype(np.int64)


def base_indices(ids: np.ndarray) -> np.ndarray:
    """Token ids to base indices A C G T = 0 1 2 3, 255 for anything else."""
    return np.where((ids >= A_ID) & (ids < A_ID + BASES), ids - A_ID, 255).astype(np.uint8)


def masked_set(windows: WindowDataset, max_windows: int, seed: int) -> MaskedSet:
    keys = evaluation_keys(len(windows), max_windows)
    if not keys:
        raise SystemExit(f"the {windows.split} split has no windows of {windows.seq_len} bp")
    bases = base_indices(np.stack([windows[index] for _, index in keys]))
    inputs, selected = {}, None
    for protocol, mask_only in PROTOCOLS.items():
        data = MaskedLMDataset(windows, seed, mask_only=mask_only)
        examples = [data[key] for key in keys]
        inputs[protocol] = np.stack([x.numpy() for x, _ in examples])
        selected = np.stack([t.numpy() for _, t in examples]) != PAD_ID  # the same positions for both protocols
    return MaskedSet(bases, inputs, selected & (bases < BASES))


# ----------------------------------------------------------------------------------------------
# Baselines


def context_codes(bases: np.ndarray, max_k: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """For k = 0 ... max_k and every position of each row: the code of its k left and k right neighbours
    in the row, and whether that context is complete (all 2k neighbours inside the row and A/C/G/T)."""
    rows, length = bases.shape
    code = np.zeros((rows, length), dtype=np.int64)
    valid = np.ones((rows, length), dtype=bool)
    padded = np.pad(bases, ((0, 0), (max_k, max_k)), constant_values=255)
    yield 0, code, valid
    for k in range(1, max_k + 1):
        left = padded[:, max_k - k : max_k - k + length]
        right = padded[:, max_k + k : max_k + k + length]
        valid &= (left < BASES) & (right < BASES)
        code = code * 16 + (left % BASES).astype(np.int64) * 4 + (right % BASES)
        yield k, code, valid


class KmerModel:
    """Interpolated ±k context model: p_k(b | c) = (n_k(c, b) + alpha p_{k-1}(b | c')) / (n_k(c) + alpha)."""

    def __init__(self, train_sequences: list[np.ndarray], max_k: int) -> None:
        """Counts over ``train_sequences`` (token ids) and their reverse complements."""
        self.counts = [np.zeros((BASES ** (2 * k), BASES), dtype=np.int64) for k in range(max_k + 1)]
        for ids in train_sequences:
            for strand in (ids, reverse_complement_ids(ids)):
                row = base_indices(strand)[None, :]
                for k, code, valid in context_codes(row, max_k):
                    keep = valid & (row < BASES)
                    flat = code[keep] * BASES + row[keep]
                    self.counts[k] += np.bincount(flat, minlength=self.counts[k].size).reshape(self.counts[k].shape)

    def log_probs(self, bases: np.ndarray, selected: np.ndarray, k: int, alpha: float) -> np.ndarray:
        """(positions, 4) log-probabilities at the selected positions; incomplete contexts back off."""
        probs = np.broadcast_to(self.counts[0][0] / self.counts[0][0].sum(), (int(selected.sum()), BASES))
        for order, code, valid in context_codes(bases, k):
            if order == 0:
                continue
            code, valid = code[selected], valid[selected]
            counts = self.counts[order][code].astype(np.float64)
            smoothed = (counts + alpha * probs) / (counts.sum(1, keepdims=True) + alpha)
            probs = np.where(valid[:, None], smoothed, probs)
        return np.log(probs)


def choose_k(kmers: KmerModel, context: np.ndarray, valid: MaskedSet, max_k: int, alphas: list[float],
             label: str) -> tuple[int, float]:
    """The (k, alpha) with the lowest validation cross-entropy, printing the curve over k."""
    losses = {(k, alpha): score("", "", kmers.log_probs(context, valid.selected, k, alpha), valid.targets).cross_entropy
              for k in range(max_k + 1) for alpha in (alphas if k else [0.0])}
    by_k = [min(loss for (k, _), loss in losses.items() if k == order) for order in range(max_k + 1)]
    best = min(losses, key=losses.get)
    print(f"  {label}: " + " ".join(f"k={k} {loss:.4f}" for k, loss in enumerate(by_k)) + f" -> k={best[0]} "
          f"alpha={best[1]:g}")
    return best


# ----------------------------------------------------------------------------------------------
# Models


@torch.no_grad()
def model_log_probs(model: CaduceusForMaskedLM, inputs: np.ndarray, selected: np.ndarray, batch_size: int,
                    conjoin: bool) -> np.ndarray:
    """(positions, 4) log-probabilities over A C G T at the selected positions."""
    device = model.device
    amp = device.type == "cuda"
    out = []
    for start in range(0, len(inputs), batch_size):
        batch = torch.from_numpy(inputs[start : start + batch_size]).to(device).long()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = conjoined_logits(model, batch) if conjoin else model(batch).logits
        base_logits = logits.float()[..., A_ID : A_ID + BASES]
        mask = torch.from_numpy(selected[start : start + batch_size]).to(device)
        out.append(torch.log_softmax(base_logits[mask], dim=-1).cpu().numpy())
    return np.concatenate(out)


def resolve_model(path: str) -> str:
    """A model directory, a pretraining out_dir (its model/), or a model name."""
    return str(Path(path) / "model") if (Path(path) / "model" / "config.json").is_file() else path


# ----------------------------------------------------------------------------------------------


def markdown_table(scores: list[Score]) -> str:
    lines = ["| model | protocol | masked bases | cross-entropy (nats) | perplexity | accuracy |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {s.name} | {s.protocol} | {s.positions:,} | {s.cross_entropy:.4f} | {s.perplexity:.4f} | "
              f"{s.accuracy:.4f} |" for s in scores]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fasta", help="FASTA (with --bed)")
    parser.add_argument("--packed", help="packed genome directory (`caduceus data pack`)")
    parser.add_argument("--bed", help="BED of splits (default: the packed directory's)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="model to score: a model directory, a pretraining out_dir or a model name")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--max-windows", type=int, default=100_000, help="test windows used (evenly spread)")
    parser.add_argument("--max-valid-windows", type=int, default=2_000, help="validation windows to choose k")
    parser.add_argument("--max-k", type=int, default=6, help="largest k tried (memory 4^(2k)·32 B)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 4.0, 16.0, 64.0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=12345, help="masking seed of the evaluation")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, help="also write the markdown table here")
    args = parser.parse_args()

    genome, intervals = open_data(args.fasta, args.packed, args.bed)
    test = masked_set(WindowDataset(genome, intervals, "test", args.seq_len, extend_to=0), args.max_windows, args.seed)
    valid = masked_set(WindowDataset(genome, intervals, "valid", args.seq_len, extend_to=0), args.max_valid_windows,
                       args.seed)
    started = time.time()
    train = [genome.fetch(i.chrom, i.start, i.end) for i in intervals if i.split == "train"]
    kmers = KmerModel(train, args.max_k)
    print(f"k-mer counts on {sum(map(len, train)):,} training bases, both strands ({time.time() - started:.0f} s)")

    print("\nk chosen on the validation split; cross-entropy (nats) by k, with the best alpha:")
    scores = []
    for protocol in PROTOCOLS:
        scores.append(score("base frequencies", protocol, kmers.log_probs(test.bases, test.selected, 0, 0.0),
                            test.targets))
        variants = [
            ("k-mer on the model's input", base_indices(valid.inputs[protocol]), base_indices(test.inputs[protocol])),
            ("k-mer on the true neighbours (oracle)", valid.bases, test.bases),
        ]
        for variant, valid_context, test_context in variants:
            k, alpha = choose_k(kmers, valid_context, valid, args.max_k, args.alphas, f"{variant}, {protocol}")
            log_probs = kmers.log_probs(test_context, test.selected, k, alpha)
            scores.append(score(f"{variant}, ±{k}, alpha {alpha:g}", protocol, log_probs, test.targets))
    for spec in args.model:
        name, _, path = spec.partition("=")
        model = CaduceusForMaskedLM.from_pretrained(resolve_model(path or name), device=args.device)
        variants = [(name, False)] + ([(f"{name} (conjoined)", True)] if not model.config.rcps else [])
        for label, conjoin in variants:
            for protocol in PROTOCOLS:
                log_probs = model_log_probs(model, test.inputs[protocol], test.selected, args.batch_size, conjoin)
                scores.append(score(label, protocol, log_probs, test.targets))
    scores.sort(key=lambda s: (list(PROTOCOLS).index(s.protocol), -s.cross_entropy))

    table = markdown_table(scores)
    print(f"\nTest split, {len(test.bases):,} windows of {args.seq_len} bp, masking seed {args.seed}; scores over "
          "the masked A/C/G/T positions, model probabilities renormalised over the 4 bases:\n")
    print(table)
    if args.output:
        args.output.write_text(table + "\n")


if __name__ == "__main__":
    main()
