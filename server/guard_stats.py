"""The guard's maths: small pure functions over sketches, samples and p-values (numpy/scipy).

Everything here is linear in the number of parameters or works on fixed-size sketches, so
the guard's cost per round stays linear in the model's size.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from scipy.stats import combine_pvalues
from scipy.stats import t as student_t

SKETCH_SIZE = 512
SAMPLE_SIZE = 4096
# Robust z-scores of a few clients are heavy-tailed: Student-t, not normal. Five degrees of
# freedom match the robust z of one of ten normal values against all ten (``tests/test_guard_stats.py``).
HEAVY_TAIL_DF = 5


def count_sketch(vector: np.ndarray, *, size: int = SKETCH_SIZE, seed: int = 0) -> np.ndarray:
    """CountSketch of a flat vector: every coordinate goes to one bucket with a random sign.

    Linear in the vector's length, and inner products are preserved in expectation.
    """
    rng = np.random.default_rng(seed)
    buckets = rng.integers(0, size, len(vector))
    signs = rng.choice(np.array([-1.0, 1.0]), len(vector))
    return np.bincount(buckets, weights=signs * vector, minlength=size)


def coordinate_sample(vector: np.ndarray, *, size: int = SAMPLE_SIZE, seed: int = 0) -> np.ndarray:
    """The same ``size`` randomly chosen coordinates of every vector of this length.

    A CountSketch mixes coordinates; some questions (is the update built coordinate by
    coordinate from the others' statistics?) need coordinates kept apart.
    """
    if len(vector) <= size:
        return vector.copy()
    chosen = np.sort(np.random.default_rng(seed).choice(len(vector), size, replace=False))
    return vector[chosen]


def without_direction(vectors: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """``vectors`` (one per row) less their component along ``direction`` (any length)."""
    unit = direction / (np.linalg.norm(direction) + 1e-12)
    return vectors - np.outer(vectors @ unit, unit)


def round_rng(start: np.ndarray, *, seed: int) -> np.random.Generator:
    """Randomness drawn from the round's global model (flat): a resumed run draws the same."""
    digest = hashlib.sha256(np.ascontiguousarray(start).tobytes()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def log_norms(rows: np.ndarray) -> np.ndarray:
    """The log of each row's Euclidean norm (a zero row gives a very negative number, not -inf)."""
    return np.log(np.linalg.norm(rows, axis=1) + 1e-12)


def robust_spread(values: np.ndarray) -> float:
    """1.4826 * MAD: the standard deviation for normal data, ignoring up to half outliers."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 * MAD): stays honest with up to half the clients lying."""
    median = np.median(values)
    return (values - median) / max(robust_spread(values), 1e-12 + 1e-6 * abs(median))


def prediction_upper_p(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Upper p-value of each value as one more draw from what ``reference`` was drawn from:
    the Student-t prediction test, (x - mean) / (sd * sqrt(1 + 1/m)) on m - 1 degrees of
    freedom, exact for normal data. ``reference`` must hold no outliers (it is not robust)."""
    m, mean = len(reference), float(np.mean(reference))
    spread = max(float(np.std(reference, ddof=1)), 1e-12 + 1e-6 * abs(mean))
    return student_t.sf((values - mean) / (spread * math.sqrt(1 + 1 / m)), m - 1)


def outlier_upper_p(values: np.ndarray, suspects: np.ndarray, *, side: float = 1.0) -> np.ndarray:
    """Upper p-value of each value's departure (``side`` +1: above the others, -1: below),
    where an a-priori floor says who could be an outlier (``suspects``).

    Several suspects and three or more others: each value against the others alone, by the
    prediction test. Like outliers widen a yardstick they are in until none of them stands
    out (three boosted updates among ten: robust z 5.6 against all ten, 8.2 against the
    other seven). The others hold no suspect, so robustness buys nothing there, and the
    MAD of seven values is a poor yardstick: under a normal null a robust z against seven
    others passes 8.2 about once in 230 draws, where the heavy tail (t, ``HEAVY_TAIL_DF``)
    says once in 4500.

    A lone suspect: robust z against every value, itself included, with the heavy tail,
    which is that statistic's null for one of ten (``tests/test_guard_stats.py``). A lone one
    hardly moves a median of ten, and dropping it moves the yardstick by chance alone
    (seed 4's IPM attacker: shrinkage p 1.8e-5 against all, 5.9e-5 against the others).
    """
    others = ~suspects
    if suspects.sum() >= 2 and others.sum() >= 3:
        return prediction_upper_p(side * values, side * values[others])
    return upper_p(side * robust_z(values))


def upper_p(z: np.ndarray) -> np.ndarray:
    return student_t.sf(z, HEAVY_TAIL_DF)


def benjamini_hochberg(p_values: np.ndarray, *, level: float) -> np.ndarray:
    """Which hypotheses BH rejects at false-discovery rate ``level``."""
    n = len(p_values)
    order = np.argsort(p_values)
    thresholds = level * (np.arange(1, n + 1) / n)
    passed = p_values[order] <= thresholds
    rejected = np.zeros(n, dtype=bool)
    if passed.any():
        rejected[order[: np.max(np.flatnonzero(passed)) + 1]] = True
    return rejected


def partial_correlations(innovations: np.ndarray, *, shrinkage: float = 0.1) -> np.ndarray:
    """Partial correlations between rows (clients), from a shrunk correlation matrix."""
    correlation = np.corrcoef(innovations)
    correlation = np.nan_to_num(correlation)
    shrunk = (1 - shrinkage) * correlation + shrinkage * np.eye(len(correlation))
    precision = np.linalg.inv(shrunk)
    scale = np.sqrt(np.outer(np.diag(precision), np.diag(precision)))
    partial = -precision / scale
    np.fill_diagonal(partial, 1.0)
    return partial


def consensus_alignment(sketches: np.ndarray) -> np.ndarray:
    """Cosine of each client's sketch with the coordinate-wise median of the others'."""
    out = np.empty(len(sketches))
    for i in range(len(sketches)):
        others = np.median(np.delete(sketches, i, axis=0), axis=0)
        out[i] = sketches[i] @ others / (np.linalg.norm(sketches[i]) * np.linalg.norm(others) + 1e-12)
    return out


def spread_units(samples: np.ndarray, index: int) -> np.ndarray:
    """One client's departure from the others' mean, coordinate by coordinate, in units of
    the others' standard deviation there.

    Only the coordinates where the others disagree most (spread above its median) count:
    where they hardly disagree, any jitter looks like many standard deviations.
    """
    others = np.delete(samples, index, axis=0)
    mean, spread = others.mean(axis=0), others.std(axis=0)
    informative = spread > np.median(spread)
    return (samples[index, informative] - mean[informative]) / spread[informative]


def spread_regularity(units: np.ndarray) -> float:
    """|median| / robust spread of a departure in spread units.

    An update made of the others' statistics (ALIE: mean - z*std; Min-Max: mean - g*std)
    departs by the same number of standard deviations at every coordinate: a large ratio
    (about 25 in the benchmark). An honest hospital departs by varying amounts, in both
    directions (at most 2.3 in the benchmark).
    """
    if len(units) == 0:
        return 0.0
    centre = float(np.median(units))
    return abs(centre) / max(robust_spread(units), 1e-12)


def stouffer(z_scores: list[float]) -> float:
    """One z-score from several independent ones: their sum over the square root of their
    count (0, no evidence either way, for none)."""
    return float(np.sum(z_scores) / math.sqrt(len(z_scores))) if z_scores else 0.0


def stouffer_upper_p(pooled: np.ndarray, rounds: np.ndarray | list[int]) -> np.ndarray:
    """Upper p-value of Stouffer sums of ``rounds`` robust z-scores each.

    Each score is heavy-tailed (Student-t with ``HEAVY_TAIL_DF``); their scaled sum is less
    so. A Student-t whose excess kurtosis matches the sum's has 4 + (df - 4) * rounds
    degrees of freedom: one round is judged as any robust z of a few clients, many rounds
    approach the normal.
    """
    degrees = 4.0 + (HEAVY_TAIL_DF - 4.0) * np.maximum(np.asarray(rounds, dtype=float), 1.0)
    return student_t.sf(pooled, degrees)


def accumulate_over_rounds(current: float, past: list[float], *, alone: float | None = None) -> float:
    """This round's p-value or Fisher's combination with the client's recent rounds,
    whichever is smaller (x2 for taking the smaller): a sudden change still counts alone,
    and steady moderate evidence (every round a little suspicious) adds up.

    ``alone``: this round's p-value without the detectors that sum their own evidence over
    rounds (default ``current``), and so are the past rounds'. Fisher's method needs each
    round's evidence once: combining a sum that already holds round 1 with round 1's own
    p-value counted it twice (seed 5: an honest hospital flagged from round 1 to the end).
    Nor may such a detector enter by one round alone: with 500 validation cases an honest
    hospital's cosine once read -0.12 +/- 0.01 (z 5), its sum over rounds -1.9 (seed 12).
    """
    if not past:
        return current
    rounds = [*past, current if alone is None else alone]
    fisher = combine_pvalues(np.clip(rounds, 1e-300, 1.0), method="fisher").pvalue
    return float(min(1.0, 2 * min(current, fisher)))
