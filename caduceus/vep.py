"""Variant effect prediction: ``caduceus vep`` and ``score_variants``.

One row per ALT allele (multi-allelic records are split), in VCF order:

- ``llr`` = log P(alt) - log P(ref) from the masked-LM head with the variant position masked, in a
  window of the model's input size centred on the variant (SNVs only). Both strands: a PS model is
  exactly reverse-complement equivariant, so its one pass is already the average of the two strands; a
  Ph model also runs the reverse-complement window, and the two strands' logits are averaged in forward
  coordinates (``modeling.conjoined_logits``), so its llr is the mean of the two strands' llrs.
- ``embedding_cosine_distance`` / ``embedding_l2_distance`` between the mean embeddings of the ref
  window and the alt window (both strands averaged, by ``caduceus.api``). For an indel the alt window
  keeps the ref window's start: left flank, alt allele, then the right flank up to the window length.
- With labels, the paper's supervised protocol (``add_supervised_scores``): features are the ref and alt
  mean embeddings over the 1,536 bp centred on the variant (-768..+768, clamped to the window), side by
  side; StandardScaler + RBF SVM; stratified k-fold cross-validated AUROC of the out-of-fold decision
  values. The 1k models see only 1,024 bp, so for them the mean runs over their whole window.

Windows near a chromosome end are shifted to lie inside it, never padded (the variant is then
off-centre; ``window_start``/``window_end``, 1-based and inclusive, say where the window was); a
chromosome shorter than the window is used whole.

``status`` is ``ok`` or why the variant was not scored: ``unknown_chrom``,
``position_out_of_range``, ``ref_mismatch`` (REF differs from the reference; never scored),
``no_alt``, ``symbolic_alt``, ``non_acgt_allele``, ``no_change``, ``n_rich_window`` (more than
``max_n_fraction`` N in the window; the paper drops >= 0.5 %, the same cut for 1,024-bp windows) and
``indel_without_embeddings``.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from caduceus._genomics import (
    TABLE_SUFFIXES,
    Reference,
    add_model_argument,
    batched,
    centred_window,
    check_output_path,
    masked_base_log_probs,
    model_input_size,
    write_table,
)
from caduceus.api import Caduceus, CaduceusConfig, progress_bar, resolve_device
from caduceus.data import DataError
from caduceus.modeling import CaduceusForMaskedLM

DEFAULT_MAX_N_FRACTION = 0.005
DEFAULT_BATCH_SIZE = 16
SUPERVISED_HALF_WIDTH = 768  # the paper pools -768..+768 around the variant
OK = "ok"
BASE_COLUMNS = ["chrom", "pos", "ref", "alt", "status", "id", "type", "llr", "embedding_cosine_distance",
                "embedding_l2_distance", "window_start", "window_end", "detail"]
_BASE_INDEX = {base: i for i, base in enumerate("ACGT")}


@dataclass(frozen=True)
class Variant:
    """One ALT allele of a VCF record; ``pos`` is 1-based as in the VCF, ``line`` the record's line."""

    chrom: str
    pos: int
    ref: str
    alt: str
    id: str = "."
    line: int = 0
    info: tuple[tuple[str, object], ...] = ()

    def where(self, path: str | os.PathLike = "") -> str:
        return f"{path}:{self.line}: {self.chrom}:{self.pos} {self.ref}>{self.alt}"


# ----------------------------------------------------------------------------------------------
# Reading a VCF


def _open_text(path: Path):
    with open(path, "rb") as handle:
        compressed = handle.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", errors="replace") if compressed else open(path, errors="replace")


def _header_line_count(path: Path) -> int:
    """Lines before the first record (records are then one per line, as VCF requires)."""
    with _open_text(path) as handle:
        return next((n for n, text in enumerate(handle) if not text.startswith("#")), 0)


def _malformed_record(path: Path, first_record_line: int, records_read: int, error: Exception) -> DataError:
    """Name the file, line and text of the record htslib could not parse."""
    number = first_record_line + records_read
    with _open_text(path) as handle:
        text = next((t.rstrip("\n") for n, t in enumerate(handle, 1) if n == number), "")
    return DataError(f"{path}:{number}: malformed VCF record ({error or 'htslib could not parse it'}): {text[:200]!r}")


