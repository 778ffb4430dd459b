"""Downstream benchmark: ``caduceus benchmark`` and ``run_benchmark``.

Two parts, each method trained and tested on the same data in the same run:

1. Genomic Benchmarks (the four human subsets on GRCh37 in ``DATA/genomic_benchmarks_grch37_subset``):
   test accuracy (the paper's metric) and AUROC (class-1 probability; macro one-vs-rest for the 3-class
   regulatory set) of
   - ``k-mer LR``: counts of the overlapping 6-mers, scaled to unit length, logistic regression with C
     picked by 3-fold cross-validation on the training set;
   - ``CNN``: the Genomic Benchmarks paper's CNN (embedding 100, three Conv1d(k=8) layers with 16/8/4
     filters, batch norm, ReLU, max-pool 2, then dense 512 and the output; Adam 1e-3, batch 64);
   - each Caduceus model fine-tuned whole (``caduceus.fine_tuning``: mean pooling, AdamW, cosine
     schedule with 10 % warm-up, gradient clipping 1.0; Ph with reverse-complement augmentation in
     training and both strands at test, as the paper; PS is strand-invariant by construction), and a
     randomly initialised model of the same size trained the same way, to show what pretraining buys.
2. CAGI5 HNF4A promoter saturation mutagenesis (``DATA/vep/cagi5_hnf4a_grch37.vcf``, GRCh37 chr20),
   zero-shot with ``caduceus.vep``: Spearman correlation of ``llr`` with EFFECT, and AUROC with
   label = (CONF >= 0.1) and score = |llr|. Without ``--quick`` also AUROC of the embedding cosine
   distance and the supervised SVM protocol (5-fold CV AUROC, same label).

Models: every model bundled with the package (``caduceus.hub.BUNDLED_MODELS``) unless ``--models`` names
others, plus ``random-init``. ``--quick`` subsamples (stratified) and trains one epoch so that the whole
run takes minutes on a laptop CPU. Results: ``OUT/results.md`` (markdown table), ``OUT/results.json``
and ROC curves ``OUT/roc_<task>.png`` (with matplotlib).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import multiprocessing
import os
import platform
import shlex
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from caduceus import hub, metrics
from caduceus.configuration import CaduceusModelConfig
from caduceus.data import DataError
from caduceus.files import atomic_write
from caduceus.modeling import CaduceusForMaskedLM

DATASETS = ("human_enhancers_cohn", "human_enhancers_ensembl", "human_ocr_ensembl", "human_ensembl_regulatory")
GB_FOLDER = "genomic_benchmarks_grch37_subset"
CAGI5_VCF = Path("vep") / "cagi5_hnf4a_grch37.vcf"
CAGI5_POSITIVE_CONF = 0.1
DATA_ENV = "CADUCEUS_DATA"
FASTA_ENV = "CADUCEUS_GRCH37_FASTA"
RANDOM_INIT = "random-init"
KMER_K = 6
CNN_TOKENS = {base: i + 1 for i, base in enumerate("ACGTN")}  # 0 is padding


def default_data_dir() -> Path:
    """``$CADUCEUS_DATA``, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get(DATA_ENV, Path(__file__).resolve().parents[2] / "shared" / "data"))


@dataclass
class Settings:
    data_dir: Path = field(default_factory=default_data_dir)
    fasta: Path | None = None
    cagi5_vcf: Path | None = None  # None: DATA/vep/cagi5_hnf4a_grch37.vcf
    cagi5_window: int | None = None  # None: each model's input size
    models: list[str] | None = None  # None: the bundled models
    datasets: tuple[str, ...] = DATASETS
    out_dir: Path = Path("benchmark_results")
    max_train: int | None = None
    max_test: int | None = None
    epochs: int = 10
    cnn_epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    cagi5_embeddings: bool = True
    seed: int = 0
    device: str = "auto"
    jobs: int = 1  # tasks run in this many processes at once (on a GPU the small models leave it mostly idle)

    @classmethod
    def quick(cls, **overrides: object) -> Settings:
        """Minutes on two CPU cores: 128 train / 128 test sequences per dataset, one epoch, llr only."""
        return cls(**{"max_train": 128, "max_test": 128, "epochs": 1, "batch_size": 16, "lr": 2e-3,
                      "cagi5_embeddings": False, **overrides})


