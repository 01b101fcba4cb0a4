"""Evaluation metrics as pure functions of labels and scores."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score


def auroc(*, labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present (it is undefined then)."""
    if len(np.unique(labels)) < 2:
        return math.nan
    return float(roc_auc_score(labels, scores))


def binary_metrics(*, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    if len(labels) == 0:
        return {"auroc": math.nan, "accuracy": math.nan, "loss": math.nan}
    clipped = np.clip(scores.astype(np.float64), 1e-7, 1 - 1e-7)
    return {
        "auroc": auroc(labels=labels, scores=scores),
        "accuracy": float(np.mean((scores >= 0.5) == labels)),
        "loss": float(log_loss(labels, clipped, labels=[0, 1])),
    }