def _info_value(value: object, alt_index: int, n_alts: int) -> object:
    """One allele's value of an INFO field: per-allele tuples (Number=A) are split, others joined."""
    if isinstance(value, tuple):
        if len(value) == n_alts:
            return value[alt_index]
        return ",".join(str(v) for v in value)
    return value


def read_vcf(path: str | os.PathLike, info_fields: Sequence[str] = ()) -> list[Variant]:
    """Every ALT allele of a VCF (plain, gzip or bgzip) with the requested INFO fields, read whole
    before any scoring, so a malformed line stops the run with its file and line number."""
    try:
        import pysam
    except ImportError:
        raise DataError("reading VCF files needs pysam: pip install pysam (or 'caduceus-dna[genomics]')") from None
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: VCF file not found")
    try:
        vcf = pysam.VariantFile(str(path))
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable VCF file ({error})") from None
    declared = list(vcf.header.info)
    missing = [field for field in info_fields if field not in declared]
    if missing:
        vcf.close()
        raise DataError(f"{path}: INFO field(s) {', '.join(missing)} not declared in the VCF header "
                        f"(it declares: {', '.join(declared) or 'none'})")
    first_record_line = _header_line_count(path) + 1
    variants: list[Variant] = []
    with vcf:
        records = iter(vcf)
        records_read = 0
        while True:
            try:
                record = next(records)
            except StopIteration:
                break
            except (OSError, ValueError) as error:
                raise _malformed_record(path, first_record_line, records_read, error) from None
            line = first_record_line + records_read
            records_read += 1
            alts = record.alts or (".",)
            for alt_index, alt in enumerate(alts):
                info = tuple((field, _info_value(record.info.get(field), alt_index, len(alts)))
                             for field in info_fields)
                variants.append(Variant(record.chrom, record.pos, record.ref, alt, record.id or ".", line, info))
    return variants


# ----------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class _Plan:
    """Where and how one variant is scored: its window on the reference and the alt version of it."""

    row: int
    chrom: str
    start: int
    end: int
    offset: int  # the variant's first base, counted from the window start
    ref_window: str
    alt_window: str
    snv: bool


def _site(plan: _Plan) -> tuple[str, int, int]:
    return plan.chrom, plan.start, plan.offset


def _variant_type(ref: str, alt: str) -> str:
    if set(ref.upper() + alt.upper()) - set("ACGT"):
        return "other"
    if len(ref) == len(alt):
        return "snv" if len(ref) == 1 else "mnv"
    return "indel"


def _plan(row: int, variant: Variant, reference: Reference, window: int, max_n_fraction: float,
          embeddings: bool) -> tuple[str, str, _Plan | None]:
    """(status, detail, plan): why the variant cannot be scored, or how it will be."""
    ref, alt = variant.ref.upper(), variant.alt.upper()
    if alt == ".":
        return "no_alt", "ALT is '.'", None
    if alt.startswith("<") or alt == "*" or "[" in alt or "]" in alt:
        return "symbolic_alt", f"ALT {variant.alt} is symbolic", None
    if set(ref + alt) - set("ACGT"):
        return "non_acgt_allele", "alleles must be A, C, G, T", None
    if ref == alt:
        return "no_change", "ALT equals REF", None
    chrom = reference.resolve(variant.chrom)
    if chrom is None:
        return "unknown_chrom", f"{variant.chrom} is not in the reference", None
    position, length = variant.pos - 1, reference.chrom_lengths[chrom]
    if position < 0 or position + len(ref) > length:
        return "position_out_of_range", f"{chrom} has {length} bases", None
    found = reference.bases(chrom, position, position + len(ref))
    if found != ref:
        return "ref_mismatch", f"reference has {found}", None
    snv = len(ref) == len(alt) == 1
    if not snv and not embeddings:
        return "indel_without_embeddings", "llr is for SNVs; embeddings are switched off", None
    start, end = centred_window(position, window, length)
    ref_window = reference.bases(chrom, start, end)
    n_fraction = ref_window.count("N") / len(ref_window)
    if n_fraction > max_n_fraction:
        return "n_rich_window", f"{n_fraction:.1%} N in the window (limit {max_n_fraction:.1%})", None
    offset = position - start
    right = reference.bases(chrom, position + len(ref), min(position + len(ref) + end - start, length))
    alt_window = (ref_window[:offset] + alt + right)[: end - start]
    return OK, "", _Plan(row, chrom, start, end, offset, ref_window, alt_window, snv)