# ----------------------------------------------------------------------------------------------
# Data


def load_split(data_dir: Path, dataset: str, split: str) -> tuple[list[str], np.ndarray]:
    """Sequences and integer labels of ``DATA/genomic_benchmarks_grch37_subset/<dataset>/<split>.tsv.gz``."""
    path = data_dir / GB_FOLDER / dataset / f"{split}.tsv.gz"
    if not path.is_file():
        raise DataError(f"{path}: not found (set --data or ${DATA_ENV} to the folder holding {GB_FOLDER}/)")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows or not {"sequence", "label"} <= set(rows[0]):
        raise DataError(f"{path}: expected columns 'sequence' and 'label'")
    return [r["sequence"].upper() for r in rows], np.array([int(r["label"]) for r in rows])


def stratified_subset(labels: np.ndarray, size: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``size`` examples keeping the class proportions (all when ``size`` is None)."""
    if size is None or size >= len(labels):
        return np.arange(len(labels))
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, round(size * len(members) / len(labels)))
        chosen.append(rng.choice(members, size=min(count, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


# ----------------------------------------------------------------------------------------------
# Methods: each trains on (sequences, labels) and returns class probabilities on the test sequences


def kmer_logistic_regression(train: list[str], train_labels: np.ndarray, test: list[str], seed: int = 0) -> np.ndarray:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    model = make_pipeline(
        CountVectorizer(analyzer="char", ngram_range=(KMER_K, KMER_K), lowercase=False),
        Normalizer(),
        GridSearchCV(LogisticRegression(solver="saga", max_iter=2000, random_state=seed),
                     {"C": [0.01, 0.1, 1.0, 10.0]}, cv=3),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(train, train_labels).predict_proba(test)


class GenomicBenchmarksCNN(nn.Module):
    """The CNN of the Genomic Benchmarks paper (their ``models/torch.py``), with one output per class."""

    def __init__(self, num_classes: int, input_length: int, embedding_dim: int = 100) -> None:
        super().__init__()
        self.embedding = nn.Embedding(len(CNN_TOKENS) + 1, embedding_dim)
        layers, channels = [], embedding_dim
        for filters in (16, 8, 4):
            layers += [nn.Conv1d(channels, filters, kernel_size=8), nn.BatchNorm1d(filters), nn.ReLU(), nn.MaxPool1d(2)]
            channels = filters
        self.convolutions = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            flat = self.convolutions(torch.zeros(1, embedding_dim, input_length)).shape[1]
        self.dense = nn.Sequential(nn.Linear(flat, 512), nn.Linear(512, num_classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dense(self.convolutions(self.embedding(tokens).transpose(1, 2)))


def _cnn_tokens(sequences: list[str], length: int) -> torch.Tensor:
    """Right-padded (with 0) or truncated to ``length``, as the paper's loader pads to the longest."""
    tokens = torch.zeros(len(sequences), length, dtype=torch.long)
    for i, sequence in enumerate(sequences):
        codes = [CNN_TOKENS.get(base, CNN_TOKENS["N"]) for base in sequence[:length]]
        tokens[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
    return tokens


def cnn_baseline(train: list[str], train_labels: np.ndarray, test: list[str], epochs: int, seed: int,
                 batch_size: int = 64) -> np.ndarray:
    torch.manual_seed(seed)
    length = max(len(s) for s in train)
    model = GenomicBenchmarksCNN(int(train_labels.max()) + 1, length)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    inputs, targets = _cnn_tokens(train, length), torch.from_numpy(train_labels)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs), generator=generator).split(batch_size):
            if len(batch) < 2:
                continue  # batch norm needs two examples
            loss = nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(_cnn_tokens(test, length)), dim=-1).numpy()


