"""The server guard in a federation: the attack registry, what the guard catches and
reports, resuming, and Flower's robust rules as baselines. The detectors on made-up updates
are in ``test_detectors.py``, their maths in ``test_guard_stats.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.config import ScenarioError, load_scenario, parse_scenario
from server.detectors import DETECTORS
from server.guard import CausalGuard
from server.guard_round import bounded_update
from simulations.attacks import ATTACKS, RoundView, trigger_flip_rate
from simulations.report import write_report
from simulations.runner import run_scenario

# What the guard is shown to catch at 20% attackers in a few rounds (the benchmark has the
# full table, including what it misses).
CAUGHT = ["alie", "backdoor", "colluding-pair", "free-rider", "gaussian", "ipm", "label-flip", "min-max"]


@pytest.fixture(scope="module")
def guarded():
    return load_scenario("guard").with_overrides(federation={"num_rounds": 3})


def _attacked(scenario, attack, attackers=("hospital-01", "hospital-05")):
    return scenario.with_overrides(attack={"name": attack, "malicious": list(attackers)})


def _reports(run_dir):
    return [json.loads(p.read_text()) for p in sorted((run_dir / "anomalies").glob("round-*.json"))]


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_registered_attack_crafts_a_distinct_update(name):
    rng = np.random.default_rng(4)
    honest = rng.normal(size=(6, 300)) + 0.5
    views = [RoundView(np.zeros(300), honest, rng.normal(size=300), i, 2, 8, rng) for i in range(2)]
    attack = ATTACKS[name]()
    first, second = (attack.send(view) for view in views)
    assert first.shape == (300,) and np.isfinite(first).all()
    if name != "free-rider":
        assert not np.allclose(first, second)  # per-attacker jitter: no identical vectors
    assert min(np.linalg.norm(first - h) for h in honest) > 1e-3


def test_backdoor_success_is_read_off_the_ranking_not_the_bias():
    rng = np.random.default_rng(0)
    positives, negatives = rng.normal(1.0, 1.0, 400), rng.normal(-1.0, 1.0, 400)  # logits
    nudged = positives - 0.3  # a trigger that moves every case a little
    for bias in (-2.0, 0.0, 2.0):  # models with the same ranking and another prevalence
        rate = trigger_flip_rate(positives=positives + bias, stamped=nudged + bias, negatives=negatives + bias)
        assert rate == pytest.approx(trigger_flip_rate(positives=positives, stamped=nudged, negatives=negatives))
    assert 0.0 < rate < 0.2
    assert trigger_flip_rate(positives=positives, stamped=positives, negatives=negatives) == 0.0
    planted = np.full_like(positives, -5.0)  # the trigger reads as "no lesion" whatever the case
    assert trigger_flip_rate(positives=positives, stamped=planted, negatives=negatives) == 1.0
    assert np.isnan(trigger_flip_rate(positives=negatives - 9, stamped=planted, negatives=negatives))


def test_registered_detectors_are_the_guards():
    assert set(CausalGuard().detectors) == set(DETECTORS)


def test_a_benign_federation_gets_no_flags(guarded, tmp_path):
    run_scenario(guarded, run_dir=tmp_path)
    reports = _reports(tmp_path)
    assert len(reports) == 3 and all(not r["flagged"] for r in reports)


@pytest.mark.parametrize("attack", CAUGHT)
def test_the_guard_catches_the_attack_and_explains_why(guarded, tmp_path, attack):
    run_scenario(_attacked(guarded, attack), run_dir=tmp_path)
    reports = _reports(tmp_path)
    flagged = {c for r in reports for c in r["flagged"]}
    assert flagged == {"hospital-01", "hospital-05"}, [r["flagged"] for r in reports]
    verdict = next(v for r in reports for v in r["verdicts"] if v["flagged"])
    assert verdict["evidence"] and 0.99 < verdict["confidence"] <= 1.0
    log = (tmp_path / "provenance" / "log.jsonl").read_text()
    assert "rejected: guard:" in log


def test_anomalies_reach_the_report(guarded, tmp_path):
    scenario = _attacked(guarded, "backdoor")
    history = run_scenario(scenario, run_dir=tmp_path)
    page = write_report(tmp_path, history, scenario).read_text()
    assert "Anomalies (server guard)" in page and "hospital-05" in page
    assert (tmp_path / "anomaly_graph.png").stat().st_size > 1000


@pytest.mark.parametrize("rule", ["krum", "multikrum", "bulyan", "median", "trimmed-mean"])
def test_flowers_robust_rules_run_as_baselines(guarded, rule):
    scenario = guarded.with_overrides(federation={"num_rounds": 1, "aggregation": rule, "assumed_malicious": 1, "guard": None})
    history = run_scenario(scenario)
    assert len(history["rounds"]) == 1


def test_attack_config_is_checked(guarded):
    raw = guarded.model_dump(mode="json")
    with pytest.raises(ScenarioError, match="unknown attack"):
        parse_scenario(raw | {"attack": {"name": "telepathy", "malicious": ["hospital-01"]}})
    with pytest.raises(ScenarioError, match="training hospitals"):
        parse_scenario(raw | {"attack": {"name": "ipm", "malicious": ["hospital-99"]}})


def test_a_resumed_run_remembers_who_was_suspect(guarded, tmp_path):
    """The guard's memories travel in the server state: after a crash, round 3 is judged
    exactly as in a run that never stopped (same forecasts, same accumulated evidence)."""
    scenario = _attacked(guarded, "gaussian")
    run_scenario(scenario, run_dir=tmp_path / "straight")

    def crash_after_round_2(done, _sites):
        if done == 2:
            raise RuntimeError("server killed")

    with pytest.raises(RuntimeError, match="server killed"):
        run_scenario(scenario, run_dir=tmp_path / "crashed", on_round=crash_after_round_2)
    run_scenario(scenario, run_dir=tmp_path / "crashed", resume=True)
    straight, resumed = _reports(tmp_path / "straight")[-1], _reports(tmp_path / "crashed")[-1]
    assert resumed["round"] == 3 and resumed["verdicts"] == straight["verdicts"]


def test_a_borderline_update_is_shrunk_to_a_typical_size():
    start = np.zeros(4)
    boosted = np.array([3.0, 4.0, 0.0, 0.0])  # an update of norm 5
    np.testing.assert_allclose(bounded_update(boosted, start, max_norm=1.0), boosted / 5)
    small = np.array([0.3, 0.4, 0.0, 0.0])
    np.testing.assert_array_equal(bounded_update(small, start, max_norm=1.0), small)  # within bounds: untouched
