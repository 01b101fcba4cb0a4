"""Calibrated decisions: a scale and bias fitted on the training hospitals' validation
cases, and each hospital's own prevalence in its decision threshold. Pure numpy.

A model trained across hospitals of different prevalence scores patients on the
federation's scale. At a hospital, Bayes' rule under label shift gives the posterior

    logit P_h(y=1 | x) = a * logit(x) + b + logit(pi_h) - logit(pi_federation)

with (a, b) the scale and bias that make the federation's validation cases calibrated
(Platt scaling; "bias-corrected temperature scaling", which Alexandari et al. 2020 found
label-shift estimation needs), and pi_h
the hospital's prevalence: known where it has labels, estimated from its unlabeled images
where it has none (``mlls_prevalence``, ``bbse_prevalence``). Deciding at posterior 0.5 is
then the accurate decision for that hospital.

Pure numpy, and the one file a run keeps of it: ``calibration.json`` beside ``model.pt``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.files import atomic_write_text

# Beside a run's model.pt: the final model's calibration and the federation's prevalence,
# what a new hospital needs to read the model's scores as its own posteriors.
CALIBRATION_FILE = "calibration.json"
# The (scale, bias) that leaves a logit as it is: a model never calibrated, or logits
# that already are.
IDENTITY_CALIBRATION = (1.0, 0.0)

# The (scale, bias) pairs tried when calibrating: scales log-spaced from 0.03 to 300 (flatten
# the logit thirtyfold, or sharpen a barely trained head's evidence three-hundredfold: a
# strata-adjusted model's own evidence logit is small), biases from -2.5 to 2.5 logits;
# 29 x 11 pairs. Each hospital reports its validation log-loss at every pair; the server
# keeps the pair whose sum over the training hospitals is least.
CALIBRATIONS = tuple((float(a), float(b)) for a in np.geomspace(0.03, 300.0, 29) for b in np.linspace(-2.5, 2.5, 11))
# Estimates are kept inside this range: at 0 or 1 a prevalence says nothing about a case.
PREVALENCE_BOUNDS = (0.01, 0.99)
# An estimate this close to 0 or 1 is the estimator running away from miscalibrated
# posteriors (Alexandari et al. 2020), not a prevalence: the federation's is then used.
TRUSTED_PREVALENCE = (0.02, 0.98)


def logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def log_loss_per_calibration(logits: np.ndarray, labels: np.ndarray, *, shift: float = 0.0) -> np.ndarray:
    """Summed log-loss of the cases under every (scale, bias) of ``CALIBRATIONS``, moved by
    ``shift`` too (a hospital's prior shift)."""
    labels = labels.astype(np.float64)
    totals = []
    for scale, bias in CALIBRATIONS:
        z = scale * logits.astype(np.float64) + bias + shift
        totals.append(float(np.sum(np.logaddexp(0.0, z) - labels * z)))
    return np.array(totals)


def mlls_prevalence(probabilities: np.ndarray, *, source_prevalence: float, iterations: int = 200,
                    tolerance: float = 1e-7) -> float:
    """Maximum-likelihood label-shift estimate (the EM of Saerens et al. 2002): the
    prevalence at a new hospital from calibrated posteriors at ``source_prevalence``."""
    p = np.clip(probabilities.astype(np.float64), 1e-6, 1 - 1e-6)
    prevalence = source_prevalence
    for _ in range(iterations):
        up = prevalence / source_prevalence * p
        down = (1 - prevalence) / (1 - source_prevalence) * (1 - p)
        updated = float(np.mean(up / (up + down)))
        if abs(updated - prevalence) < tolerance:
            prevalence = updated
            break
        prevalence = updated
    return float(np.clip(prevalence, *PREVALENCE_BOUNDS))


def estimated_prevalence(posteriors: np.ndarray, *, federation_prevalence: float) -> tuple[float, str | None]:
    """MLLS on calibrated posteriors, or the federation's prevalence when the estimate runs
    to a bound; the second value says why it fell back (None: it did not)."""
    value = mlls_prevalence(posteriors, source_prevalence=federation_prevalence)
    if TRUSTED_PREVALENCE[0] < value < TRUSTED_PREVALENCE[1]:
        return value, None
    return federation_prevalence, (f"the estimate ran to {value:.2f}: the model's scores are not calibrated for "
                                   "these images")


def bbse_prevalence(predicted_positive: float, *, true_positive_rate: float, false_positive_rate: float) -> float | None:
    """Black-box shift estimation (Lipton et al. 2018), binary: the prevalence that explains
    the share of cases a classifier calls positive, given its rates on labelled source
    cases. None when the classifier cannot tell the classes apart (rates within 0.05)."""
    spread = true_positive_rate - false_positive_rate
    if spread < 0.05:
        return None
    return float(np.clip((predicted_positive - false_positive_rate) / spread, *PREVALENCE_BOUNDS))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, *, bins: int = 10) -> float:
    """Mean |confidence - frequency| over ``bins`` equal-width bins, weighted by their cases."""
    if len(labels) == 0:
        return math.nan
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            error += chosen.mean() * abs(float(probabilities[chosen].mean()) - float(labels[chosen].mean()))
    return float(error)


def sensitivity_at_specificity(scores: np.ndarray, labels: np.ndarray, *, specificity: float = 0.9) -> float:
    """Share of positives scored above the threshold that keeps ``specificity`` of negatives below."""
    negatives, positives = scores[labels == 0], scores[labels == 1]
    if len(negatives) == 0 or len(positives) == 0:
        return math.nan
    return float(np.mean(positives > np.quantile(negatives, specificity)))


@dataclass(frozen=True)
class Decisions:
    accuracy: float
    balanced_accuracy: float
    ece: float

    @classmethod
    def of(cls, probabilities: np.ndarray, labels: np.ndarray) -> Decisions:
        if len(labels) == 0:
            return cls(math.nan, math.nan, math.nan)
        called = probabilities >= 0.5
        rates = [float(np.mean(called[labels == c] == bool(c))) for c in (0, 1) if (labels == c).any()]
        return cls(float(np.mean(called == labels.astype(bool))), float(np.mean(rates)),
                   expected_calibration_error(probabilities, labels))


def write_calibration(path: Path, calibration: tuple[float, float] | None, federation_prevalence: float) -> None:
    atomic_write_text(path, json.dumps({"calibration": calibration, "federation_prevalence": federation_prevalence},
                                       indent=1))


def read_calibration(path: Path) -> tuple[tuple[float, float] | None, float]:
    """(the calibration, or None where the run had none; the federation's prevalence) from
    a file ``write_calibration`` wrote; ValueError naming the file if it is not one."""
    try:
        saved = json.loads(path.read_text())
        calibration = tuple(float(v) for v in saved["calibration"]) if saved.get("calibration") else None
        return calibration, float(saved["federation_prevalence"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: not a calibration written by causalfed") from None


def hospital_posteriors(logits: np.ndarray, *, calibration: tuple[float, float], prevalence: float,
                        federation_prevalence: float) -> np.ndarray:
    """The calibrated posterior at a hospital of ``prevalence``."""
    scale, bias = calibration
    return sigmoid(scale * logits + bias + logit(prevalence) - logit(federation_prevalence))
