"""`causalfed explain`: Shapley attribution of a performance change to shifted mechanisms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.explain import (
    MECHANISMS,
    OUTSIDE,
    coalition_values,
    estimate_mechanism_weights,
    fit_federated_logistic,
    headline_mechanism,
    leading_mechanism,
    logistic_loss_and_grad,
    metric_value,
    Party,
    shapley_values,
)


def test_shapley_values_are_efficient_and_fair():
    # An additive game plus an interaction shared by two players.
    base = {"prevalence": 1.0, "acquisition": 2.0, "association": 0.5}
    values = {}
    for mask in range(8):
        coalition = frozenset(m for i, m in enumerate(MECHANISMS) if mask >> i & 1)
        bonus = 0.6 if {"acquisition", "association"} <= coalition else 0.0
        values[coalition] = sum(base[m] for m in coalition) + bonus
    shares = shapley_values(values)
    assert shares == pytest.approx({"prevalence": 1.0, "acquisition": 2.3, "association": 0.8})
    assert sum(shares.values()) == pytest.approx(values[frozenset(MECHANISMS)] - values[frozenset()])


def test_federated_fit_equals_the_fit_on_pooled_cases():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 4))
    labels = (features @ np.array([1.0, -2.0, 0.5, 0.0]) + rng.normal(size=300) > 0).astype(float)
    ones = np.ones(300)
    pooled = fit_federated_logistic([lambda p: logistic_loss_and_grad(p, features, labels, ones)], dim=4)
    parts = [slice(0, 100), slice(100, 220), slice(220, 300)]
    split = fit_federated_logistic(
        [lambda p, s=s: logistic_loss_and_grad(p, features[s], labels[s], ones[s]) for s in parts], dim=4
    )
    np.testing.assert_allclose(split, pooled, atol=1e-4)


def _party(rng, n, *, prevalence=0.5, noise=0.0, offset=0.0):
    labels = (rng.random(n) < prevalence).astype(int)
    flipped = np.where(rng.random(n) < noise, 1 - labels, labels)
    features = rng.normal(0, 1, (n, 3)) + np.outer(labels, [1.5, 0, 0]) + offset
    return Party(features, flipped, 2.0 * features[:, 0] - 1.5, np.column_stack([features, features ** 2]))


@pytest.mark.parametrize(("shift", "expected"), [
    ({"noise": 0.3}, "association"), ({"offset": np.array([0.0, 3.0, 0.0])}, "acquisition"),
    ({"prevalence": 0.15}, "prevalence"),
])
def test_the_shares_add_up_to_the_change_and_the_shifted_mechanism_leads(shift, expected):
    rng = np.random.default_rng(1)
    sources = [_party(rng, 800) for _ in range(3)]
    target = _party(rng, 1500, **shift)
    weights = estimate_mechanism_weights(sources, target)
    metric = "error" if expected == "prevalence" else "log-loss"
    values = coalition_values(sources, target, weights, metric, shift=0.0 if expected != "prevalence" else -1.7)
    shares = shapley_values(values)
    observed = metric_value(metric, target.logits, target.labels, np.ones(len(target.labels)),
                            shift=0.0 if expected != "prevalence" else -1.7)
    assert sum(shares.values()) + values[frozenset()] == pytest.approx(observed)
    assert max(shares, key=lambda m: abs(shares[m])) == expected, shares


def test_overlapping_intervals_say_cannot_tell():
    draws = {"prevalence": np.array([0.10, 0.12, 0.11]), "acquisition": np.array([0.09, 0.13, 0.10]),
             "association": np.array([0.0, 0.001, -0.001])}
    assert leading_mechanism({"prevalence": 0.11, "acquisition": 0.105, "association": 0.0}, draws).startswith(
        "cannot tell (prevalence or acquisition)")
    draws["acquisition"] = np.array([0.01, 0.02, 0.015])
    assert leading_mechanism({"prevalence": 0.11, "acquisition": 0.015, "association": 0.0}, draws) == "prevalence"


def test_the_headline_is_the_first_measure_that_can_tell():
    unsure = "cannot tell (prevalence or association)"
    assert headline_mechanism({"error": unsure, "auroc": "acquisition", "log-loss": "prevalence"}) == (
        "acquisition", "auroc")
    assert headline_mechanism({"error": "prevalence", "auroc": unsure, "log-loss": unsure}) == ("prevalence", "error")
    assert headline_mechanism({"error": unsure, "auroc": unsure, "log-loss": unsure}) == (unsure, "log-loss")
    with pytest.raises(ValueError):
        headline_mechanism({})


def test_cli_explains_a_run_and_refuses_unknown_hospitals(small_scenario, tmp_path):
    from typer.testing import CliRunner

    from cli.main import cli
    from simulations.runner import run_scenario

    run_scenario(small_scenario, run_dir=tmp_path)
    result = CliRunner().invoke(cli, ["explain", str(tmp_path), "--site", "hospital-X"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "explain-hospital-X.json").read_text())
    assert {a["metric"] for a in saved["attributions"]} == {"auroc", "error", "log-loss"}
    assert set(saved["attributions"][0]["shares"]) == set(MECHANISMS)
    assert OUTSIDE in saved["attributions"][0]["intervals"] and "known" in saved["prevalence"]
    assert saved["read-from"] in {"auroc", "error", "log-loss"} and "leads:" in result.output


def test_what_lies_outside_source_support_shrinks_as_the_density_ratios_improve():
    from server.explain import outside_support

    rng = np.random.default_rng(2)
    sources = [_party(rng, 800) for _ in range(3)]
    target = _party(rng, 1500, offset=np.array([1.0, 0.0, 0.0]))  # covered, but reweighting must find it
    gaps = [abs(outside_support(sources, target, estimate_mechanism_weights(sources, target, domain_l2=l2), "log-loss",
                                shift=0.0)) for l2 in (1e4, 10.0, 0.1)]
    # A classifier flattened to uniform weights leaves the whole acquisition outside; fitted ones bring it in.
    assert gaps[0] > 3 * max(gaps[1:]), gaps
