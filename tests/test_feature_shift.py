"""The federation's feature moments and the shift check before `causalfed adapt`."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from client.adapt import onboard
from client.task import feature_moments, new_model
from common.feature_shift import FEATURE_MOMENTS_FILE, FeatureMoments, pool_moments, standardised_shift


def _moments(values: np.ndarray) -> FeatureMoments:
    return FeatureMoments(len(values), values.mean(axis=0), values.var(axis=0))


def test_pooled_moments_are_the_moments_of_all_images():
    rng = np.random.default_rng(0)
    parts = [rng.normal(loc=shift, scale=1 + shift, size=(n, 5)) for shift, n in [(0.0, 40), (2.0, 100), (-1.0, 7)]]
    pooled = pool_moments([_moments(p) for p in parts])
    everything = np.concatenate(parts)
    assert pooled.count == len(everything)
    np.testing.assert_allclose(pooled.mean, everything.mean(axis=0))
    np.testing.assert_allclose(pooled.variance, everything.var(axis=0))


def test_the_shift_is_the_mean_standardised_difference_and_ignores_dead_features():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(20_000, 4))
    shifted = reference + np.array([1.0, 0.0, 0.0, 0.0])  # one feature moves by one SD
    assert standardised_shift(_moments(reference), _moments(reference)) == 0.0
    assert standardised_shift(_moments(shifted), _moments(reference)) == pytest.approx(0.25, abs=0.01)
    dead = np.concatenate([reference, np.zeros((len(reference), 4))], axis=1)
    dead_shifted = np.concatenate([shifted, np.zeros((len(shifted), 4))], axis=1)
    assert standardised_shift(_moments(dead_shifted), _moments(dead)) == pytest.approx(0.25, abs=0.01)
    with pytest.raises(ValueError, match="features"):
        standardised_shift(_moments(reference[:, :3]), _moments(reference))


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"count": 0, "mean": [0.0], "variance": [1.0]}, "at least one"),
        ({"count": 5, "mean": [float("nan")], "variance": [1.0]}, "finite"),
        ({"count": 5, "mean": [0.0], "variance": [-1.0]}, "non-negative"),
        ({"count": 5, "mean": [0.0, 1.0], "variance": [1.0]}, "equal-length"),
        ({"count": 5, "mean": [0.0]}, "not a feature-moments record"),
    ],
)
def test_bad_feature_moments_are_refused_with_the_reason(record, problem):
    with pytest.raises(ValueError, match=problem):
        FeatureMoments.from_record(record)


def test_moments_survive_a_round_trip_through_their_file(tmp_path):
    moments = FeatureMoments(3, np.array([0.5, -1.0]), np.array([2.0, 0.0]))
    moments.save(tmp_path / FEATURE_MOMENTS_FILE, sites={"a": 0.1})
    loaded = FeatureMoments.load(tmp_path / FEATURE_MOMENTS_FILE)
    assert loaded.count == 3 and loaded.mean.tolist() == [0.5, -1.0] and loaded.variance.tolist() == [2.0, 0.0]
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        FeatureMoments.load(tmp_path / "broken.json")


def test_onboarding_leaves_a_model_alone_where_the_images_look_like_the_federations(small_scenario):
    from simulations.datasets import build_site

    images = build_site(small_scenario, 0).train.images
    model = new_model(seed=0)
    before = [p.clone() for p in model.parameters()]
    result = onboard(model, images, reference=feature_moments(model, images), epochs=1)
    assert not result.adapted and result.shift == 0.0 and result.epochs == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # Far from the reference (every image brightened): the features move, so it adapts.
    result = onboard(model, np.clip(images * 0.3 + 0.7, 0, 1), reference=feature_moments(model, images), epochs=1)
    assert result.adapted and result.shift >= 0.2 and result.epochs == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_federation_writes_its_training_hospitals_pooled_feature_moments(small_scenario, tmp_path):
    from simulations.datasets import build_site
    from simulations.runner import run_scenario

    run_scenario(small_scenario, run_dir=tmp_path)
    saved = json.loads((tmp_path / FEATURE_MOMENTS_FILE).read_text())
    from client.models import model_for_state

    model = model_for_state(torch.load(tmp_path / "model.pt"))
    sites = [build_site(small_scenario, i) for i in range(len(small_scenario.data.sites))]
    training = [site for site in sites if site.role == "train"]
    expected = pool_moments([feature_moments(model, site.train.images) for site in training])
    assert sorted(saved["sites"]) == sorted(site.name for site in training)  # held-out hospitals do not report
    assert saved["count"] == expected.count
    np.testing.assert_allclose(saved["mean"], expected.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(saved["variance"], expected.variance, rtol=1e-5, atol=1e-6)
    # The signed log keeps the file's hash: a doctored reference can be told from the one written.
    records = [json.loads(line) for line in (tmp_path / "provenance" / "log.jsonl").read_text().splitlines()]
    (end,) = [r["body"] for r in records if r["kind"] == "run-end"]
    assert end["feature_moments_sha256"] == hashlib.sha256((tmp_path / FEATURE_MOMENTS_FILE).read_bytes()).hexdigest()
