"""The ranking-evidence study's arithmetic (benchmarks/ranking_evidence.py); its runs are the study."""

from __future__ import annotations

import pytest
from scipy.stats import norm

from tests.conftest import load_benchmark


def _study():
    return load_benchmark("ranking_evidence")


def test_the_first_round_threshold_counts_the_guards_bonferroni():
    study = _study()
    assert study.first_round_flag_z(("validation-direction",), fdr=0.01, clients=10) == pytest.approx(norm.isf(1e-3))
    # A second family halves the level; a second member of the same family does too.
    assert study.first_round_flag_z(("validation-direction", "forecast"), fdr=0.01, clients=10) == pytest.approx(
        norm.isf(5e-4))
    assert study.first_round_flag_z(("validation-direction", "solo-ranking"), fdr=0.01, clients=10) == pytest.approx(
        norm.isf(5e-4))
    # The threshold of the detector studied, here the reference direction, in the same family.
    assert study.first_round_flag_z(("validation-direction", "reference-direction"), fdr=0.01, clients=10,
                                    detector="reference-direction") == pytest.approx(norm.isf(5e-4))


def test_the_table_counts_attackers_over_the_threshold_and_the_worst_honest_round():
    study = _study()
    readings = [study.Reading("s1/x", 1, "a", True, -0.25, 0.04), study.Reading("s1/x", 1, "b", True, -0.12, 0.04),
                study.Reading("s1/x", 1, "h", False, -0.11, 0.02), study.Reading("s1/x", 1, "g", False, 0.02, 0.001)]
    header, row = study.per_round_table(readings, flag_z=4.0, wobble=0.03)
    fields = row.split()
    # a: 0.25/0.04 is z 6.25, with the wobble 0.25/0.05 = 5; b: 3, 2.4; h: 0.11/0.02 is 5.5,
    # with the wobble 0.11/0.036 = 3.05; g has no direction.
    assert fields[:9] == ["1", "2", "0.50", "0.50", "2", "0.500", "0.000", "5.5", "3.1"], row
    assert "s1/x h (-0.11 +/- 0.02)" in row  # g has no direction: no z
