"""Reference updates: the server trains as an honest hospital would, on its own validation
cases, and asks whether each client's update points with that training or against it.

Why: in the first rounds an honest update is mostly its hospital's prevalence. With Adam
from a fresh model, the server's own trainings on 400 of its cases at prevalence 0.3 and
0.7 have cosines of about +0.8 and -0.8 with one honest hospital's update and the reverse
with another's (seed 4, round 1), so a sign-flipped hospital with few positives looks
like an honest one with many. The gradient of the mean score (``without_common_shift``)
removes that part only to first order, through Adam's steps it leaves much of it: seed 4's
flipped hospital 02 then read a cosine of -0.02 with the validation ranking in round 1.
Trained references carry the same optimiser, steps and batch size as the hospitals, so
their difference across prevalence is the direction a prevalence moves an update, and a
reference at balanced prevalence, without that direction, is what learning the label
does. Seed 4, round 1, with the prevalence direction so removed: honest hospitals +0.11
to +0.46 along the balanced reference, its three sign-flippers -0.19 to -0.46.

Cost: a few local trainings of one hospital's size per round, and dot products linear in
the number of parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common.data import Split
from server.guard_stats import round_rng, without_direction

# The prevalences whose references' difference is the prevalence direction, and the one
# of the references along which learning is judged (the validation cases carry no shortcut).
LOW_PREVALENCE, HIGH_PREVALENCE, BALANCED = 0.25, 0.75, 0.5
# References per round: at each extreme, and balanced. One training of 400 cases costs
# about 0.09 s here; single balanced references disagree (cosines 0.3 between two), and
# the jackknife error over them is what the statistic is judged by. Sixteen, not eight:
# against eight, seed 4's label-flipped hospital 02 read -0.35 +/- 0.08 in round 2, and
# its round-1 reading pulled the sum over rounds under the level. Against sixteen it was
# caught in round 2, not 3, and the third label-flipper in round 1, not 3; seed 4's mean
# TPR went from 0.966 to 0.971, and the largest honest round-1 z over 61 seeds from 4.7
# to 3.6 (``benchmarks/GUARD_HISTORY.md``, seventeenth version).
EXTREME_REFERENCES, BALANCED_REFERENCES = 2, 16

# Trains a model, given as a flat parameter vector, on a split as a hospital would in this
# round; returns the trained flat vector (same order).
ReferenceTrainer = Callable[[np.ndarray, Split, int], np.ndarray]


@dataclass(frozen=True)
class References:
    """One round's reference updates: the prevalence direction (any length) and the
    balanced references without it (one per row)."""

    prevalence_direction: np.ndarray
    balanced: np.ndarray


def prevalence_sample(split: Split, *, prevalence: float, size: int, rng: np.random.Generator) -> Split:
    """``size`` cases drawn with replacement from ``split``, a share ``prevalence`` of them positive."""
    positives, negatives = np.flatnonzero(split.labels == 1), np.flatnonzero(split.labels == 0)
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError("a prevalence sample needs positive and negative cases")
    count = int(round(prevalence * size))
    chosen = np.concatenate([rng.choice(positives, count), rng.choice(negatives, size - count)])
    return split.subset(rng.permutation(chosen))


def train_references(
    start: np.ndarray, split: Split, train: ReferenceTrainer, *, cases: int, balanced: int, extremes: int, seed: int,
) -> References:
    """``extremes`` references at each extreme prevalence, for the prevalence direction, and
    ``balanced`` ones at the balanced prevalence, each on ``cases`` cases of ``split``."""
    rng = round_rng(start, seed=seed)  # a resumed run trains the same references

    def updates(prevalence: float, count: int) -> np.ndarray:
        return np.stack([train(start, prevalence_sample(split, prevalence=prevalence, size=cases, rng=rng),
                               int(rng.integers(2**31))) - start for _ in range(count)])

    direction = updates(HIGH_PREVALENCE, extremes).mean(axis=0) - updates(LOW_PREVALENCE, extremes).mean(axis=0)
    return References(direction, without_direction(updates(BALANCED, balanced), direction))


def _cosines(rows: np.ndarray, direction: np.ndarray) -> np.ndarray:
    return rows @ direction / ((np.linalg.norm(rows, axis=1) + 1e-12) * (np.linalg.norm(direction) + 1e-12))


def reference_alignments(deltas: np.ndarray, references: References) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of each update (one per row), without the prevalence direction, with the mean
    balanced reference, and its jackknife standard error over the references (how much
    the few references the server trained leave unsure). Needs two references or more."""
    residuals = without_direction(deltas, references.prevalence_direction)
    balanced = references.balanced
    k = len(balanced)
    if k < 2:
        raise ValueError("a jackknife error needs two references or more")
    cosines = _cosines(residuals, balanced.mean(axis=0))
    left_out = np.stack([_cosines(residuals, (balanced.sum(axis=0) - b) / (k - 1)) for b in balanced], axis=1)
    errors = np.sqrt((k - 1) / k * np.sum((left_out - left_out.mean(axis=1, keepdims=True)) ** 2, axis=1))
    return cosines, errors
