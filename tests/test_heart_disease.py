"""The 4 real UCI heart-disease hospitals: FLamby's convention, explicit missingness, a federation."""

from __future__ import annotations

import numpy as np
import pytest

from client.priors import prior_shift_offset
from common.config import ScenarioError
from simulations.scenario import load_scenario, parse_scenario
from simulations.datasets import build_site
from simulations.heart_disease import feature_names, read_hospital
from simulations.runner import run_scenario

FLAMBY_TRAIN_TEST = {"cleveland": (199, 104), "hungary": (172, 89), "switzerland": (30, 16), "va": (85, 45)}


@pytest.fixture
def heart(shared_data):
    scenario = load_scenario("heart_disease")
    return scenario.with_overrides(data={"heart_disease_dir": str(shared_data / "heart_disease")})


def test_flamby_convention_gives_flamby_counts(heart):
    for index, site in enumerate(heart.data.sites):
        data = build_site(heart, index)
        assert (len(data.train) + len(data.val), len(data.test)) == FLAMBY_TRAIN_TEST[site.name]
        assert data.train.images.shape[1] == len(feature_names("flamby")) == 13
        assert np.isfinite(data.train.images).all() and np.isfinite(data.test.images).all()


def test_indicator_mode_keeps_every_patient_and_marks_what_was_missing(heart, shared_data):
    scenario = heart.with_overrides(data={"missing": "indicators"})
    switzerland = build_site(scenario, 2)
    raw, _ = read_hospital(shared_data / "heart_disease", "switzerland")
    assert len(switzerland.train) + len(switzerland.val) + len(switzerland.test) == len(raw) == 123
    chol_missing = feature_names("indicators").index("chol missing")
    # Switzerland records chol = 0 for everyone: a placeholder, so all flagged missing.
    column = np.concatenate([switzerland.train.images[:, chol_missing], switzerland.test.images[:, chol_missing]])
    assert len(np.unique(column)) == 1 and column[0] > 0  # standardised "1"


def test_standardisation_uses_the_federation_moments(heart):
    rows = np.concatenate([build_site(heart, i).train.images for i in range(4)]
                          + [build_site(heart, i).val.images for i in range(4)])
    np.testing.assert_allclose(rows.mean(axis=0), 0.0, atol=1e-5)


def test_unknown_hospital_is_refused():
    with pytest.raises(ScenarioError, match="real hospitals"):
        parse_scenario({"data": {"source": "heart_disease", "sites": [{"name": "cleveland"}, {"name": "mayo"}]}})


def test_prior_shift_offset_is_bayes_rule():
    # A hospital at 90% prevalence against a 50% federation: prior odds 9 -> log 9.
    assert prior_shift_offset(local_positive=899, local_total=998, reference_prevalence=0.5) == pytest.approx(np.log(9), rel=1e-3)
    assert prior_shift_offset(local_positive=30, local_total=30, reference_prevalence=0.5) < np.inf


def test_federation_of_real_hospitals_learns_and_adjusts_priors(heart):
    scenario = heart.with_overrides(federation={"num_rounds": 5})
    adjusted = run_scenario(scenario)["rounds"][-1]["sites"]
    plain = run_scenario(scenario.with_overrides(training={"prior_adjustment": False}))["rounds"][-1]["sites"]
    # (Switzerland's test set may hold one class only: no AUROC there.)
    assert np.mean([m["test-auroc"] for m in plain.values() if m["test-auroc"] is not None]) > 0.75
    # Switzerland (94% positives) gains most from correcting for its own prevalence.
    assert adjusted["switzerland"]["test-accuracy"] > plain["switzerland"]["test-accuracy"]
