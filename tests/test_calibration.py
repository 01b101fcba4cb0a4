"""Calibrated decisions (common/calibration.py, client.task.predict_logits) on small synthetic inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.models import NUM_STRATA, new_model
from client.task import predict_logits
from common.calibration import (
    CALIBRATIONS,
    Decisions,
    hospital_posteriors,
    log_loss_per_calibration,
    logit,
    mlls_prevalence,
    sigmoid,
)


def _cases(true_scale: float, *, n: int = 4000, prevalence: float = 0.5, seed: int = 0):
    """Logits whose calibrated posterior is sigmoid(true_scale * logit) (two logits of
    spread once calibrated), labels drawn from it."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(0.0, 2.0, n) + logit(prevalence)) / true_scale
    labels = (rng.random(n) < sigmoid(true_scale * logits)).astype(np.int64)
    return logits, labels


def test_a_strata_adjusted_model_decides_on_the_image_not_its_hospitals_strata():
    model = new_model(seed=0, architecture="strata-adjusted").eval()
    images = np.random.default_rng(0).random((6, 1, 28, 28)).astype(np.float32)
    before = predict_logits(model, images)
    # A tag that tracks the label at this hospital: mixed in, it would swamp the image.
    model.stratum_logit.copy_(torch.linspace(-5.0, 5.0, NUM_STRATA))
    assert np.allclose(predict_logits(model, images), before)
    with torch.no_grad():
        assert not np.allclose(model(torch.as_tensor(images)).double().numpy(), before)


@pytest.mark.parametrize("true_scale", [0.3, 4.0, 60.0])
def test_the_chosen_scale_is_the_true_one_and_not_a_bound_of_the_grid(true_scale):
    logits, labels = _cases(true_scale)
    scale, bias = CALIBRATIONS[int(np.argmin(log_loss_per_calibration(logits, labels)))]
    scales = sorted({a for a, _ in CALIBRATIONS})
    assert scales[0] < scale < scales[-1]
    assert abs(np.log(scale / true_scale)) < 0.5
    assert abs(bias) <= 0.5


def test_the_prior_shift_is_bayes_rule():
    logits = np.array([-1.0, 0.0, 2.0])
    shifted = hospital_posteriors(logits, calibration=(1.0, 0.0), prevalence=0.9, federation_prevalence=0.5)
    odds = np.exp(logits) * 0.9 / 0.1
    assert np.allclose(shifted, odds / (1 + odds))


def test_mlls_recovers_a_shifted_prevalence_from_calibrated_posteriors():
    rng = np.random.default_rng(0)
    labels = rng.random(20_000) < 0.2  # the new hospital: 20% positives
    # Posteriors calibrated at 50%: logit = evidence, evidence ~ N(+-1.5, 1) by class.
    evidence = np.where(labels, 1.5, -1.5) + rng.normal(size=labels.size)
    posteriors = 1 / (1 + np.exp(-2 * 1.5 * evidence))
    assert mlls_prevalence(posteriors, source_prevalence=0.5) == pytest.approx(0.2, abs=0.02)


def test_decisions_at_the_calibrated_threshold():
    decisions = Decisions.of(np.array([0.9, 0.2, 0.6, 0.4]), np.array([1, 0, 0, 0]))
    assert decisions.accuracy == pytest.approx(0.75)
    assert decisions.balanced_accuracy == pytest.approx((2 / 3 + 1) / 2)
