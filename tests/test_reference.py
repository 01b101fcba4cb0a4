"""The server's reference trainings (server/reference.py) and the detector judging against them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.data import Split
from server.detectors import DETECTORS
from server.guard import CausalGuard
from server.guard_evidence import Measurements
from server.guard_round import ValidationProbe
from server.reference import (
    References,
    prevalence_sample,
    reference_alignments,
    train_references,
)
from server.guard_stats import without_direction


def _world(rng: np.random.Generator, n: int, *, prevalence: float) -> Split:
    labels = (rng.random(n) < prevalence).astype(np.int64)
    images = rng.normal(size=(n, 6)).astype(np.float32)
    images[:, 0] += 1.5 * labels  # the first feature is the lesion; the others are noise
    return Split(images=images, labels=labels)


class _Rectified(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = torch.nn.Linear(6, 16)
        self.out = torch.nn.Linear(16, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(images))).squeeze(-1)


def _adam_recipe(model: torch.nn.Module, split: Split, seed: int, server_round: int) -> None:
    """A hospital's round: a fresh Adam, mini-batches of 32, one pass."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    order = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(seed))
    images, labels = torch.as_tensor(split.images), torch.as_tensor(split.labels).float()
    model.train()
    for start in range(0, len(order), 32):
        batch = order[start : start + 32]
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(model(images[batch]), labels[batch]).backward()
        optimizer.step()


def _flat(model: torch.nn.Module) -> tuple[np.ndarray, list[str], list[tuple[int, ...]]]:
    state = model.state_dict()
    return (np.concatenate([v.numpy().astype(np.float64).ravel() for v in state.values()]),
            list(state), [tuple(v.shape) for v in state.values()])


def test_a_prevalence_sample_has_the_share_of_positives_asked_for():
    split = _world(np.random.default_rng(0), 300, prevalence=0.3)
    sample = prevalence_sample(split, prevalence=0.75, size=400, rng=np.random.default_rng(1))
    assert len(sample.labels) == 400 and int(sample.labels.sum()) == 300
    assert set(map(tuple, sample.images.round(5))) <= set(map(tuple, split.images.round(5)))
    split.labels[:] = 0
    with pytest.raises(ValueError, match="positive and negative"):
        prevalence_sample(split, prevalence=0.5, size=10, rng=np.random.default_rng(1))


def test_a_flipped_update_points_against_the_reference_whatever_its_prevalence():
    """Hospitals with 20% and 80% positives, honest and sign-flipped. The server's references,
    trained with the same recipe on its own cases, take the prevalence direction out: the
    honest updates then point with the balanced reference, the flipped ones against it."""
    rng = np.random.default_rng(2)
    probe = ValidationProbe(_world(rng, 1000, prevalence=0.4), _Rectified, recipe=_adam_recipe)
    start, names, shapes = _flat(_Rectified())
    honest = np.stack([probe.trained(start, names, shapes, _world(rng, 200, prevalence=p), seed=s, server_round=1)
                       - start for s, p in enumerate([0.2, 0.8, 0.2, 0.8])])
    deltas = np.concatenate([honest, -honest])

    def train(flat: np.ndarray, split: Split, seed: int) -> np.ndarray:
        return probe.trained(flat, names, shapes, split, seed=seed, server_round=1)

    references = train_references(start, probe.split, train, cases=200, balanced=8, extremes=2, seed=0)
    cosines, errors = reference_alignments(deltas, references)
    assert cosines[:4].min() > 0.1 and cosines[4:].max() < -0.1
    assert np.all(errors > 0) and np.all(errors < np.abs(cosines))
    again = train_references(start, probe.split, train, cases=200, balanced=8, extremes=2, seed=0)
    assert np.array_equal(again.balanced, references.balanced)  # drawn from the round's model: a resume repeats it


def test_the_jackknife_error_grows_as_the_references_disagree():
    rng = np.random.default_rng(3)
    prevalence = np.eye(50)[0]
    learning = np.eye(50)[1]
    deltas = np.stack([3 * prevalence + learning + 0.05 * rng.normal(size=50), -3 * prevalence - learning])
    errors = []
    for spread in (0.0, 0.05, 0.5):
        balanced = without_direction(learning + spread * rng.normal(size=(8, 50)), prevalence)
        cosines, error = reference_alignments(deltas, References(prevalence, balanced))
        if spread < 0.5:  # the prevalence part (3x the learning) is out
            assert cosines[0] > 0.5 and cosines[1] < -0.5
        errors.append(error)
    assert np.allclose(errors[0], 0.0) and np.all(errors[1] < errors[2])
    with pytest.raises(ValueError, match="two references"):
        reference_alignments(deltas, References(prevalence, balanced[:1]))


def test_an_update_against_the_reference_is_harm_and_no_reference_is_no_evidence():
    clients = [f"h{i}" for i in range(8)]
    cosines = np.array([0.2, 0.3, 0.25, 0.15, 0.35, 0.1, 0.22, -0.3])
    measured = Measurements(reference_alignments=cosines, reference_errors=np.full(8, 0.03))
    verdicts, _ = CausalGuard(detectors=("reference-direction",)).judge(clients, np.ones((8, 16)), measured)
    assert [v.client for v in verdicts if v.flagged] == ["h7"]
    assert "reference training" in " ".join(verdicts[7].reasons)
    verdicts, _ = CausalGuard(detectors=("reference-direction",)).judge(clients, np.ones((8, 16)), Measurements())
    assert all(v.p_values["reference-direction"] == 1.0 for v in verdicts)
    assert DETECTORS["reference-direction"].family == DETECTORS["validation-direction"].family


def test_leaving_out_a_client_that_points_with_the_ranking_is_calibration_not_harm():
    """A validation log-loss that improves without a client is excused when its update points
    with both the validation ranking and the reference (its prevalence pulls the bias), and
    not when either direction is missing or against it."""
    clients = [f"h{i}" for i in range(8)]
    effects = np.array([1e-4, -2e-4, 3e-4, 0.0, 1e-4, -1e-4, 2e-4, -0.02])  # h7: the aggregate is better without it
    detectors = ("intervention", "validation-direction", "reference-direction")

    def verdict(ranking: float, reference: float):
        cosines = np.full(8, 0.2)
        measured = Measurements(loo_effects=effects,
                                ranking_alignments=np.r_[cosines[:7], ranking], ranking_errors=np.full(8, 0.03),
                                reference_alignments=np.r_[cosines[:7], reference], reference_errors=np.full(8, 0.03))
        return CausalGuard(detectors=detectors).judge(clients, np.ones((8, 16)), measured)[0][7]

    with_both = verdict(0.2, 0.2)
    assert not with_both.flagged and with_both.p_values["intervention"] == 1.0
    assert any(reason.startswith("excused intervention") for reason in with_both.reasons)
    assert verdict(0.2, 0.0).flagged  # no reference direction: the loss is all there is
    assert verdict(0.2, -0.1).flagged  # against the reference
