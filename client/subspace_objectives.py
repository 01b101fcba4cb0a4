"""Removing the shortcut without metadata: the hospitals are environments whose shortcut
strengths differ (after ISR-Mean, Wang et al., ICML 2022).

A shortcut's link to the label differs from hospital to hospital, so the difference
between a hospital's class-conditional feature means moves from one hospital to the next
along the shortcut's features; a cause's link does not. After a warm-up of plain training
that learns the features, each hospital reports its class-conditional feature means (never
a case); the server finds the directions along which the hospitals' class differences vary
most, and every hospital then trains only the head, on the features projected off those
directions (the features are frozen: last-layer retraining, as in DFR). No metadata is
needed: what a hospital records per case is used where it exists (``strata-subspace``,
backdoor adjustment over the recorded strata with the projection for whatever is left).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from client.adjusted_objectives import _StrataAdjusted
from client.objectives import ERM, Objective, ObjectiveParams, weighted_mean_statistics

CLASS_MEANS = "class-means"
BASIS = "spurious-basis"


class SubspaceParams(ObjectiveParams):
    warmup: float = Field(0.8, gt=0.0, lt=1.0, description="the share of the federation's rounds spent on plain "
                          "training, which learns the features, before the head is retrained off the shortcut")
    directions: int = Field(3, ge=0, description="directions of hospital-varying class separation removed (at most "
                            "one fewer than the training hospitals)")
    head_speedup: float = Field(10.0, ge=1.0, description="the head alone, on frozen features (a convex problem), "
                                "learns this many times faster than the whole model")


def class_means(features: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """[mean of class 0, mean of class 1, count of class 0, count of class 1] (NaN for a
    class the hospital lacks)."""
    rows = []
    for label in (0, 1):
        chosen = features[labels == label]
        rows.append(chosen.mean(dim=0).numpy() if len(chosen) else np.full(features.shape[1], np.nan))
    counts = [float((labels == 0).sum()), float((labels == 1).sum())]
    return np.concatenate([*rows, counts])


def varying_directions(per_hospital: list[np.ndarray]) -> np.ndarray:
    """The directions along which the hospitals' class differences vary, strongest first
    (rows of the SVD of the centred differences; at most one fewer than the hospitals).
    Hospitals lacking a class are left out."""
    differences = []
    for values in per_hospital:
        dim = (len(values) - 2) // 2
        mean0, mean1 = values[:dim], values[dim : 2 * dim]
        if np.all(np.isfinite(mean0)) and np.all(np.isfinite(mean1)):
            differences.append(mean1 - mean0)
    if len(differences) < 2:
        return np.zeros((0, (len(per_hospital[0]) - 2) // 2 if per_hospital else 0))
    centred = np.stack(differences) - np.mean(differences, axis=0)
    _, values, rows = np.linalg.svd(centred, full_matrices=False)
    return rows[: len(differences) - 1][values[: len(differences) - 1] > 1e-9]


class _Subspace(Objective):
    """Plain training, then the head alone on the features off the varying directions."""

    Params = SubspaceParams
    architecture = "projected"

    @property
    def feature_rounds(self) -> int:
        """Rounds of plain training before the features are frozen."""
        return max(1, round(self.params.warmup * (self.num_rounds or 20)))

    @property
    def warmup_rounds(self) -> int:
        return self.feature_rounds + 1  # the first round after it trains the head before any projection

    def frozen(self) -> bool:
        return self.server_round > self.feature_rounds

    def statistics(self, model, images, labels, strata=None):
        with torch.no_grad():
            return {CLASS_MEANS: class_means(model.features(images), labels)}

    @classmethod
    def combine(cls, parts):
        combined = weighted_mean_statistics([(n, {k: v for k, v in s.items() if k != CLASS_MEANS}) for n, s in parts])
        means = [s[CLASS_MEANS] for _, s in parts if CLASS_MEANS in s]
        if means:
            combined[BASIS] = varying_directions(means).reshape(-1)
        return combined

    def prepare(self, model, images, labels, strata):
        super().prepare(model, images, labels, strata)
        basis = self.federation.get(BASIS)
        if self.frozen() and basis is not None and len(basis):
            directions = torch.as_tensor(np.asarray(basis).reshape(-1, model.projection.shape[0]), dtype=torch.float32)
            model.remove_directions(directions[: self.params.directions])

    def trainable(self, model):
        if not self.frozen():
            return list(model.parameters())
        return [{"params": list(model.head.parameters()), "lr_scale": self.params.head_speedup}]


class Subspace(_Subspace, ERM):
    """Shortcut subspace removal without metadata (ISR-Mean across hospitals, then DFR)."""

    name = "subspace"


class StrataSubspace(_Subspace, _StrataAdjusted, ERM):
    """Backdoor adjustment over the strata a hospital records, and the shortcut subspace
    removed for whatever is not recorded; with nothing recorded it is ``subspace``."""

    name = "strata-subspace"
    architecture = "strata-projected"
    needs_strata = False  # it runs on whatever is recorded, nothing included
