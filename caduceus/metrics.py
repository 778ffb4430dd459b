"""Validation metrics in numpy (no scikit-learn needed): accuracy, MCC and AUROC for classification,
MSE and Pearson correlation for regression. A metric that is undefined for the data (AUROC with one
class present, Pearson of a constant) is NaN rather than an error, so that training goes on."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    return float(np.mean(labels == predictions))


def matthews_corrcoef(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K); 0 when a marginal is constant, as scikit-learn."""
    classes = np.union1d(labels, predictions)
    true = (labels[:, None] == classes).astype(np.float64)
    pred = (predictions[:, None] == classes).astype(np.float64)
    confusion = true.T @ pred
    n, correct = confusion.sum(), np.trace(confusion)
    t, p = confusion.sum(axis=1), confusion.sum(axis=0)
    denominator = np.sqrt((n**2 - p @ p) * (n**2 - t @ t))
    return float((correct * n - t @ p) / denominator) if denominator else 0.0


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def binary_auroc(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney rank statistic (ties count one half)."""
    positives = int(is_positive.sum())
    negatives = len(is_positive) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    rank_sum = _average_ranks(scores)[is_positive].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def auroc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Binary AUROC of the class-1 probability, or the macro average of one-vs-rest AUROCs over the
    classes present in ``labels`` (scikit-learn's ``roc_auc_score(multi_class="ovr")``)."""
    if probabilities.shape[1] == 2:
        return binary_auroc(labels == 1, probabilities[:, 1])
    present = np.unique(labels)
    if len(present) < 2:
        return float("nan")
    return float(np.mean([binary_auroc(labels == c, probabilities[:, c]) for c in present]))


def classification_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    predictions = logits.argmax(axis=1)
    return {
        "accuracy": accuracy(labels, predictions),
        "mcc": matthews_corrcoef(labels, predictions),
        "auroc": auroc(labels, softmax(logits)),
    }


def regression_metrics(targets: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """MSE over all outputs and the Pearson correlation averaged over output columns."""
    targets = targets.reshape(len(targets), -1).astype(np.float64)
    predictions = predictions.reshape(len(predictions), -1).astype(np.float64)
    centred_t = targets - targets.mean(axis=0)
    centred_p = predictions - predictions.mean(axis=0)
    scale = np.sqrt((centred_t**2).sum(axis=0) * (centred_p**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        pearson = np.where(scale > 0, (centred_t * centred_p).sum(axis=0) / scale, np.nan)
    return {"mse": float(np.mean((targets - predictions) ** 2)), "pearson": float(np.mean(pearson))}
