"""The verdict a run leads with: words that say what the held-out AUROC means."""

from __future__ import annotations

from simulations.scenario import load_scenario
from simulations.verdict import MethodResult, VerdictThresholds, reverses_a_shortcut, verdict_lines


def test_the_verdict_names_the_shortcut_only_where_one_is_reversed():
    results = [MethodResult("strata-subspace", 0.78, 0.80), MethodResult("FedAvg-ERM", 0.13, 0.85)]
    lines = verdict_lines(results)
    assert lines[0].endswith("avoided the shortcut")
    assert "learnt the shortcut (worse than chance where it is reversed)" in lines[1]
    assert lines[2] == "strata-subspace gains 0.650 held-out AUROC over FedAvg-ERM on the same hospitals"
    plain = verdict_lines(results[:1], reversed_shortcut=False)
    assert plain == ["strata-subspace: held-out AUROC 0.780 (i.i.d. 0.800): ranks the held-out hospital's patients well"]
    between = verdict_lines([MethodResult("x", 0.6, 0.8)], VerdictThresholds(avoided=0.7, followed=0.5))
    assert between[0].endswith("partly avoided the shortcut")
    assert reverses_a_shortcut(load_scenario("default")) and not reverses_a_shortcut(load_scenario("scanner_only"))