@dataclass
class VariantScores:
    """What ``score_variants`` returns: one row (a dict) per variant, in input order, and the supervised
    features (ref and alt mean embeddings around the variant, side by side; NaN rows where not scored)."""

    rows: list[dict]
    columns: list[str]
    features: np.ndarray | None

    def summary(self) -> str:
        skipped = Counter(row["status"] for row in self.rows if row["status"] != OK)
        scored = len(self.rows) - sum(skipped.values())
        reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.most_common())
        return f"scored {scored} of {len(self.rows)} variants" + (f"; skipped: {reasons}" if reasons else "")


class _Model:
    """One model loaded for both uses: the masked-LM head (llr) and ``caduceus.api`` (embeddings)."""

    def __init__(self, model: str | os.PathLike, window: int, batch_size: int, device: str) -> None:
        self.device = resolve_device(device)
        self.lm = CaduceusForMaskedLM.from_pretrained(model).to(self.device).eval()
        self.embedder = Caduceus(CaduceusConfig(model_name=model, batch_size=batch_size, device=str(self.device),
                                                max_length=window, rc="average", progress=False))

    def mean_embeddings(self, windows: Sequence[str], offsets: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Per window: the mean embedding over the whole window, and over -768..+768 around ``offset``."""
        per_token = self.embedder.get_embeddings(self.embedder.process_data(list(windows)), per_token=True,
                                                 progress=False)
        whole = np.stack([h.mean(axis=0) for h in per_token])
        around = np.stack([h[max(o - SUPERVISED_HALF_WIDTH, 0) : o + SUPERVISED_HALF_WIDTH + 1].mean(axis=0)
                           for h, o in zip(per_token, offsets)])
        return whole, around


def score_variants(
    variants: Sequence[Variant],
    reference: Reference | str | os.PathLike,
    model: str | os.PathLike,
    window: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_n_fraction: float = DEFAULT_MAX_N_FRACTION,
    embeddings: bool = True,
    device: str = "auto",
    progress: bool | None = None,
) -> VariantScores:
    """Score variants against a reference FASTA with a model (name or directory); see the module doc.

    ``window`` defaults to the model's input size; ``embeddings=False`` computes the llr only (indels are
    then skipped). Windows are deduplicated (the alleles of one site share their masked and ref windows)
    and run ``batch_size`` per forward pass.
    """
    reference = reference if isinstance(reference, Reference) else Reference(reference)
    window = window or model_input_size(model)
    if window < 1:
        raise ValueError(f"window must be a positive number of bases, got {window}")
    info_fields = [field for field, _ in variants[0].info] if variants else []
    rows, plans = [], []
    for index, variant in enumerate(variants):
        status, detail, plan = _plan(index, variant, reference, window, max_n_fraction, embeddings)
        rows.append({"chrom": variant.chrom, "pos": variant.pos, "ref": variant.ref, "alt": variant.alt,
                     "status": status, "id": variant.id, "type": _variant_type(variant.ref, variant.alt),
                     "window_start": plan.start + 1 if plan else None, "window_end": plan.end if plan else None,
                     "detail": detail, **dict(variant.info)})
        if plan is not None:
            plans.append(plan)
    features = None
    if plans:
        scorer = _Model(model, window, batch_size, device)
        sites = {_site(p): p for p in plans}  # the alleles of one site share its masked and ref windows
        masked = list({_site(p): p for p in plans if p.snv}.values())
        total = len(masked) + (len(sites) + len(plans) if embeddings else 0)
        with progress_bar(None, progress, "vep", total=total, unit="window") as bar:
            log_probs = {}
            for chunk in batched(masked, batch_size):
                values = masked_base_log_probs(scorer.lm, [p.ref_window for p in chunk], [[p.offset] for p in chunk])
                log_probs.update({_site(p): v[0] for p, v in zip(chunk, values)})
                bar.update(len(chunk))
            for plan in plans:
                if plan.snv:
                    site = log_probs[_site(plan)]
                    rows[plan.row]["llr"] = float(site[_BASE_INDEX[plan.alt_window[plan.offset]]]
                                                  - site[_BASE_INDEX[plan.ref_window[plan.offset]]])
            if embeddings:
                features = _embedding_scores(scorer, list(sites.values()), plans, rows, batch_size, bar)
    return VariantScores(rows, BASE_COLUMNS + info_fields, features)


def _embedding_scores(scorer: _Model, sites: list[_Plan], plans: list[_Plan], rows: list[dict], batch_size: int,
                      bar: tqdm) -> np.ndarray:
    """Fill the embedding distances into ``rows``; return the supervised features (NaN where unscored)."""
    ref_whole, ref_around = {}, {}
    for chunk in batched(sites, batch_size):
        whole, around = scorer.mean_embeddings([p.ref_window for p in chunk], [p.offset for p in chunk])
        for plan, w, a in zip(chunk, whole, around):
            ref_whole[_site(plan)], ref_around[_site(plan)] = w, a
        bar.update(len(chunk))
    features = None
    for chunk in batched(plans, batch_size):
        whole, around = scorer.mean_embeddings([p.alt_window for p in chunk], [p.offset for p in chunk])
        for plan, alt_whole, alt_around in zip(chunk, whole, around):
            key = _site(plan)
            a, b = ref_whole[key].astype(np.float64), alt_whole.astype(np.float64)
            rows[plan.row]["embedding_cosine_distance"] = float(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            rows[plan.row]["embedding_l2_distance"] = float(np.linalg.norm(a - b))
            if features is None:
                features = np.full((len(rows), 2 * len(alt_around)), np.nan, dtype=np.float32)
            features[plan.row] = np.concatenate([ref_around[key], alt_around])
        bar.update(len(chunk))
    return features


# ----------------------------------------------------------------------------------------------
# The supervised protocol


def variant_labels(variants: Sequence[Variant], field: str, threshold: float | None = None,
                   path: str | os.PathLike = "") -> list[int | None]:
    """0/1 per variant from an INFO field: ``value >= threshold`` when a threshold is given, else the
    value itself must be 0/1 (or true/false). A missing value gives ``None`` (left out of the fit)."""
    labels = []
    for variant in variants:
        value = dict(variant.info).get(field)
        if value is None:
            labels.append(None)
            continue
        text = str(value).strip().lower()
        try:
            if threshold is not None:
                labels.append(int(float(text) >= threshold))
            elif text in ("1", "1.0", "true"):
                labels.append(1)
            elif text in ("0", "0.0", "false"):
                labels.append(0)
            else:
                raise ValueError
        except ValueError:
            need = "a number" if threshold is not None else "0/1 or true/false (or give --label-threshold)"
            raise DataError(f"{variant.where(path)}: INFO {field}={value!r} is not {need}") from None
    return labels


@dataclass(frozen=True)
class SupervisedResult:
    auroc: float
    variants: int
    positives: int
    folds: int

    def __str__(self) -> str:
        return (f"supervised: {self.folds}-fold cross-validated AUROC {self.auroc:.3f} "
                f"({self.variants} variants, {self.positives} positive)")


def add_supervised_scores(scores: VariantScores, labels: Sequence[int | None], folds: int = 5, svm_c: float = 1.0,
                          seed: int = 0) -> SupervisedResult:
    """The paper's protocol on scored variants with a label: StandardScaler + RBF SVM (``svm_c``) on the
    ref/alt features; adds the columns ``label`` and ``svm_cv_score`` (the out-of-fold decision value).

    Unlike the notebook, C is fixed rather than picked on the test folds, and the AUROC is computed from
    decision values rather than hard predictions.
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if scores.features is None:
        raise ValueError("the supervised protocol needs the embeddings (score with embeddings=True)")
    used = [i for i, row in enumerate(scores.rows) if row["status"] == OK and labels[i] is not None]
    y = np.array([labels[i] for i in used])
    smaller_class = min(int(y.sum()), int(len(y) - y.sum())) if len(y) else 0
    if smaller_class < 2:
        raise DataError(f"the supervised protocol needs at least 2 scored variants of each label; "
                        f"have {int(y.sum())} positive and {int(len(y) - y.sum())} negative")
    folds = min(folds, smaller_class)
    model = make_pipeline(StandardScaler(), SVC(kernel="rbf", C=svm_c))
    split = StratifiedKFold(folds, shuffle=True, random_state=seed)
    decision = cross_val_predict(model, scores.features[used], y, cv=split, method="decision_function")
    for i, row in enumerate(scores.rows):
        row["label"] = labels[i]
    for i, value in zip(used, decision):
        scores.rows[i]["svm_cv_score"] = float(value)
    scores.columns += ["label", "svm_cv_score"]
    return SupervisedResult(float(roc_auc_score(y, decision)), len(y), int(y.sum()), folds)


