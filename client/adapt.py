"""Source-free onboarding of a new, unlabeled hospital (SHOT-like, with a prevalence estimate).

The hospital has the global model and its own images, and no labels. The classifier head
stays frozen: it encodes what the federation learned. Only the feature extractor adapts,
by information maximisation:

- confident predictions: low conditional entropy;
- the right class balance: the mean prediction is pulled towards an estimate of the
  hospital's own prevalence, obtained by EM on the model's posteriors (Saerens et al.
  2002). SHOT's diversity term would force 50/50, which is wrong for most hospitals;
- self-training: pseudo-labels from the nearest class prototype in feature space.

`onboard` first asks whether there is a shift at all: if the hospital's features sit
within a small standardised effect of the federation's (``common.feature_shift``), the
model is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from client.task import feature_moments, predict_logits
from common.calibration import IDENTITY_CALIBRATION, estimated_prevalence, hospital_posteriors
from common.feature_shift import SMALL_EFFECT, FeatureMoments, standardised_shift

@dataclass(frozen=True)
class PrevalenceEstimate:
    """The new hospital's prevalence from its unlabeled images, and how it was had."""

    value: float
    method: str  # "MLLS on calibrated posteriors", or "federation's prevalence"
    fallback: str | None = None  # why the federation's prevalence was used instead, if it was


def estimate_prevalence(
    model: nn.Module, images: np.ndarray, *, calibration: tuple[float, float] | None, federation_prevalence: float,
) -> PrevalenceEstimate:
    """MLLS (EM, Saerens et al. 2002) on the model's posteriors, calibrated as the federation
    calibrated them on its training hospitals' validation cases (``calibration.json``);
    without a calibration, or when the estimate runs to a bound, the federation's
    prevalence, with the reason."""
    if calibration is None:
        return PrevalenceEstimate(federation_prevalence, "federation's prevalence",
                                  "no calibration of the model was found (calibration.json beside it)")
    logits = predict_logits(model, images)
    posteriors = hospital_posteriors(logits, calibration=calibration, prevalence=federation_prevalence,
                                     federation_prevalence=federation_prevalence)
    value, fallback = estimated_prevalence(posteriors, federation_prevalence=federation_prevalence)
    if fallback is not None:
        return PrevalenceEstimate(value, "federation's prevalence", fallback)
    return PrevalenceEstimate(value, "MLLS on calibrated posteriors")


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def prototype_pseudo_labels(features: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    """SHOT's pseudo-labels: class centroids weighted by the predictions, nearest by cosine."""
    weights = torch.stack([1 - probabilities, probabilities], dim=1)  # (n, 2)
    normalised = F.normalize(features, dim=1)
    centroids = F.normalize(weights.T @ normalised / weights.sum(dim=0, keepdim=True).T.clamp_min(1e-6), dim=1)
    return (normalised @ centroids.T).argmax(dim=1).float()


@dataclass(frozen=True)
class AdaptationResult:
    prevalence: PrevalenceEstimate
    epochs: int
    mean_entropy_before: float
    mean_entropy_after: float
    shift: float | None = None  # standardised feature shift from the federation, if it was checked
    adapted: bool = True


@torch.no_grad()
def _probabilities(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.sigmoid(model(images))


def adapt_features(
    model: nn.Module,
    images: np.ndarray,
    *,
    source_prevalence: float = 0.5,
    calibration: tuple[float, float] | None = IDENTITY_CALIBRATION,
    epochs: int = 10,
    batch_size: int = 128,
    learning_rate: float = 1e-4,
    pseudo_label_weight: float = 0.3,
    balance_weight: float = 1.0,
    seed: int = 0,
) -> AdaptationResult:
    """Adapt ``model.features`` in place to unlabeled ``images``; the head stays frozen."""
    inputs = torch.as_tensor(images, dtype=torch.float32)
    before = _probabilities(model, inputs)
    prevalence = estimate_prevalence(model, images, calibration=calibration, federation_prevalence=source_prevalence)
    target_balance = torch.tensor(prevalence.value)
    for parameter in model.head.parameters():
        parameter.requires_grad_(False)
    optimizer = torch.optim.Adam(model.features.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        with torch.no_grad():  # pseudo-labels refreshed once per epoch, as in SHOT
            model.eval()
            pseudo = prototype_pseudo_labels(model.features(inputs), torch.sigmoid(model(inputs)))
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            logits = model(inputs[batch])
            p = torch.sigmoid(logits)
            mean = p.mean().clamp(1e-6, 1 - 1e-6)
            balance = target_balance * (target_balance / mean).log() + (1 - target_balance) * (
                (1 - target_balance) / (1 - mean)
            ).log()
            loss = binary_entropy(p).mean() + balance_weight * balance
            loss = loss + pseudo_label_weight * F.binary_cross_entropy_with_logits(logits, pseudo[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for parameter in model.head.parameters():
        parameter.requires_grad_(True)
    after = _probabilities(model, inputs)
    return AdaptationResult(prevalence, epochs, float(binary_entropy(before).mean()), float(binary_entropy(after).mean()))


def onboard(
    model: nn.Module,
    images: np.ndarray,
    *,
    reference: FeatureMoments | None,
    min_shift: float = SMALL_EFFECT,
    **adapt_options,
) -> AdaptationResult:
    """`adapt_features`, unless the model sees ``images`` as it saw the federation's.

    ``reference`` holds the federation's feature moments under this model; without one
    there is nothing to compare against, and the model is adapted.
    """
    if reference is None:
        return adapt_features(model, images, **adapt_options)
    shift = standardised_shift(feature_moments(model, images), reference)
    if shift < min_shift:
        entropy = float(binary_entropy(_probabilities(model, torch.as_tensor(images, dtype=torch.float32))).mean())
        prevalence = estimate_prevalence(model, images, calibration=adapt_options.get("calibration", IDENTITY_CALIBRATION),
                                         federation_prevalence=adapt_options.get("source_prevalence", 0.5))
        return AdaptationResult(prevalence, 0, entropy, entropy, shift=shift, adapted=False)
    result = adapt_features(model, images, **adapt_options)
    return replace(result, shift=shift)
