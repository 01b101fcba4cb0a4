"""FLTrust and FLAME as their papers define them, on small synthetic updates; and the
guard inside a federation: its reports, its provenance record, its resumable memory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.robust import flame_update, fltrust_update


def test_fltrust_trusts_by_direction_and_rescales_to_the_server_update():
    server = np.array([1.0, 0.0, 0.0])
    deltas = np.array([[2.0, 0.0, 0.0], [0.0, 5.0, 0.0], [-3.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    update = fltrust_update(deltas, server)
    # Trust: 1, 0 (orthogonal), 0 (reversed), cos 45 degrees; every update at the server's length.
    trust = np.array([1.0, 0.0, 0.0, np.sqrt(0.5)])
    expected = (trust[0] * np.array([1.0, 0, 0]) + trust[3] * np.array([1.0, 1.0, 0]) / np.sqrt(2)) / trust.sum()
    assert np.allclose(update, expected)
    assert np.allclose(fltrust_update(-deltas[:1], server), 0.0)  # nobody trusted: no update


def test_flame_admits_the_majority_cluster_clips_to_the_median_and_adds_its_noise():
    rng = np.random.default_rng(0)
    direction = rng.normal(0, 1, 200)
    honest = direction + 0.1 * rng.normal(0, 1, (7, 200))
    attackers = -5 * direction + 0.3 * rng.normal(0, 1, (3, 200))
    deltas = np.vstack([honest, attackers])
    update, admitted = flame_update(deltas, noise_factor=0.0, rng=rng)
    # HDBSCAN may call an honest update at its cluster's edge noise too (FLAME's own behaviour).
    assert admitted[:7].sum() >= 6 and not admitted[7:].any()
    bound = np.median(np.linalg.norm(deltas, axis=1))
    kept = deltas[admitted]
    clipped = kept * np.minimum(1.0, bound / np.linalg.norm(kept, axis=1))[:, None]
    assert np.allclose(update, clipped.mean(axis=0))
    noisy, _ = flame_update(deltas, noise_factor=0.5, rng=np.random.default_rng(1))
    assert np.std(noisy - update) == pytest.approx(0.5 * bound, rel=0.2)


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory):
    """One small attacked federation with the guard, shared by the tests below."""
    from simulations.runner import run_scenario
    from simulations.scenario import load_scenario

    scenario = load_scenario("guard").with_overrides(
        federation={"num_rounds": 2}, attack={"name": "ipm", "malicious": ["hospital-01", "hospital-02"]})
    raw = scenario.model_dump(mode="json")
    for site in raw["data"]["sites"]:
        site["n_samples"] = 120
    scenario = type(scenario).model_validate(raw)
    run_dir = tmp_path_factory.mktemp("guarded")
    history = run_scenario(scenario, run_dir=run_dir)
    return scenario, run_dir, history


def test_the_guard_excludes_attackers_and_writes_why(guarded_run):
    from server.guard.round import read_round_reports

    _, run_dir, history = guarded_run
    reports = read_round_reports(run_dir)
    assert [r["round"] for r in reports] == [1, 2]
    for report in reports:
        assert sorted(report["excluded"]) == ["hospital-01", "hospital-02"]
        assert report["detectors"]["direction"] == "off: no reference set (data-free mode)"
        reasons = {v["client"]: v["reasons"] for v in report["verdicts"]}
        assert any(reason.startswith("mirror:") for reason in reasons["hospital-01"])
    assert history["rounds"][-1]["sites"]["hospital-01"]["guard-excluded"] == 1.0


def test_the_provenance_log_says_what_the_guard_ran_on_and_decided(guarded_run):
    _, run_dir, _ = guarded_run
    records = [json.loads(line) for line in (run_dir / "provenance" / "log.jsonl").read_text().splitlines()]
    start = records[0]["body"]["guard"]
    assert start["enabled"] and start["mode"] == "data-free" and start["config"]["copy_distance"] > 0
    round_one = records[1]["body"]
    assert round_one["verdicts"]["hospital-01"].startswith("excluded by the guard: mirror")
    assert round_one["guard"]["direction"].startswith("off")
    assert round_one["guard"]["copy"].startswith("ran on")


def test_the_server_state_keeps_the_guards_memory(guarded_run):
    from server.guard.evidence import GuardMemory
    from server.resume import STATE_FILE, ServerState

    _, run_dir, _ = guarded_run
    memory = GuardMemory.from_dict(ServerState.load(run_dir / STATE_FILE).guard_memory)
    assert memory.previous_round == 2 and set(memory.previous) >= {"hospital-00", "hospital-01"}
    assert memory.clients["hospital-00"].accepted_round == 2
    assert memory.clients["hospital-01"].accepted_round is None  # excluded every round