# ----------------------------------------------------------------------------------------------
# The command


def add_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "vep", help="score variants of a VCF: masked-LM log-likelihood ratio and embedding distances",
        description=__doc__.split("\n\n", 1)[1].strip(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--fasta", required=True, type=Path,
                        help="reference FASTA (plain, or bgzip; .fai made if missing)")
    parser.add_argument("--vcf", required=True, type=Path, help="variants (VCF, .vcf.gz or .bcf)")
    add_model_argument(parser)
    parser.add_argument("--out", required=True, type=Path, help="scores table: .tsv or .parquet")
    parser.add_argument("--window", type=int, help="window length in bases (default: the model's input size)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="windows per forward pass")
    parser.add_argument("--max-n-fraction", type=float, default=DEFAULT_MAX_N_FRACTION,
                        help="skip variants whose window has a larger fraction of N (default %(default)s)")
    parser.add_argument("--info", default="", help="comma-separated INFO fields to copy into the table")
    parser.add_argument("--no-embeddings", action="store_true", help="llr only (faster; indels are skipped)")
    parser.add_argument("--labels", metavar="FIELD", help="INFO field with labels: run the supervised SVM protocol")
    parser.add_argument("--label-threshold", type=float, help="label = FIELD >= this (for a numeric FIELD)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default %(default)s)")
    parser.add_argument("--svm-c", type=float, default=1.0, help="SVM regularisation C (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cross-validation split")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    out = check_output_path(args.out, TABLE_SUFFIXES)
    if args.labels:
        if args.no_embeddings:
            raise DataError("--labels needs the embeddings; drop --no-embeddings")
        try:
            import sklearn  # noqa: F401
        except ImportError:
            raise DataError("--labels needs scikit-learn: pip install scikit-learn (or 'caduceus-dna[ml]')") from None
    info_fields = [f for f in args.info.split(",") if f]
    if args.labels and args.labels not in info_fields:
        info_fields.append(args.labels)
    variants = read_vcf(args.vcf, info_fields)
    labels = variant_labels(variants, args.labels, args.label_threshold, args.vcf) if args.labels else None
    reference = Reference(args.fasta)
    scores = score_variants(variants, reference, args.model, window=args.window, batch_size=args.batch_size,
                            max_n_fraction=args.max_n_fraction, embeddings=not args.no_embeddings,
                            device=args.device)
    supervised = add_supervised_scores(scores, labels, args.folds, args.svm_c, args.seed) if labels else None
    write_table(scores.rows, scores.columns, out)
    print(f"vep: {scores.summary()}; wrote {out}", file=sys.stderr)
    if supervised:
        print(f"vep: {supervised}", file=sys.stderr)