def finetune_caduceus(model: str | os.PathLike, train: list[str], train_labels: np.ndarray, test: list[str],
                      settings: Settings) -> np.ndarray:
    from caduceus.api import CaduceusConfig
    from caduceus.fine_tuning import CaduceusFineTuningModel

    torch.manual_seed(settings.seed)
    config = CaduceusConfig(model_name=model, batch_size=settings.batch_size, device=settings.device, progress=False)
    classifier = CaduceusFineTuningModel(config, "classification", output_size=int(train_labels.max()) + 1)
    steps = settings.epochs * math.ceil(len(train) / settings.batch_size)
    classifier.train(
        classifier.process_data(train), train_labels, optimizer_params={"lr": settings.lr, "weight_decay": 0.01},
        epochs=settings.epochs, trainable_layers=0,  # the whole model trains
        lr_scheduler_params={"name": "cosine", "num_warmup_steps": max(1, steps // 10)},
        rc_augment=not classifier.is_ps, conjoin_eval=True, max_grad_norm=1.0, seed=settings.seed, progress=False,
    )
    logits = classifier.get_outputs(classifier.process_data(test), conjoin=True, progress=False)
    return metrics.softmax(logits)


# ----------------------------------------------------------------------------------------------
# Models


def random_init_model(like: str | None, directory: Path, seed: int) -> Path:
    """A randomly initialised model with the architecture of ``like`` (default: the 1k d118 Ph)."""
    config = (CaduceusForMaskedLM.from_pretrained(like).config if like is not None
              else CaduceusModelConfig())
    torch.manual_seed(seed)
    CaduceusForMaskedLM(config).save_pretrained(directory)
    return directory


def resolve_models(settings: Settings) -> dict[str, str]:
    """Display name -> loadable name or directory: the requested (default: bundled) models and the
    random initialisation of the first of them."""
    names = settings.models if settings.models is not None else list(hub.BUNDLED_MODELS)
    for name in names:
        if hub.model_info(name) is None:
            raise DataError(f"--models: {name!r} is neither a model directory nor a known model name")
    models = {Path(name).name if Path(name).is_dir() else name: name for name in names}
    models[RANDOM_INIT] = str(random_init_model(names[0] if names else None, settings.out_dir / RANDOM_INIT,
                                                settings.seed))
    return models


# ----------------------------------------------------------------------------------------------
# Running


@dataclass
class TaskResult:
    task: str
    n_train: int
    n_test: int
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> metric -> value
    seconds: dict[str, float] = field(default_factory=dict)
    roc: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)  # method -> (fpr, tpr)
    note: str = ""


def _log(message: str) -> None:
    print(f"benchmark: {message}", file=sys.stderr, flush=True)


def _record(result: TaskResult, method: str, labels: np.ndarray, probabilities: np.ndarray, seconds: float) -> None:
    from sklearn.metrics import roc_curve

    predictions = probabilities.argmax(axis=1)
    result.scores[method] = {"accuracy": metrics.accuracy(labels, predictions),
                             "auroc": metrics.auroc(labels, probabilities)}
    result.seconds[method] = seconds
    if probabilities.shape[1] == 2:
        fpr, tpr, _ = roc_curve(labels, probabilities[:, 1])
        result.roc[method] = (fpr.tolist(), tpr.tolist())
    _log(f"{result.task} {method}: accuracy {result.scores[method]['accuracy']:.3f}, "
         f"AUROC {result.scores[method]['auroc']:.3f} ({seconds:.0f} s)")


def genomic_benchmark(dataset: str, models: dict[str, str], settings: Settings) -> TaskResult:
    rng = np.random.default_rng(settings.seed)
    train, train_labels = load_split(settings.data_dir, dataset, "train")
    test, test_labels = load_split(settings.data_dir, dataset, "test")
    keep_train = stratified_subset(train_labels, settings.max_train, rng)
    keep_test = stratified_subset(test_labels, settings.max_test, rng)
    train, train_labels = [train[i] for i in keep_train], train_labels[keep_train]
    test, test_labels = [test[i] for i in keep_test], test_labels[keep_test]
    result = TaskResult(dataset, len(train), len(test))
    methods = {
        "k-mer LR": lambda: kmer_logistic_regression(train, train_labels, test, settings.seed),
        "CNN": lambda: cnn_baseline(train, train_labels, test, settings.cnn_epochs, settings.seed),
        **{name: (lambda m=model: finetune_caduceus(m, train, train_labels, test, settings))
           for name, model in models.items()},
    }
    for method, fit_and_predict in methods.items():
        started = time.perf_counter()
        probabilities = fit_and_predict()
        _record(result, method, test_labels, probabilities, time.perf_counter() - started)
    return result


def cagi5_benchmark(models: dict[str, str], settings: Settings) -> TaskResult:
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score, roc_curve

    from caduceus._genomics import Reference
    from caduceus.vep import add_supervised_scores, read_vcf, score_variants, variant_labels

    vcf = settings.cagi5_vcf or settings.data_dir / CAGI5_VCF
    variants = read_vcf(vcf, ["EFFECT", "CONF"])
    labels = variant_labels(variants, "CONF", CAGI5_POSITIVE_CONF, vcf)
    result = TaskResult("cagi5_hnf4a", 0, len(variants))
    if settings.fasta is None:
        result.note = f"not run: give --fasta (GRCh37 with chr20; `caduceus data grch37 DIR`) or ${FASTA_ENV}"
        _log(f"CAGI5: {result.note}")
        return result
    reference = Reference(settings.fasta)
    for name, model in models.items():
        started = time.perf_counter()
        scores = score_variants(variants, reference, model, window=settings.cagi5_window,
                                embeddings=settings.cagi5_embeddings, device=settings.device, progress=False)
        rows = [row for row in scores.rows if row["status"] == "ok"]
        if len(rows) < len(scores.rows):
            raise DataError(f"{vcf}: {scores.summary()} against {settings.fasta}; is it GRCh37?")
        llr = np.array([row["llr"] for row in rows])
        effect = np.array([float(row["EFFECT"]) for row in rows])
        positive = np.array(labels, dtype=bool)
        values = {"spearman_llr_effect": float(spearmanr(llr, effect).statistic),
                  "auroc_abs_llr": float(roc_auc_score(positive, np.abs(llr)))}
        fpr, tpr, _ = roc_curve(positive, np.abs(llr))
        result.roc[name] = (fpr.tolist(), tpr.tolist())
        if settings.cagi5_embeddings:
            distance = np.array([row["embedding_cosine_distance"] for row in rows])
            values["auroc_cosine_distance"] = float(roc_auc_score(positive, distance))
            values["svm_cv_auroc"] = add_supervised_scores(scores, labels, seed=settings.seed).auroc
        result.scores[name] = values
        result.seconds[name] = time.perf_counter() - started
        _log(f"CAGI5 {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items())
             + f" ({result.seconds[name]:.0f} s)")
    return result


def run_benchmark(settings: Settings) -> list[TaskResult]:
    """Run both parts; returns one result per task (the Genomic Benchmarks sets, then CAGI5)."""
    if settings.jobs < 1:
        raise DataError(f"--jobs must be at least 1, got {settings.jobs}")
    unknown = set(settings.datasets) - set(DATASETS)
    if unknown:
        raise DataError(f"unknown dataset(s) {', '.join(sorted(unknown))}; choose from {', '.join(DATASETS)}")
    for dataset in settings.datasets:  # every input is checked before the long work starts
        for split in ("train", "test"):
            path = settings.data_dir / GB_FOLDER / dataset / f"{split}.tsv.gz"
            if not path.is_file():
                raise DataError(f"{path}: not found (set --data or ${DATA_ENV} to the folder holding {GB_FOLDER}/)")
    vcf = settings.cagi5_vcf or settings.data_dir / CAGI5_VCF
    if not vcf.is_file():
        raise DataError(f"{vcf}: not found")
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    models = resolve_models(settings)
    _log(f"models: {', '.join(f'{k} ({v})' for k, v in models.items())}")
    tasks = [(genomic_benchmark, (dataset, models, settings)) for dataset in settings.datasets]
    tasks.append((cagi5_benchmark, (models, settings)))
    if settings.jobs <= 1:
        return [function(*arguments) for function, arguments in tasks]
    # Each task seeds its own generators, and computes on as many CPU threads as this process would (float sums on
    # the CPU, the CNN baseline's among them, depend on the thread count), so its scores do not depend on which
    # process runs it or on --jobs. The CPU is oversubscribed while several tasks compute on it at once.
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    with ProcessPoolExecutor(settings.jobs, mp_context=context, initializer=torch.set_num_threads,
                             initargs=(torch.get_num_threads(),)) as pool:
        futures = [pool.submit(function, *arguments) for function, arguments in tasks]
        return [future.result() for future in futures]


# ----------------------------------------------------------------------------------------------
# Reporting


GB_METRICS = (("accuracy", "accuracy"), ("auroc", "AUROC"))
CAGI5_METRICS = (("spearman_llr_effect", "Spearman(llr, EFFECT)"), ("auroc_abs_llr", "AUROC abs(llr)"),
                 ("auroc_cosine_distance", "AUROC cosine distance"), ("svm_cv_auroc", "SVM 5-fold CV AUROC"))


def results_markdown(results: list[TaskResult]) -> str:
    methods = list(dict.fromkeys(m for r in results for m in r.scores))
    lines = ["| task | n train / test | metric | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    for result in results:
        table_metrics = CAGI5_METRICS if result.task.startswith("cagi5") else GB_METRICS
        size = f"{result.n_train} / {result.n_test}" if result.n_train else f"{result.n_test} variants"
        if result.note:
            lines.append(f"| {result.task} | {size} | {result.note} |" + " |" * len(methods))
        for key, label in table_metrics:
            if not any(key in scores for scores in result.scores.values()):
                continue
            cells = [f"{result.scores[m][key]:.3f}" if key in result.scores.get(m, {}) else "" for m in methods]
            lines.append(f"| {result.task} | {size} | {label} | " + " | ".join(cells) + " |")
    seconds = {m: sum(r.seconds.get(m, 0.0) for r in results) for m in methods}
    lines.append("| total time | | seconds | " + " | ".join(f"{seconds[m]:.0f}" for m in methods) + " |")
    return "\n".join(lines) + "\n"


def plot_rocs(results: list[TaskResult], out_dir: Path) -> list[Path]:
    """One PNG of ROC curves per task that has any (binary tasks and CAGI5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for result in results:
        if not result.roc:
            continue
        figure, axes = plt.subplots(figsize=(4.5, 4.5))
        for method, (fpr, tpr) in result.roc.items():
            auroc = result.scores[method].get("auroc", result.scores[method].get("auroc_abs_llr"))
            axes.plot(fpr, tpr, lw=1.2, label=f"{method} ({auroc:.3f})")
        axes.plot([0, 1], [0, 1], color="grey", lw=0.6, ls="--")
        title = "CAGI5 HNF4A: abs(llr) vs CONF >= 0.1" if result.task.startswith("cagi5") else result.task
        axes.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
        axes.legend(fontsize=7, loc="lower right")
        figure.tight_layout()
        path = out_dir / f"roc_{result.task}.png"
        atomic_write(path, lambda temporary, f=figure: f.savefig(temporary, format="png", dpi=110))
        plt.close(figure)
        written.append(path)
    return written


def write_report(results: list[TaskResult], settings: Settings, command: str, started: float) -> list[Path]:
    table = results_markdown(results)
    machine = f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, " \
              f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    header = (f"Command: `{command}`\n\nDate: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {machine}; "
              f"wall time {time.time() - started:.0f} s.\n\n")
    out_dir = settings.out_dir
    atomic_write(out_dir / "results.md", lambda t: Path(t).write_text(header + table, encoding="utf-8"))
    payload = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
               "command": command, "machine": machine, "results": [asdict(r) for r in results]}
    atomic_write(out_dir / "results.json", lambda t: Path(t).write_text(json.dumps(payload, indent=1, default=str)))
    written = [out_dir / "results.md", out_dir / "results.json"]
    try:
        written += plot_rocs(results, out_dir)
    except ImportError:
        _log("matplotlib not installed: no ROC plots")
    return written


def add_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "benchmark", help="fine-tune and evaluate on Genomic Benchmarks subsets; CAGI5 HNF4A zero-shot VEP",
        description=__doc__.split("\n\n", 1)[1].strip(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=None,
                        help=f"folder with {GB_FOLDER}/ and vep/ (default: ${DATA_ENV} or ../shared/data)")
    parser.add_argument("--fasta", type=Path, default=os.environ.get(FASTA_ENV),
                        help=f"GRCh37 FASTA with chr20, for CAGI5 (default: ${FASTA_ENV}; skipped without)")
    parser.add_argument("--cagi5-vcf", type=Path, help="the CAGI5 VCF (default: DATA/vep/cagi5_hnf4a_grch37.vcf)")
    parser.add_argument("--cagi5-window", type=int, help="VEP window in bases (default: each model's input size)")
    parser.add_argument("--models", help="comma-separated model names or directories (default: the bundled ones); "
                                         "a random initialisation of the first is always added")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of the four")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmark_results"), help="where results go")
    parser.add_argument("--quick", action="store_true",
                        help="128 train / 128 test per dataset, 1 epoch, batch 16, lr 2e-3, CAGI5 llr only")
    parser.add_argument("--max-train", type=int, help="at most this many training sequences per dataset")
    parser.add_argument("--max-test", type=int, help="at most this many test sequences per dataset")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs (default 10; quick 1)")
    parser.add_argument("--cnn-epochs", type=int, help="CNN epochs (default 10)")
    parser.add_argument("--batch-size", type=int, help="fine-tuning batch size (default 32; quick 16)")
    parser.add_argument("--lr", type=float, help="fine-tuning learning rate (default 1e-3; quick 2e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run the tasks (datasets, CAGI5) in this many processes at once; each task seeds its own "
                             "generators (on CPU its scores are those of one process); its times are not speed "
                             "figures (default 1)")
    parser.set_defaults(run=run)


def _command_line(args: argparse.Namespace) -> str:
    """The command as run, every option spelled out (for the report)."""
    parts = ["caduceus", "benchmark"]
    for key, value in vars(args).items():
        if key not in ("command", "run") and value not in (None, False):
            parts += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return shlex.join(parts)


def run(args: argparse.Namespace) -> None:
    try:
        import scipy  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError:
        raise DataError("the benchmark needs scikit-learn and scipy: pip install 'caduceus-dna[ml]'") from None
    overrides = {key: value for key, value in {
        "max_train": args.max_train, "max_test": args.max_test, "epochs": args.epochs,
        "cnn_epochs": args.cnn_epochs, "batch_size": args.batch_size, "lr": args.lr}.items() if value is not None}
    common = {"data_dir": args.data or default_data_dir(), "fasta": args.fasta, "out_dir": args.out_dir,
              "cagi5_vcf": args.cagi5_vcf, "cagi5_window": args.cagi5_window,
              "models": [m for m in args.models.split(",") if m] if args.models is not None else None,
              "datasets": tuple(d for d in args.datasets.split(",") if d), "seed": args.seed, "device": args.device,
              "jobs": args.jobs}
    settings = Settings.quick(**common, **overrides) if args.quick else Settings(**common, **overrides)
    started = time.time()
    results = run_benchmark(settings)
    written = write_report(results, settings, _command_line(args), started)
    print(results_markdown(results))
    _log(f"wrote {', '.join(map(str, written))}")
