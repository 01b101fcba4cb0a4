"""Why did a hospital's performance drop? Shapley attribution over shifted mechanisms.

The joint P(x, y) of the federation (source) and of the hospital (target) differ through
three mechanisms:

- prevalence   P(y)
- acquisition  P(x) once prevalence is matched: scanner, protocol, population
- annotation   P(y | x) once both are matched: who labels, and how

Turning a mechanism "on" multiplies the source cases' importance weight by its density
ratio:

    w_prev(y)   = pi_T(y) / pi_S(y)
    w_acq(x, y) = p_T(x) / q(x) * r(x, y) ** (1 - o(x))
    w_ann(x, y) = r(x, y) ** o(x),        r = p_T(y|x) / q(y|x)

Here q is the source reweighted to the target prevalence, and o(x) in [0, 1] is how much
the two hospitals overlap at x: 1 where the domain classifier cannot tell them apart, 0
where only the target has cases. A change of P(y|x) counts as annotation only where the
source also has cases. Where the target lies outside the source's support, P(y|x) was never
learned from the source, and that change is the acquisition's doing: a new scanner moves
cases into places the source never saw. The product of all three weights is still exactly
p_T(x, y) / p_S(x, y). The loss under every
coalition is a self-normalised weighted mean over the source cases, and Shapley values
split the change in loss exactly among the mechanisms.

x is the model's representation h(x): the loss depends on x only through h, so weights
in h-space are exact and far easier to estimate than in pixel space. The ratios come from
logistic classifiers fitted by federated optimisation. Each party computes the loss and
gradient on its own cases, and only these sums travel. Raw data and features are never
pooled.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import expit, logit

MECHANISMS = ("prevalence", "acquisition", "annotation")
WEIGHT_CLIP = (0.05, 20.0)  # importance weights beyond this are noise, not signal


@dataclass(frozen=True)
class Party:
    """One hospital's cases as the attribution sees them (never leaves the hospital)."""

    features: np.ndarray  # h(x), standardised
    labels: np.ndarray
    losses: dict[str, np.ndarray]  # per-case loss of the model under study, by metric


def logistic_loss_and_grad(
    params: np.ndarray, features: np.ndarray, targets: np.ndarray, weights: np.ndarray, offset: float | np.ndarray = 0.0
) -> tuple[float, np.ndarray]:
    """Weighted logistic loss (sum) and its gradient for one party; params = (w, b), and
    ``offset`` a fixed per-case logit the model corrects."""
    z = features @ params[:-1] + params[-1] + offset
    p = expit(z)
    eps = 1e-12
    loss = -float(np.sum(weights * (targets * np.log(p + eps) + (1 - targets) * np.log(1 - p + eps))))
    residual = weights * (p - targets)
    return loss, np.append(features.T @ residual, residual.sum())


LocalObjective = Callable[[np.ndarray], tuple[float, np.ndarray]]


def fit_federated_logistic(
    parties: Sequence[LocalObjective], *, dim: int, l2: float = 1.0, shrink_bias: bool = False
) -> np.ndarray:
    """Minimise the sum of the parties' losses (+ L2) with L-BFGS; each call is one round
    in which every party returns only its loss and gradient."""
    penalised = np.append(np.ones(dim), 1.0 if shrink_bias else 0.0)

    def total(params: np.ndarray) -> tuple[float, np.ndarray]:
        loss, grad = 0.5 * l2 * float((penalised * params) @ params), l2 * penalised * params
        for party in parties:
            part_loss, part_grad = party(params)
            loss, grad = loss + part_loss, grad + part_grad
        return loss, grad

    result = minimize(total, np.zeros(dim + 1), jac=True, method="L-BFGS-B", options={"maxiter": 200})
    return result.x


def _predict(params: np.ndarray, features: np.ndarray) -> np.ndarray:
    return expit(features @ params[:-1] + params[-1])


@dataclass
class MechanismWeights:
    """Per source case, the density ratio of each mechanism (clipped)."""

    ratios: dict[str, list[np.ndarray]] = field(default_factory=dict)


def estimate_mechanism_weights(
    sources: Sequence[Party], target: Party, *, domain_l2: float = 0.1, label_l2: float = 10.0
) -> MechanismWeights:
    # A sharp domain classifier finds where the hospitals do not overlap; the label models
    # are smoothed harder, since their noise would read as annotation shift.
    dim = target.features.shape[1]
    source_labels = np.concatenate([s.labels for s in sources])
    pi_s = (source_labels.sum() + 1) / (len(source_labels) + 2)
    pi_t = (target.labels.sum() + 1) / (len(target.labels) + 2)

    def prevalence_ratio(labels: np.ndarray) -> np.ndarray:
        return np.where(labels == 1, pi_t / pi_s, (1 - pi_t) / (1 - pi_s))

    # Acquisition: target (1) against source reweighted to the target prevalence (0).
    parties = [lambda p, s=s: logistic_loss_and_grad(p, s.features, np.zeros(len(s.labels)), prevalence_ratio(s.labels))
               for s in sources]
    parties.append(lambda p: logistic_loss_and_grad(p, target.features, np.ones(len(target.labels)), np.ones(len(target.labels))))
    domain = fit_federated_logistic(parties, dim=dim, l2=domain_l2)
    source_mass = float(sum(prevalence_ratio(s.labels).sum() for s in sources))
    odds_correction = source_mass / len(target.labels)

    # Annotation: P(y|h) at the target and in the federation (then moved to the target prior).
    source_label_model = fit_federated_logistic(
        [lambda p, s=s: logistic_loss_and_grad(p, s.features, s.labels.astype(float), np.ones(len(s.labels))) for s in sources],
        dim=dim, l2=domain_l2,  # well calibrated, or the prior shift below is not exact
    )

    def adjusted_source_logit(features: np.ndarray) -> np.ndarray:
        # The federation's P(y|h), moved to the target's prevalence by Bayes' rule.
        source = np.clip(_predict(source_label_model, features), 1e-6, 1 - 1e-6)
        return logit(source) + logit(pi_t) - logit(pi_s)

    # The target's P(y|h) as a correction of that: exactly zero when only the prior moved.
    correction = fit_federated_logistic(
        [lambda p: logistic_loss_and_grad(p, target.features, target.labels.astype(float), np.ones(len(target.labels)),
                                          adjusted_source_logit(target.features))],
        dim=dim, l2=label_l2, shrink_bias=True,
    )
    weights = MechanismWeights({name: [] for name in MECHANISMS})
    for party in sources:
        c = np.clip(_predict(domain, party.features), 1e-6, 1 - 1e-6)
        offset = adjusted_source_logit(party.features)
        q_posterior = expit(offset)
        t_posterior = expit(offset + party.features @ correction[:-1] + correction[-1])
        y = party.labels
        conditional = np.clip(
            np.where(y == 1, t_posterior / q_posterior, (1 - t_posterior) / (1 - q_posterior)), *WEIGHT_CLIP
        )
        marginal = np.clip(c / (1 - c) * odds_correction, *WEIGHT_CLIP)
        overlap = support_overlap(marginal)
        weights.ratios["prevalence"].append(prevalence_ratio(y))
        weights.ratios["acquisition"].append(marginal * conditional ** (1 - overlap))
        weights.ratios["annotation"].append(conditional**overlap)
    return weights


