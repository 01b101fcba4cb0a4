"""`causalfed explain`: Shapley attribution of a performance change to shifted mechanisms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.explain import (
    MECHANISMS,
    explain_drop,
    fit_federated_logistic,
    logistic_loss_and_grad,
    shapley_values,
)
from tests.conftest import load_benchmark


def _benchmark():
    return load_benchmark("explain_benchmark")


def test_shapley_values_are_efficient_and_fair():
    # An additive game plus an interaction shared by two players.
    base = {"prevalence": 1.0, "acquisition": 2.0, "annotation": 0.5}
    values = {}
    for mask in range(8):
        coalition = frozenset(m for i, m in enumerate(MECHANISMS) if mask >> i & 1)
        bonus = 0.6 if {"acquisition", "annotation"} <= coalition else 0.0
        values[coalition] = sum(base[m] for m in coalition) + bonus
    shares = shapley_values(values)
    assert shares == pytest.approx({"prevalence": 1.0, "acquisition": 2.3, "annotation": 0.8})
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


@pytest.fixture(scope="module")
def controlled():
    bench = _benchmark()
    scenario = bench.world(0).with_overrides(federation={"num_rounds": 10})
    model = bench.trained_model(scenario)
    from simulations.datasets import build_site

    sources = [(s.train.images, s.train.labels) for s in (build_site(scenario, i) for i in range(3))]
    return bench, scenario, model, sources


@pytest.mark.parametrize("truth, case", [("prevalence", 0), ("acquisition", 0), ("acquisition", 3), ("annotation", 3)])
def test_the_shifted_mechanism_gets_the_largest_share(controlled, truth, case):
    bench, scenario, model, sources = controlled
    target = bench.shifted_site(scenario, bench.SHIFTS[truth][case], draw=0)
    result = explain_drop(model, sources, (target.train.images, target.train.labels), metrics=("log-loss",))[0]
    assert result.dominant == truth, result.shares
    # Efficiency: the shares add up to the change the reweighting explains.
    assert sum(result.shares.values()) == pytest.approx(result.reweighted_loss - result.source_loss, abs=1e-9)


def test_cli_explains_a_run_and_refuses_unknown_hospitals(small_scenario, tmp_path):
    from typer.testing import CliRunner

    from cli.main import cli
    from simulations.runner import run_scenario

    run_scenario(small_scenario, run_dir=tmp_path)
    result = CliRunner().invoke(cli, ["explain", str(tmp_path), "--site", "hospital-X"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "explain-hospital-X.json").read_text())
    assert {r["metric"] for r in saved} == {"log-loss", "error"}
    assert set(saved[0]["shares"]) == set(MECHANISMS)
    unknown = CliRunner().invoke(cli, ["explain", str(tmp_path), "--site", "hospital-Q"])
    assert unknown.exit_code == 2 and "hospital-X" in unknown.output
