"""Real MedMNIST images split into hospitals with injected confounders."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import ScenarioError
from simulations.scenario import load_scenario
from simulations.datasets import build_site, load_medmnist_binary


def _pneumonia(shared_data, **site_changes):
    scenario = load_scenario("pneumonia")
    raw = scenario.model_dump(mode="json")
    raw["data"]["medmnist_file"] = str(shared_data / "medmnist" / "pneumoniamnist.npz")
    for site in raw["data"]["sites"]:
        site.update(site_changes)
    return scenario.model_validate(raw)


def test_loader_reads_the_official_file(shared_data):
    images, labels = load_medmnist_binary(shared_data / "medmnist" / "pneumoniamnist.npz")
    assert images.shape == (4708 + 524 + 624, 28, 28)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert int((labels == 0).sum()) == 1214 + 135 + 234


def test_multiclass_and_rgb_files_are_refused(shared_data):
    with pytest.raises(ScenarioError, match="28x28 grayscale|not binary"):
        load_medmnist_binary(shared_data / "medmnist" / "retinamnist.npz")


def test_hospitals_are_disjoint_with_their_prevalence_and_confounders(shared_data):
    scenario = _pneumonia(shared_data)
    sites = [build_site(scenario, i) for i in range(len(scenario.data.sites))]
    for config, site in zip(scenario.data.sites, sites):
        labels = np.concatenate([site.train.labels, site.val.labels, site.test.labels])
        assert len(labels) == config.n_samples
        assert abs(labels.mean() - config.prevalence) < 0.01
        tags = np.concatenate([site.train.confounders["tag"], site.val.confounders["tag"], site.test.confounders["tag"]])
        assert abs(float(np.mean(tags == labels)) - config.correlation) < 0.06
    # No patient is in two hospitals: compare raw image bytes before acquisition noise via
    # the deterministic assignment (same seed -> same draw; different sites -> disjoint).
    from simulations.datasets import _assign_patients

    _, all_labels = load_medmnist_binary(scenario.data.medmnist_file)
    assignments = _assign_patients(all_labels, scenario.data, seed=scenario.seed)
    flat = np.concatenate(assignments)
    assert len(flat) == len(set(flat.tolist()))


def test_asking_for_more_patients_than_exist_is_explained(shared_data):
    scenario = _pneumonia(shared_data, n_samples=3000)
    with pytest.raises(ScenarioError, match="lower n_samples"):
        build_site(scenario, 0)


def test_missing_file_is_explained():
    scenario = load_scenario("pneumonia")
    raw = scenario.model_dump(mode="json")
    raw["data"]["medmnist_file"] = "/nonexistent/pneumoniamnist.npz"
    with pytest.raises(ScenarioError, match="MedMNIST file not found"):
        build_site(scenario.model_validate(raw), 0)
