"""Objectives that need a cross-hospital statistic, broadcast by the server each round.

Each hospital is one environment. An environment penalty compares the hospital with the
federation. Its own side is computed locally. The federation's side (the mean risk, the
mean classifier gradient, the class prototypes) is what the server averaged from the
hospitals' ``statistics`` in the previous round. Until a statistic exists (round 1), the
penalty is off.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from client.objectives import Objective, ObjectiveParams


class PenaltyParams(ObjectiveParams):
    penalty_weight: float = Field(10.0, ge=0.0)
    warmup_rounds: int = Field(3, ge=0)


class _Penalised(Objective):
    """risk + weight * penalty, the weight switching on after the warm-up."""

    Params = PenaltyParams

    @property
    def warmup_rounds(self) -> int:
        return self.params.warmup_rounds

    def weight(self) -> float:
        return self.params.penalty_weight if self.server_round > self.params.warmup_rounds else 0.0

    def penalty(self, model, images, labels, logits, risk) -> torch.Tensor | None:
        raise NotImplementedError

    def loss(self, model, images, labels, strata=None):
        logits = self.logits(model, images, strata)
        risk = F.binary_cross_entropy_with_logits(logits, labels)
        penalty = self.penalty(model, images, labels, logits, risk)
        if penalty is None:
            return risk, {"risk": risk.item()}
        weight = self.weight()
        total = (risk + weight * penalty) / max(1.0, weight)
        return total, {"risk": risk.item(), "penalty": penalty.item()}


def squared_risk_gap(risk: torch.Tensor, *, federation_risk: float) -> torch.Tensor:
    """V-REx in federated form: summed over hospitals, sum_e (R_e - mean R)^2 is n * Var."""
    return (risk - federation_risk) ** 2


class VREx(_Penalised):
    """Risk extrapolation (Krueger et al. 2021): equalise the hospitals' risks."""

    name = "vrex"
    per_example_loss = False  # the penalty squares the batch's mean risk

    def statistics(self, model, images, labels, strata=None):
        with torch.no_grad():
            risk = F.binary_cross_entropy_with_logits(self.logits(model, images, strata), labels)
            return {"risk": np.array([risk.item()])}

    def penalty(self, model, images, labels, logits, risk):
        if "risk" not in self.federation:
            return None
        return squared_risk_gap(risk, federation_risk=float(self.federation["risk"][0]))


def head_gradient_variance(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Variance over cases of the per-case gradient of the risk w.r.t. the linear head.

    For a linear head with binary cross-entropy that gradient is (p - y) * [h, 1], so no
    per-sample backward pass is needed.
    """
    features = model.features(images)
    probabilities = torch.sigmoid(model.head(features).squeeze(-1))
    augmented = torch.cat([features, torch.ones(len(features), 1)], dim=1)
    per_case = (probabilities - labels)[:, None] * augmented
    return per_case.var(dim=0)


class Fishr(_Penalised):
    """Fishr (Rame et al. 2022), federated: each hospital's variance of the classifier's
    per-case gradients is pulled towards the federation's mean variance."""

    name = "fishr"
    per_example_loss = False  # a variance couples the cases of a batch

    def statistics(self, model, images, labels, strata=None):
        with torch.no_grad():
            return {"head-gradient-variance": head_gradient_variance(model, images, labels).numpy()}

    def penalty(self, model, images, labels, logits, risk):
        if "head-gradient-variance" not in self.federation or len(labels) < 2:
            return None
        target = torch.as_tensor(self.federation["head-gradient-variance"], dtype=torch.float32)
        return ((head_gradient_variance(model, images, labels) - target) ** 2).sum()


def class_prototypes(features: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Feature mean per class (rows 0 and 1); a class the batch lacks gives NaN."""
    rows = []
    for label in (0, 1):
        chosen = features[labels == label]
        rows.append(chosen.mean(dim=0) if len(chosen) else torch.full((features.shape[1],), float("nan")))
    return torch.stack(rows).detach().numpy()


class PrototypeAlignment(_Penalised):
    """Pull each case's features towards the federation's prototype of its class."""

    name = "prototype"

    def statistics(self, model, images, labels, strata=None):
        with torch.no_grad():
            return {"prototypes": class_prototypes(model.features(images), labels).reshape(-1)}

    def penalty(self, model, images, labels, logits, risk):
        if "prototypes" not in self.federation:
            return None
        prototypes = torch.as_tensor(self.federation["prototypes"], dtype=torch.float32).reshape(2, -1)
        if torch.isnan(prototypes).any():
            return None
        features = model.features(images)
        # Per coordinate: the pull does not grow with the width of the representation.
        return ((features - prototypes[labels.long()]) ** 2).mean()


class ProxParams(ObjectiveParams):
    mu: float = Field(0.01, ge=0.0, description="weight of the proximal term")


class FedProx(Objective):
    """FedProx (Li et al. 2020): risk + mu/2 * ||w - w_global||^2, the global model being
    the one this round started from (captured at the first step)."""

    name = "fedprox"
    Params = ProxParams

    def __init__(self, params, *, server_round, num_rounds=None, federation=None) -> None:
        super().__init__(params, server_round=server_round, num_rounds=num_rounds, federation=federation)
        self._anchor: list[torch.Tensor] | None = None

    def loss(self, model, images, labels, strata=None):
        parameters = [p for p in model.parameters() if p.requires_grad]
        if self._anchor is None:
            self._anchor = [p.detach().clone() for p in parameters]
        risk = F.binary_cross_entropy_with_logits(self.logits(model, images, strata), labels)
        proximal = sum(((p - a) ** 2).sum() for p, a in zip(parameters, self._anchor))
        return risk + 0.5 * self.params.mu * proximal, {"risk": risk.item(), "proximal": float(proximal.detach())}
