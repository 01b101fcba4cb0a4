"""The structural causal model does what the scenario says."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import ScenarioError
from common.data import SPLITS
from simulations.scenario import load_scenario
from simulations.scm import TAG_PATTERN, make_site, simulate_cases


def _site(correlation: float, *, n: int = 6000, confounders=("tag", "denoising", "noise", "sex"), **extra):
    scenario = load_scenario()
    raw = scenario.model_dump(mode="json")
    raw["data"]["confounders"] = list(confounders)
    raw["data"].update(extra)
    site = dict(raw["data"]["sites"][0], correlation=correlation, n_samples=n)
    raw["data"]["sites"][0] = site
    scenario = scenario.model_validate(raw)
    return scenario.data.sites[0], scenario.data


def _within(observed: float, expected: float, n: int, sds: float = 4.0) -> bool:
    return abs(observed - expected) <= sds * np.sqrt(expected * (1 - expected) / n) + 1e-9


@pytest.mark.parametrize("correlation", [0.9, 0.7, 0.5, 0.1])
def test_confounder_agreement_matches_configured_correlation(correlation):
    site, data = _site(correlation)
    _, labels, states = simulate_cases(n=site.n_samples, site=site, config=data, rng=np.random.default_rng(1))
    for name in ("tag", "denoising", "noise", "sex"):
        agreement = float(np.mean(states[name] == labels))
        assert _within(agreement, correlation, site.n_samples), (name, agreement, correlation)


def test_label_noise_and_prevalence():
    site, data = _site(0.8, label_noise=0.2)
    _, labels, states = simulate_cases(n=site.n_samples, site=site, config=data, rng=np.random.default_rng(2))
    assert _within(float(np.mean(states["lesion"] != labels)), 0.2, site.n_samples)
    assert _within(float(np.mean(states["lesion"])), site.prevalence, site.n_samples)


def test_confounders_are_independent_of_the_lesion_given_the_label():
    """Confounders hang off the label, not off the lesion: the lesion stays the only cause."""
    site, data = _site(0.9)
    _, labels, states = simulate_cases(n=site.n_samples, site=site, config=data, rng=np.random.default_rng(3))
    for label in (0, 1):
        mask = labels == label
        correlation = np.corrcoef(states["tag"][mask], states["lesion"][mask])[0, 1]
        assert abs(correlation) < 0.08


def test_the_mechanisms_leave_their_marks():
    site, data = _site(0.5, n=2000)
    images, _, states = simulate_cases(n=site.n_samples, site=site, config=data, rng=np.random.default_rng(4))
    assert images.shape == (2000, 28, 28) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    corner = images[:, 1:6, 1:5]
    stamped = np.all(corner[:, TAG_PATTERN == 1] >= 0.999, axis=1)
    np.testing.assert_array_equal(stamped, states["tag"] == 1)
    # High-frequency energy: denoising lowers it, the noise confounder raises it.
    roughness = np.abs(np.diff(images, axis=2)).mean(axis=(1, 2))
    assert roughness[states["denoising"] == 1].mean() < roughness[states["denoising"] == 0].mean()
    clean = states["denoising"] == 0
    assert roughness[clean & (states["noise"] == 1)].mean() > roughness[clean & (states["noise"] == 0)].mean()
    # The lesion brightens the lungs.
    lungs = images[:, 6:20, 4:24].mean(axis=(1, 2))
    assert lungs[states["lesion"] == 1].mean() > lungs[states["lesion"] == 0].mean()


def test_sites_are_deterministic_and_split_without_overlap():
    data = load_scenario().data
    first, again = make_site(data, 0, seed=7), make_site(data, 0, seed=7)
    np.testing.assert_array_equal(first.train.images, again.train.images)
    other = make_site(data, 0, seed=8)
    assert not np.array_equal(first.train.images, other.train.images)
    sizes = [len(first.train), len(first.val), len(first.test)]
    assert sum(sizes) == data.sites[0].n_samples and min(sizes) > 0


def test_default_heldout_site_reverses_the_shortcut():
    scenario = load_scenario()
    for index, site in enumerate(scenario.data.sites):
        data = make_site(scenario.data, index, seed=0)
        labels = np.concatenate([data.train.labels, data.val.labels, data.test.labels])
        tags = np.concatenate([data.train.confounders["tag"], data.val.confounders["tag"], data.test.confounders["tag"]])
        assert _within(float(np.mean(tags == labels)), site.correlation, len(labels))


def test_each_hospital_sets_its_own_confounder_strengths_and_what_it_records():
    from simulations.scenario import parse_scenario

    raw = load_scenario("confounded").model_dump(mode="json")
    raw["data"]["sites"][0] |= {"correlation": 0.9, "correlations": {"noise": 0.5}, "recorded": ["tag"]}
    scenario = parse_scenario(raw)
    site = make_site(scenario.data, 0, seed=3)
    states = {name: np.concatenate([site.split(s).confounders[name] for s in SPLITS]) for name in ("tag", "noise")}
    labels = np.concatenate([site.split(s).labels for s in SPLITS])
    assert np.mean(states["tag"] == labels) == pytest.approx(0.9, abs=0.04)
    assert np.mean(states["noise"] == labels) == pytest.approx(0.5, abs=0.05)
    assert set(site.train.recorded) == {"tag"}  # denoising and noise exist, unrecorded
    raw["data"]["sites"][0]["recorded"] = ["sex"]
    with pytest.raises(ScenarioError, match="does not activate"):
        parse_scenario(raw)


@pytest.mark.parametrize("objective", ["backdoor-strata", "strata-subspace", "subspace", "backdoor-strata-vrex"])
def test_a_world_without_confounders_runs_the_strata_objectives(objective, small_scenario):
    from simulations.runner import run_scenario

    raw = small_scenario.model_dump(mode="json")
    raw["data"]["confounders"] = []
    raw["training"] |= {"objective": objective, "objective_params": {}}
    raw["federation"]["num_rounds"] = 1
    history = run_scenario(type(small_scenario).model_validate(raw))
    assert history["rounds"][-1]["sites"]["hospital-X"]["test-auroc"] >= 0.0
