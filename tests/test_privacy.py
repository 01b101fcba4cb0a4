"""DP-SGD: cumulative epsilon across rounds, per-hospital budgets, logged accountant inputs."""

from __future__ import annotations

import json

import pytest

from client.objectives import build_objective
from client.privacy import (
    DPSettings,
    PrivacyBudgetSpent,
    PrivacyLedger,
    calibrated_noise_multiplier,
    epsilon_for,
    train_privately,
)
from client.task import new_model
from common.config import ScenarioError
from simulations.scenario import parse_scenario
from simulations.datasets import build_site
from simulations.runner import run_scenario


def _private(scenario, *, epsilon: float = 3.0, budgets: dict[str, float] | None = None):
    raw = scenario.model_dump(mode="json")
    raw["training"] |= {"objective": "erm", "objective_params": {}, "privacy": {"target_epsilon": epsilon}}
    raw["federation"]["num_rounds"] = 3
    for site in raw["data"]["sites"]:
        site["epsilon_budget"] = (budgets or {}).get(site["name"])
    return parse_scenario(raw)


def test_epsilon_accumulates_across_rounds_and_ends_at_the_target(small_scenario, tmp_path):
    scenario = _private(small_scenario, epsilon=3.0)
    history = run_scenario(scenario, run_dir=tmp_path)
    for site in scenario.data.train_sites:
        spent = [r["sites"][site.name]["train-dp-epsilon"] for r in history["rounds"]]
        assert spent[0] < spent[1] < spent[2], spent  # not reset per round
        assert 0.9 * 3.0 <= spent[-1] <= 3.0 * 1.01, spent


def test_logged_accountant_inputs_reproduce_the_epsilon(small_scenario, tmp_path):
    scenario = _private(small_scenario, epsilon=2.0)
    run_scenario(scenario, run_dir=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "provenance" / "log.jsonl").read_text().splitlines()]
    rounds = [r["body"] for r in records if r["kind"] == "round"]
    site = scenario.data.train_sites[0].name
    entries = [(d["noise-multiplier"], d["sample-rate"], int(d["steps"])) for d in (r["dp"][site] for r in rounds)]
    assert epsilon_for(entries, delta=rounds[-1]["dp"][site]["delta"]) == pytest.approx(rounds[-1]["dp"][site]["epsilon"])
    held_out = [s.name for s in scenario.data.sites if s.role == "heldout"][0]
    assert held_out not in rounds[0]["dp"]  # held-out hospitals never train


def test_a_spent_budget_stops_that_hospital_with_a_reason(small_scenario, tmp_path):
    # Noise is calibrated for epsilon 3 over 3 rounds; hospital-B allows only about one round.
    scenario = _private(small_scenario, epsilon=3.0, budgets={"hospital-B": 2.2})
    history = run_scenario(scenario, run_dir=tmp_path)
    b = [r["sites"]["hospital-B"] for r in history["rounds"]]
    assert "train-dp-epsilon" in b[0] and b[0]["train-dp-epsilon"] <= 2.2
    stopped = next(i for i, m in enumerate(b) if "training-stopped" in m)
    assert "privacy budget spent" in b[stopped]["training-stopped"]
    assert all("train-dp-epsilon" not in m for m in b[stopped:])  # never asked again
    assert all("train-dp-epsilon" in r["sites"]["hospital-A"] for r in history["rounds"])
    log = (tmp_path / "provenance" / "log.jsonl").read_text()
    assert "stopped: privacy budget spent" in log


def test_the_ledger_refuses_before_training_past_the_budget(small_scenario):
    site = build_site(small_scenario, 0)
    objective = build_objective("erm", {}, server_round=1)
    settings = DPSettings(noise_multiplier=0.5, max_grad_norm=1.0, delta=1e-5, budget=1.0)
    ledger = PrivacyLedger([(0.5, 0.2, 50)])
    model = new_model(seed=0)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(PrivacyBudgetSpent, match="budget 1"):
        train_privately(model, site.train, objective, settings, ledger, epochs=1, batch_size=32,
                        learning_rate=1e-3, weight_decay=0.0, seed=0)
    assert all((a == b).all() for a, b in zip(before, model.parameters()))
    assert len(ledger.entries) == 1


def test_noise_grows_as_the_target_epsilon_shrinks():
    noise = [calibrated_noise_multiplier(target_epsilon=e, delta=1e-5, sample_rate=0.1, total_steps=200) for e in (1, 3, 8)]
    assert noise[0] > noise[1] > noise[2] > 0


def test_privacy_refuses_objectives_without_per_example_losses(small_scenario):
    raw = small_scenario.model_dump(mode="json")
    raw["training"] |= {"objective": "irm", "privacy": {"target_epsilon": 3.0}}
    with pytest.raises(ScenarioError, match="per-example"):
        parse_scenario(raw)
