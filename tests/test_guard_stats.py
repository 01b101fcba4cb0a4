"""The guard's maths: sketches, p-values and their combinations (``server/guard_stats.py``,
and ``combine_by_family`` in ``server/detectors.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from server.detectors import DependenceDetector, combine_by_family
from server.guard_stats import (
    accumulate_over_rounds,
    benjamini_hochberg,
    count_sketch,
    outlier_upper_p,
    partial_correlations,
    robust_spread,
    robust_z,
    upper_p,
)


def test_count_sketch_is_linear_and_keeps_inner_products():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50_000), rng.normal(size=50_000)
    np.testing.assert_allclose(count_sketch(2 * a + b), 2 * count_sketch(a) + count_sketch(b))
    c = a + 0.5 * b
    exact = a @ c / (np.linalg.norm(a) * np.linalg.norm(c))
    sketched = count_sketch(a) @ count_sketch(c) / (np.linalg.norm(count_sketch(a)) * np.linalg.norm(count_sketch(c)))
    assert sketched == pytest.approx(exact, abs=0.08)


def test_benjamini_hochberg_and_robust_z():
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    assert benjamini_hochberg(p, level=0.05).tolist() == [True, True] + [False] * 8
    z = robust_z(np.array([1.0, 1.1, 0.9, 1.05, 0.95, 10.0]))
    assert z[-1] > 50 and np.all(np.abs(z[:-1]) < 2)  # one liar cannot hide in the spread


def test_outlier_p_values_hold_their_level_under_a_normal_null():
    """Ten honest values from one normal law: a lone suspect's p-value (robust z against all
    ten, heavy tail) and each of three suspects' (prediction test against the seven others)
    fall below a level about as often as the level says; the heavy tail was chosen for the
    first, and the second is exact. Not the robust z against seven others with the heavy
    tail: it passes p 1e-3 about ten times as often (why the prediction test is used)."""
    rng = np.random.default_rng(11)
    draws = rng.standard_normal((20_000, 10))
    lone, three = np.zeros(10, dtype=bool), np.zeros(10, dtype=bool)
    lone[0], three[:3] = True, True
    p_lone = np.array([outlier_upper_p(values, lone)[0] for values in draws])
    p_three = np.array([outlier_upper_p(values, three)[0] for values in draws])
    for level in (0.05, 0.01, 0.002):
        assert np.mean(p_lone < level) == pytest.approx(level, rel=0.35), level
        assert np.mean(p_three < level) == pytest.approx(level, rel=0.35), level
    robust_against_seven = np.array([(values[0] - np.median(values[3:])) / robust_spread(values[3:])
                                     for values in draws])
    assert np.mean(upper_p(robust_against_seven) < 1e-3) > 5e-3


def test_partial_correlation_finds_a_copy_but_not_independent_clients():
    rng = np.random.default_rng(2)
    honest = rng.normal(size=(6, 512))
    copy = honest[2] + 0.05 * rng.normal(size=512)
    partial = partial_correlations(np.vstack([honest, copy]))
    assert partial[2, 6] > DependenceDetector.min_partial_correlation
    off = partial[:6, :6][~np.eye(6, dtype=bool)]
    assert np.abs(off).max() < 0.3


def test_steady_moderate_evidence_adds_up_and_a_sudden_change_still_counts():
    assert accumulate_over_rounds(0.003, []) == 0.003  # no past: this round alone
    steady = accumulate_over_rounds(0.01, [0.01, 0.01, 0.01])
    assert steady < 1e-4  # four rounds each at 0.01 are strong evidence together
    sudden = accumulate_over_rounds(1e-6, [0.6, 0.8, 0.5])
    assert sudden <= 2e-6  # a clean past does not dilute a sudden change (beyond x2)
    assert accumulate_over_rounds(0.5, [0.4, 0.9, 0.7]) > 0.5  # nothing from nothing


def test_detectors_asking_the_same_question_share_one_bonferroni_share():
    p = {"forecast": np.array([0.01, 1.0]), "intervention": np.array([1.0, 0.004]), "solo-ranking": np.array([0.5, 0.02])}
    combined = combine_by_family(p)  # two families: forecast, and the two interventions
    assert combined.tolist() == pytest.approx([0.02, 0.016])


def test_harm_is_tested_at_half_the_level_and_the_signs_of_an_attack_share_the_rest():
    """Weighted Bonferroni, weights fixed a priori: a p-value of 0.01 from the harm family
    counts x2, the same from one of the five other families x10 (equal shares: x6 both)."""
    quiet = np.ones(2)
    p = {name: quiet for name in ("magnitude", "alignment", "dependence", "crafted")}
    p |= {"forecast": np.array([0.01, 1.0]), "validation-direction": np.array([1.0, 0.01])}
    assert combine_by_family(p).tolist() == pytest.approx([0.1, 0.02])
    assert combine_by_family(p, harm_share=1 / 6).tolist() == pytest.approx([0.06, 0.06])
    harm_only = {"validation-direction": np.array([0.01]), "solo-ranking": np.array([0.2])}
    assert combine_by_family(harm_only).tolist() == pytest.approx([0.02])  # x2 in the family, no share to give
