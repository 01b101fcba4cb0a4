"""The guard's maths: small pure functions over sketches, coordinate samples and cosines.

Every update is compressed once to a fixed-length CountSketch (and a fixed sample of its
coordinates); everything after that costs time and memory in the sketch's length, not the
model's.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=4)
def _sketch_hash(length: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, length, size])
    return rng.integers(0, size, length, dtype=np.int32), rng.choice(np.array([-1.0, 1.0], dtype=np.float32), length)


def count_sketch(vector: np.ndarray, *, size: int, seed: int = 0) -> np.ndarray:
    """CountSketch of a flat vector: every coordinate goes to one bucket with a random sign.

    Linear, so sketch(a - b) = sketch(a) - sketch(b); inner products and lengths are kept
    in expectation, with relative error about 1/sqrt(size).
    """
    buckets, signs = _sketch_hash(len(vector), size, seed)
    return np.bincount(buckets, weights=signs * vector, minlength=size)


@lru_cache(maxsize=4)
def _sample_index(length: int, size: int, seed: int) -> np.ndarray:
    if length <= size:
        return np.arange(length)
    return np.sort(np.random.default_rng([seed, length, size, 1]).choice(length, size, replace=False))


def coordinate_sample(vector: np.ndarray, *, size: int, seed: int = 0) -> np.ndarray:
    """The same ``size`` randomly chosen coordinates of every vector of this length."""
    return np.asarray(vector)[_sample_index(len(vector), size, seed)].astype(np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def step_allowance(steps: np.ndarray) -> np.ndarray:
    """How much longer each update may be for training more local steps than the round's
    median hospital: sqrt of the ratio (a random walk's growth), never below 1."""
    typical = max(float(np.median(steps)), 1.0)
    return np.sqrt(np.maximum(1.0, np.asarray(steps, dtype=np.float64) / typical))


def span_share_over_chance(vector: np.ndarray, others: np.ndarray) -> float:
    """The share of ``vector``'s squared length in the span of the rows of ``others``, over
    the share a random direction would have there (rank / dimension)."""
    basis, _ = np.linalg.qr(others.T)  # (k, r), orthonormal columns
    rank = basis.shape[1]
    share = float(np.sum((basis.T @ vector) ** 2) / (vector @ vector + 1e-300))
    return share / (rank / len(vector))


def pairwise_distances(rows: np.ndarray) -> np.ndarray:
    squared = np.sum(rows**2, axis=1)
    return np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * rows @ rows.T, 0.0))


def robust_spread(values: np.ndarray) -> float:
    """1.4826 * MAD: the standard deviation for normal data, ignoring up to half outliers."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def spread_regularity(samples: np.ndarray, index: int) -> float:
    """How uniformly one row departs from the other rows' mean, in units of their standard
    deviation: |median| over robust spread of the departure, on the coordinates where the
    others disagree most (elsewhere any jitter looks like many standard deviations).

    An update computed from the others' statistics (ALIE: mean - z * std; Min-Max: mean -
    g * std / |std|) departs by the same number of standard deviations everywhere; an update
    learnt from its own cases departs by varying amounts in both directions.
    """
    others = np.delete(samples, index, axis=0)
    mean, spread = others.mean(axis=0), others.std(axis=0)
    informative = spread > np.median(spread)
    units = (samples[index, informative] - mean[informative]) / spread[informative]
    if len(units) == 0:
        return 0.0
    return abs(float(np.median(units))) / max(robust_spread(units), 1e-12)


def without_direction(rows: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """``rows`` (one per row, or one vector) less their component along ``direction``."""
    unit = direction / (np.linalg.norm(direction) + 1e-300)
    return rows - np.multiply.outer(rows @ unit, unit)


def jackknife_cosines(rows: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of each row with the mean reference, and its jackknife standard error over
    the references (how much the few references leave unsure). Needs two or more."""
    k = len(references)
    if k < 2:
        raise ValueError("a jackknife error needs two references or more")

    def cosines(direction: np.ndarray) -> np.ndarray:
        return rows @ direction / ((np.linalg.norm(rows, axis=1) + 1e-300) * (np.linalg.norm(direction) + 1e-300))

    total = references.sum(axis=0)
    centre = cosines(total / k)
    left_out = np.stack([cosines((total - r) / (k - 1)) for r in references], axis=1)
    error = np.sqrt((k - 1) / k * np.sum((left_out - left_out.mean(axis=1, keepdims=True)) ** 2, axis=1))
    return centre, error


def stouffer(scores: list[float]) -> float:
    """One z-score from several independent ones (0, no evidence, for none)."""
    return float(np.sum(scores) / math.sqrt(len(scores))) if scores else 0.0