def support_overlap(density_ratio: np.ndarray) -> np.ndarray:
    """1 where target and source are equally likely at x, towards 0 where one dominates."""
    balanced = density_ratio / (1 + density_ratio)
    return 4 * balanced * (1 - balanced)


def coalition_losses(sources: Sequence[Party], weights: MechanismWeights, metric: str) -> dict[frozenset, float]:
    """Self-normalised weighted loss over the source cases for every coalition. Each
    hospital would return just (sum of w * loss, sum of w) per coalition."""
    values = {}
    for size in range(len(MECHANISMS) + 1):
        for coalition in itertools.combinations(MECHANISMS, size):
            weighted, mass = 0.0, 0.0
            for index, party in enumerate(sources):
                w = np.ones(len(party.labels))
                for name in coalition:
                    w = w * weights.ratios[name][index]
                weighted += float(np.sum(w * party.losses[metric]))
                mass += float(np.sum(w))
            values[frozenset(coalition)] = weighted / mass
    return values


def shapley_values(values: dict[frozenset, float], players: Sequence[str] = MECHANISMS) -> dict[str, float]:
    """Exact Shapley values of a game given on every coalition."""
    n = len(players)
    shares = {}
    for player in players:
        others = [p for p in players if p != player]
        total = 0.0
        for size in range(n):
            for coalition in itertools.combinations(others, size):
                weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
                base = frozenset(coalition)
                total += weight * (values[base | {player}] - values[base])
        shares[player] = total
    return shares


@dataclass(frozen=True)
class Attribution:
    metric: str
    source_loss: float
    target_loss: float  # measured directly at the hospital
    reweighted_loss: float  # all mechanisms on: the source cases' estimate of target_loss
    shares: dict[str, float]

    @property
    def dominant(self) -> str:
        return max(self.shares, key=lambda name: abs(self.shares[name]))

    def as_dict(self) -> dict:
        return {"metric": self.metric, "source_loss": self.source_loss, "target_loss": self.target_loss,
                "reweighted_loss": self.reweighted_loss, "shares": self.shares, "dominant": self.dominant}


def per_case_losses(scores: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    clipped = np.clip(scores.astype(np.float64), 1e-7, 1 - 1e-7)
    return {
        "log-loss": -(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped)),
        "error": ((scores >= 0.5) != labels).astype(np.float64),
    }


@torch.no_grad()
def representation(model: torch.nn.Module, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """h(x) and the model's probability for each case."""
    model.eval()
    tensor = torch.as_tensor(inputs, dtype=torch.float32)
    features = model.features(tensor)
    return features.numpy().astype(np.float64), torch.sigmoid(model(tensor)).numpy()


def standardiser(feature_sets: Sequence[np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Federation-wide standardisation from each party's count, sum and sum of squares."""
    count = sum(len(f) for f in feature_sets)
    mean = sum(f.sum(axis=0) for f in feature_sets) / count
    var = sum((f**2).sum(axis=0) for f in feature_sets) / count - mean**2
    std = np.sqrt(np.maximum(var, 0)) + 1e-6
    return lambda f: (f - mean) / std


def explain_drop(
    model: torch.nn.Module,
    sources: Sequence[tuple[np.ndarray, np.ndarray]],
    target: tuple[np.ndarray, np.ndarray],
    *,
    metrics: Sequence[str] = ("log-loss", "error"),
) -> list[Attribution]:
    """Attribute the change in each loss from the source hospitals to the target hospital."""
    raw = [representation(model, inputs) + (labels,) for inputs, labels in [*sources, target]]
    scale = standardiser([features for features, _, _ in raw])
    parties = [Party(scale(h), y, per_case_losses(p, y)) for h, p, y in raw]
    source_parties, target_party = parties[:-1], parties[-1]
    weights = estimate_mechanism_weights(source_parties, target_party)
    results = []
    for metric in metrics:
        values = coalition_losses(source_parties, weights, metric)
        results.append(Attribution(
            metric=metric,
            source_loss=values[frozenset()],
            target_loss=float(target_party.losses[metric].mean()),
            reweighted_loss=values[frozenset(MECHANISMS)],
            shares=shapley_values(values),
        ))
    return results
