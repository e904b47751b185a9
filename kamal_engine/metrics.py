"""Evaluation metrics: average precision per label (multi-label) and top-1 accuracy (multi-class)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


def average_precision(scores: Sequence[float], targets: Sequence[int]) -> float:
    """Average precision of one label, the same value as ``sklearn.metrics.average_precision_score``.

    AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds, highest first (ties form one
    threshold). This is the non-interpolated area under the precision-recall curve (the VOC
    protocol's AP without its precision envelope). Returns NaN when there is no positive example.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    targets = np.asarray(targets).ravel().astype(bool)
    if scores.shape != targets.shape:
        raise ValueError(f"scores and targets differ in length ({scores.size} vs {targets.size})")
    n_pos = int(targets.sum())
    if n_pos == 0:
        return math.nan
    order = np.argsort(-scores, kind="mergesort")
    scores, targets = scores[order], targets[order]
    last_of_threshold = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    true_pos = np.cumsum(targets)[last_of_threshold]
    predicted_pos = last_of_threshold + 1
    precision = true_pos / predicted_pos
    recall = true_pos / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def per_label_ap(scores: np.ndarray, targets: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """``{label: AP}`` for ``scores`` and 0/1 ``targets`` of shape ``(N, len(labels))``."""
    return {label: average_precision(scores[:, j], targets[:, j]) for j, label in enumerate(labels)}


def mean_ap(aps: Mapping[str, float]) -> float:
    """mAP over the labels that have at least one positive example (NaN APs are left out)."""
    values = [v for v in aps.values() if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def top1_accuracy(scores: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of rows whose highest score is at the target class index."""
    scores, targets = np.asarray(scores), np.asarray(targets).ravel()
    if targets.size == 0:
        return math.nan
    return float(np.mean(scores.argmax(axis=1) == targets))
