"""Why did a hospital's performance change? Shapley attribution over shifted mechanisms.

The joint P(x, y) of the federation (source) and of the hospital (target) differ through
three mechanisms:

- prevalence   P(y)
- acquisition  P(x) once prevalence is matched: scanner, protocol, population
- association  P(y | x) once both are matched: who labels and how, or a shortcut whose
               link to the label is different there

A metric under a coalition of mechanisms is estimated where its cases are: without the
acquisition, over the source cases weighted by the density ratios of the mechanisms in the
coalition; with it, over the hospital's own cases, the mechanisms outside the coalition
undone (its labels reweighted to the federation's prevalence, or replaced by the
federation's posterior P(y | x)). So the empty coalition is the federation's value and the
full one the hospital's, and the Shapley shares add up to the observed change exactly, on
each measure a clinician reads: AUROC, the error rate at the hospital's own threshold, and
log-loss. Each share comes with a bootstrap interval; where the two leading mechanisms'
intervals overlap the verdict is "cannot tell". What the federation's cases cannot show
(the hospital's cases where the federation has none: a scanner nobody there has) is
reported beside them, as the gap between the acquisition estimated from each side; it
shrinks as the density ratios improve.

x is the model's representation h(x): the metrics depend on x only through it, so weights
in h-space are exact and far easier to estimate than in pixel space. The density ratios
come from logistic classifiers fitted by federated optimisation: each party returns only
the loss and gradient on its own cases, never a case.
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
from sklearn.metrics import roc_auc_score

from client.task import evidence_reader
from common.calibration import IDENTITY_CALIBRATION, bbse_prevalence, hospital_posteriors, mlls_prevalence

MECHANISMS = ("prevalence", "acquisition", "association")
METRICS = ("auroc", "error", "log-loss")
OUTSIDE = "outside source support"
WEIGHT_CLIP = (0.02, 50.0)  # importance weights beyond this are noise, not signal
BOOTSTRAP = 30
INTERVAL = (5.0, 95.0)  # percentiles of the bootstrap: a 90% interval
# The headline reads the decision first (error at the hospital's threshold), then the
# ranking, then log-loss: the first measure whose leader is clear speaks. Chosen on the
# explain benchmark's tuning cases (see benchmarks/RESULTS.md).
HEADLINE_ORDER = ("error", "auroc", "log-loss")


@dataclass(frozen=True)
class Party:
    """One hospital's cases as the attribution sees them (never leaves the hospital)."""

    features: np.ndarray  # h(x), standardised
    labels: np.ndarray
    logits: np.ndarray  # the model's calibrated logit at the federation's prevalence
    acquired: np.ndarray | None = None  # h(x) and low-level image statistics, standardised: what the domain classifier reads


def logistic_loss_and_grad(
    params: np.ndarray, features: np.ndarray, targets: np.ndarray, weights: np.ndarray, offset: float | np.ndarray = 0.0
) -> tuple[float, np.ndarray]:
    """Weighted logistic loss (sum) and its gradient for one party; params = (w, b), and
    ``offset`` a fixed per-case logit the model corrects."""
    z = features @ params[:-1] + params[-1] + offset
    loss = float(np.sum(weights * (np.logaddexp(0.0, z) - targets * z)))
    residual = weights * (expit(z) - targets)
    return loss, np.append(features.T @ residual, residual.sum())


LocalObjective = Callable[[np.ndarray], tuple[float, np.ndarray]]


def fit_federated_logistic(
    parties: Sequence[LocalObjective], *, dim: int, l2: float = 1.0, shrink_bias: bool = False,
    penalty: np.ndarray | None = None,
) -> np.ndarray:
    """Minimise the sum of the parties' losses (+ L2, per coefficient ``penalty`` if given)
    with L-BFGS; each call is one round in which every party returns only its loss and
    gradient."""
    penalised = penalty if penalty is not None else np.append(np.ones(dim), 1.0 if shrink_bias else 0.0)

    def total(params: np.ndarray) -> tuple[float, np.ndarray]:
        loss, grad = 0.5 * l2 * float((penalised * params) @ params), l2 * penalised * params
        for party in parties:
            part_loss, part_grad = party(params)
            loss, grad = loss + part_loss, grad + part_grad
        return loss, grad

    return minimize(total, np.zeros(dim + 1), jac=True, method="L-BFGS-B", options={"maxiter": 300}).x


def _predict(params: np.ndarray, features: np.ndarray) -> np.ndarray:
    return expit(features @ params[:-1] + params[-1])


@dataclass
class MechanismWeights:
    """Per source case, the density ratio of each mechanism (clipped); per target case, the
    federation's posterior P(y=1 | x) at the federation's and at the target's prevalence."""

    ratios: dict[str, list[np.ndarray]] = field(default_factory=dict)
    source_prevalence: float = 0.5
    target_prevalence: float = 0.5
    posterior_at_source: np.ndarray | None = None  # on the target's cases
    posterior_at_target: np.ndarray | None = None
    source_posterior_at_source: list[np.ndarray] = field(default_factory=list)  # on each source party's cases
    source_posterior_at_target: list[np.ndarray] = field(default_factory=list)
    target_overlap: np.ndarray | None = None  # per target case: 1 where the source has cases like it, 0 where not
    target_posterior: np.ndarray | None = None  # the target's P(y=1 | x), at its prevalence, on its cases
    target_posterior_on_source: list[np.ndarray] = field(default_factory=list)  # the same on each source party
    source_overlap: list[np.ndarray] = field(default_factory=list)  # per source case: 1 where the target has cases like it


def estimate_mechanism_weights(
    sources: Sequence[Party], target: Party, *, domain_l2: float = 0.1, label_l2: float = 10.0
) -> MechanismWeights:
    """Density ratios of the three mechanisms for every source case.

    A sharp domain classifier finds where the hospitals do not overlap. The target's label
    model is a correction of the federation's (moved to the target's prevalence): a slope
    on the federation's logit (annotation noise flattens it) and, smoothed harder, the
    features, since their noise would read as a change of association. A change of P(y|x)
    counts as association only where the source also has cases.
    """
    dim = target.features.shape[1]
    source_labels = np.concatenate([s.labels for s in sources])
    pi_s = (source_labels.sum() + 1) / (len(source_labels) + 2)
    pi_t = (target.labels.sum() + 1) / (len(target.labels) + 2)

    def prevalence_ratio(labels: np.ndarray) -> np.ndarray:
        return np.where(labels == 1, pi_t / pi_s, (1 - pi_t) / (1 - pi_s))

    # Acquisition: target (1) against source reweighted to the target prevalence (0), fitted
    # on one half of every party's cases and applied to the other (cross-fitting): a
    # classifier judging the cases it was fitted on would see a difference in any two draws.
    def seen(party: Party) -> np.ndarray:
        return party.acquired if party.acquired is not None else party.features

    def domain_fit(fold: int) -> np.ndarray:
        parts = [lambda p, s=s: logistic_loss_and_grad(p, seen(s)[_half(s, fold)], np.zeros(_half(s, fold).sum()),
                                                       prevalence_ratio(s.labels[_half(s, fold)])) for s in sources]
        half = _half(target, fold)
        parts.append(lambda p: logistic_loss_and_grad(p, seen(target)[half], np.ones(half.sum()), np.ones(half.sum())))
        return fit_federated_logistic(parts, dim=seen(target).shape[1], l2=domain_l2)

    fits = (domain_fit(0), domain_fit(1))

    def domain_probability(party: Party) -> np.ndarray:
        """Out-of-fold: each case scored by the fit on the other half."""
        first = _half(party, 0)
        return np.where(first, _predict(fits[1], seen(party)), _predict(fits[0], seen(party)))

    source_mass = float(sum(prevalence_ratio(s.labels).sum() for s in sources))
    odds_correction = source_mass / len(target.labels)
    # Smoothed as hard as the target's correction: an overconfident federation posterior
    # would read as a change of association wherever it is applied to fresh cases.
    source_label_model = fit_federated_logistic(
        [lambda p, s=s: logistic_loss_and_grad(p, s.features, s.labels.astype(float), np.ones(len(s.labels)))
         for s in sources], dim=dim, l2=label_l2)

    def source_logit(features: np.ndarray) -> np.ndarray:
        return logit(np.clip(_predict(source_label_model, features), 1e-6, 1 - 1e-6))

    def correction_inputs(features: np.ndarray) -> np.ndarray:
        return np.column_stack([source_logit(features), features])

    shift = logit(pi_t) - logit(pi_s)
    # A slope on the federation's logit and the features, both penalised; the bias barely.
    penalty = np.append(np.ones(dim + 1), 1e-3)
    correction = fit_federated_logistic(
        [lambda p: logistic_loss_and_grad(p, correction_inputs(target.features), target.labels.astype(float),
                                          np.ones(len(target.labels)), source_logit(target.features) + shift)],
        dim=dim + 1, l2=label_l2, penalty=penalty,
    )
    weights = MechanismWeights({name: [] for name in MECHANISMS}, float(pi_s), float(pi_t))
    for party in sources:
        c = np.clip(domain_probability(party), 1e-6, 1 - 1e-6)
        offset = source_logit(party.features) + shift
        q_posterior = expit(offset)
        t_posterior = expit(offset + correction_inputs(party.features) @ correction[:-1] + correction[-1])
        y = party.labels
        conditional = np.clip(
            np.where(y == 1, t_posterior / q_posterior, (1 - t_posterior) / (1 - q_posterior)), *WEIGHT_CLIP
        )
        marginal = np.clip(c / (1 - c) * odds_correction, *WEIGHT_CLIP)
        overlap = support_overlap(marginal)
        weights.ratios["prevalence"].append(prevalence_ratio(y))
        weights.ratios["acquisition"].append(marginal * conditional ** (1 - overlap))
        weights.ratios["association"].append(conditional**overlap)
        weights.source_posterior_at_source.append(expit(source_logit(party.features)))
        weights.source_posterior_at_target.append(q_posterior)
        weights.target_posterior_on_source.append(t_posterior)
        weights.source_overlap.append(overlap)
    weights.posterior_at_source = expit(source_logit(target.features))
    weights.posterior_at_target = expit(source_logit(target.features) + shift)
    own = source_logit(target.features) + shift
    weights.target_posterior = expit(own + correction_inputs(target.features) @ correction[:-1] + correction[-1])
    c = np.clip(domain_probability(target), 1e-6, 1 - 1e-6)
    weights.target_overlap = support_overlap(np.clip(c / (1 - c) * odds_correction, *WEIGHT_CLIP))
    return weights


def _half(party: Party, fold: int) -> np.ndarray:
    """Which of a party's cases are in cross-fitting fold ``fold`` (alternate cases)."""
    return np.arange(len(party.labels)) % 2 == fold


def support_overlap(density_ratio: np.ndarray) -> np.ndarray:
    """1 where target and source are equally likely at x, towards 0 where one dominates."""
    balanced = density_ratio / (1 + density_ratio)
    return 4 * balanced * (1 - balanced)


def metric_value(metric: str, logits: np.ndarray, positive: np.ndarray, weights: np.ndarray, *, shift: float) -> float:
    """A metric over weighted cases whose label is 1 with probability ``positive`` (a 0/1
    label, or a posterior): AUROC (weighted pairs), the error rate at posterior 0.5 after the
    hospital's prior ``shift``, or the log-loss of the scores as they are."""
    positive = positive.astype(np.float64)
    if metric == "auroc":
        labels = np.r_[np.ones(len(logits)), np.zeros(len(logits))]
        case_weights = np.r_[weights * positive, weights * (1 - positive)]
        keep = case_weights > 0
        if len(np.unique(labels[keep])) < 2:
            return math.nan
        return float(roc_auc_score(labels[keep], np.r_[logits, logits][keep], sample_weight=case_weights[keep]))
    if metric == "error":
        called = (logits + shift >= 0).astype(np.float64)
        per_case = positive * (1 - called) + (1 - positive) * called
    else:
        per_case = np.logaddexp(0.0, logits) - positive * logits
    return float(np.sum(weights * per_case) / np.sum(weights))


def _at_prevalence(posterior: np.ndarray, *, from_prevalence: float, to_prevalence: float) -> np.ndarray:
    """A posterior moved to another prevalence by Bayes' rule."""
    z = logit(np.clip(posterior, 1e-9, 1 - 1e-9)) + logit(to_prevalence) - logit(from_prevalence)
    return expit(z)


def coalition_values(
    sources: Sequence[Party], target: Party, weights: MechanismWeights, metric: str, *, shift: float
) -> dict[frozenset, float]:
    """The metric under every coalition, anchored at what is observed.

    The expected metric under a coalition's mechanisms is computed from fitted models: the
    cases (the source's, or with acquisition on the target's; reweighted by their labels
    to the prevalence in force) labelled by the posterior in force (the target's with
    association on, else the source's, at that prevalence; where a target case has no
    source case like it, the target's, since that change is the acquisition's). Coalitions
    without acquisition are then anchored at the source's observed value, those with it at
    the target's: V(S) - V(nothing) and V(all) - V(S) are differences of one model's
    predictions, so its own misfit cancels, and the shares add up to the observed change.
    """
    logits = np.concatenate([p.logits for p in sources])
    labels = np.concatenate([p.labels for p in sources])
    pi_s, pi_t = weights.source_prevalence, weights.target_prevalence
    to_target = np.concatenate(weights.ratios["prevalence"])  # source labels at the target's prevalence
    to_source = np.where(target.labels == 1, pi_s / pi_t, (1 - pi_s) / (1 - pi_t))
    q_source = np.concatenate(weights.source_posterior_at_source)  # at the source's prevalence
    # Where a source case has no target case like it, the target's P(y|x) there is a guess:
    # the source's stands (symmetrically to the target's cases below).
    covered = np.concatenate(weights.source_overlap)
    t_source = covered * np.concatenate(weights.target_posterior_on_source) + (1 - covered) * _at_prevalence(
        q_source, from_prevalence=pi_s, to_prevalence=pi_t)  # at the target's prevalence
    overlap = weights.target_overlap
    q_target = overlap * weights.posterior_at_source + (1 - overlap) * _at_prevalence(
        weights.target_posterior, from_prevalence=pi_t, to_prevalence=pi_s)
    t_target = weights.target_posterior

    def plug_in(coalition: frozenset) -> float:
        prevalence, association = "prevalence" in coalition, "association" in coalition
        in_force = pi_t if prevalence else pi_s
        if "acquisition" in coalition:
            logit_, w = target.logits, (np.ones(len(to_source)) if prevalence else to_source)
            posterior = (t_target if association else
                         _at_prevalence(q_target, from_prevalence=pi_s, to_prevalence=pi_t))
            posterior = _at_prevalence(posterior, from_prevalence=pi_t, to_prevalence=in_force)
        else:
            logit_, w = logits, (to_target if prevalence else np.ones(len(labels)))
            posterior = (_at_prevalence(t_source, from_prevalence=pi_t, to_prevalence=in_force) if association else
                         _at_prevalence(q_source, from_prevalence=pi_s, to_prevalence=in_force))
        return metric_value(metric, logit_, posterior, w, shift=shift)

    observed_source = metric_value(metric, logits, labels, np.ones(len(labels)), shift=shift)
    observed_target = metric_value(metric, target.logits, target.labels, np.ones(len(target.labels)), shift=shift)
    nothing, everything = frozenset(), frozenset(MECHANISMS)
    values = {}
    for size in range(len(MECHANISMS) + 1):
        for coalition in map(frozenset, itertools.combinations(MECHANISMS, size)):
            if "acquisition" in coalition:
                values[coalition] = observed_target - (plug_in(everything) - plug_in(coalition))
            else:
                values[coalition] = observed_source + plug_in(coalition) - plug_in(nothing)
    return values


def outside_support(sources: Sequence[Party], target: Party, weights: MechanismWeights, metric: str, *,
                    shift: float) -> float:
    """How far the acquisition's effect seen on the target's cases is from what the source
    cases, reweighted, can show: the part of the change where the federation has no cases."""
    logits = np.concatenate([p.logits for p in sources])
    labels = np.concatenate([p.labels for p in sources])
    reweighted = metric_value(metric, logits, labels, np.concatenate(weights.ratios["acquisition"]) *
                              np.concatenate(weights.ratios["prevalence"]), shift=shift)
    on_target = metric_value(metric, target.logits, weights.posterior_at_target, np.ones(len(target.labels)), shift=shift)
    return on_target - reweighted


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
    source: float  # over the training hospitals' cases
    target: float  # measured at the hospital
    shares: dict[str, float]  # Shapley, per mechanism: they add up to target - source
    outside: float  # how much of the acquisition's effect the source cases cannot show
    intervals: dict[str, tuple[float, float]]  # bootstrap, per mechanism and OUTSIDE
    leading: str  # the mechanism with the largest share, or "cannot tell (a or b)"

    def as_dict(self) -> dict:
        return {"metric": self.metric, "source": self.source, "target": self.target, "shares": self.shares,
                "outside": self.outside, "intervals": {k: list(v) for k, v in self.intervals.items()},
                "leading": self.leading}


def leading_mechanism(shares: dict[str, float], draws: dict[str, np.ndarray]) -> str:
    """The mechanism with the largest share among those whose bootstrap interval excludes
    zero (the others may not have shifted at all), unless its interval (of the absolute
    share) overlaps the runner-up's: then "cannot tell"."""
    def interval(name: str) -> tuple[float, float]:
        return tuple(np.nanpercentile(draws[name], INTERVAL))

    shifted = [name for name in shares if interval(name)[0] > 0 or interval(name)[1] < 0]
    if not shifted:
        return "cannot tell (no mechanism's share is clear of zero)"
    ranked = sorted(shifted, key=lambda name: -abs(shares[name]))
    if len(ranked) == 1:
        return ranked[0]
    first, second = ranked[0], ranked[1]
    low = np.nanpercentile(np.abs(draws[first]), INTERVAL[0])
    high = np.nanpercentile(np.abs(draws[second]), INTERVAL[1])
    return first if low > high else f"cannot tell ({first} or {second})"


def attribute(sources: Sequence[Party], target: Party, metric: str, weights: MechanismWeights, *,
              shift: float) -> tuple[float, float, dict[str, float], float]:
    """Source value, target value, the Shapley shares (they add up to the difference) and
    what lies outside the source's support."""
    values = coalition_values(sources, target, weights, metric, shift=shift)
    return (values[frozenset()], values[frozenset(MECHANISMS)], shapley_values(values),
            outside_support(sources, target, weights, metric, shift=shift))


def _resample(party: Party, rng: np.random.Generator) -> Party:
    index = rng.integers(0, len(party.labels), len(party.labels))
    return Party(party.features[index], party.labels[index], party.logits[index],
                 None if party.acquired is None else party.acquired[index])


@torch.no_grad()
def representation(model: torch.nn.Module, inputs: np.ndarray, *, calibration: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """h(x) (what the head reads), the model's calibrated logit, and low-level statistics
    of each image: the mean and log spread of each first-layer filter's response, which
    carry contrast, blur and noise (a scanner) even where h is blind to them."""
    model.eval()
    tensor = torch.as_tensor(inputs, dtype=torch.float32)
    represent = getattr(model, "represent", model.features)
    scale, bias = calibration
    first = model.features[0] if isinstance(model.features, torch.nn.Sequential) else None
    if isinstance(first, torch.nn.Conv2d):
        maps = first(tensor).flatten(2)
        low = torch.cat([maps.mean(dim=2), torch.log(maps.std(dim=2) + 1e-4)], dim=1).double().numpy()
    else:
        low = tensor.reshape(len(tensor), -1).double().numpy()
    evidence = evidence_reader(model)(tensor)  # the logit the calibration was fitted on
    return represent(tensor).double().numpy(), scale * evidence.double().numpy() + bias, low


def standardiser(feature_sets: Sequence[np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Federation-wide standardisation from each party's count, sum and sum of squares."""
    count = sum(len(f) for f in feature_sets)
    mean = sum(f.sum(axis=0) for f in feature_sets) / count
    var = sum((f**2).sum(axis=0) for f in feature_sets) / count - mean**2
    std = np.sqrt(np.maximum(var, 0)) + 1e-6
    return lambda f: (f - mean) / std


@dataclass(frozen=True)
class PrevalenceCheck:
    """The target's prevalence as its labels say, and as estimated from its images alone."""

    known: float
    mlls: float
    bbse: float | None


def headline_mechanism(leaders: dict[str, str], order: Sequence[str] = HEADLINE_ORDER) -> tuple[str, str]:
    """(mechanism, measure): the leader of the first measure in ``order`` that can tell,
    else the last measure's "cannot tell"."""
    present = [metric for metric in order if metric in leaders]
    if not present:
        raise ValueError(f"no leader for any of {', '.join(order)}")
    for metric in present:
        if not leaders[metric].startswith("cannot tell"):
            return leaders[metric], metric
    return leaders[present[-1]], present[-1]


@dataclass(frozen=True)
class Explanation:
    attributions: list[Attribution]
    prevalence: PrevalenceCheck

    @property
    def headline(self) -> tuple[str, str]:
        return headline_mechanism({a.metric: a.leading for a in self.attributions})


def explain_change(
    model: torch.nn.Module,
    sources: Sequence[tuple[np.ndarray, np.ndarray]],
    target: tuple[np.ndarray, np.ndarray],
    *,
    calibration: tuple[float, float] = IDENTITY_CALIBRATION,
    metrics: Sequence[str] = METRICS,
    bootstrap: int = BOOTSTRAP,
    seed: int = 0,
) -> Explanation:
    """Attribute each metric's change from the source hospitals to the target hospital."""
    raw = [representation(model, inputs, calibration=calibration) + (labels,) for inputs, labels in [*sources, target]]
    scale = standardiser([features for features, *_ in raw])
    scale_low = standardiser([low for _, _, low, _ in raw])
    parties = [Party(scale(h), y, z, np.column_stack([scale(h), scale_low(low)])) for h, z, low, y in raw]
    source_parties, target_party = parties[:-1], parties[-1]
    source_labels = np.concatenate([p.labels for p in source_parties])
    pi_s = (source_labels.sum() + 1) / (len(source_labels) + 2)
    pi_t = (target_party.labels.sum() + 1) / (len(target_party.labels) + 2)
    shift = float(logit(pi_t) - logit(pi_s))
    weights = estimate_mechanism_weights(source_parties, target_party)
    rng = np.random.default_rng(seed)
    resampled = [([_resample(p, rng) for p in source_parties], _resample(target_party, rng)) for _ in range(bootstrap)]
    boot_weights = [estimate_mechanism_weights(s, t) for s, t in resampled]
    attributions = []
    for metric in metrics:
        source_value, target_value, shares, outside = attribute(source_parties, target_party, metric, weights,
                                                                shift=shift)
        draws: dict[str, list[float]] = {name: [] for name in [*MECHANISMS, OUTSIDE]}
        for (boot_sources, boot_target), w in zip(resampled, boot_weights):
            *_, boot_shares, boot_outside = attribute(boot_sources, boot_target, metric, w, shift=shift)
            for name in MECHANISMS:
                draws[name].append(boot_shares[name])
            draws[OUTSIDE].append(boot_outside)
        arrays = {name: np.asarray(values) for name, values in draws.items()}
        intervals = {name: (float(np.nanpercentile(v, INTERVAL[0])), float(np.nanpercentile(v, INTERVAL[1])))
                     for name, v in arrays.items()}
        attributions.append(Attribution(metric, source_value, target_value, shares, outside, intervals,
                                        leading_mechanism(shares, arrays)))
    return Explanation(attributions, prevalence_check(source_parties, target_party))


def prevalence_check(sources: Sequence[Party], target: Party) -> PrevalenceCheck:
    """The target's prevalence from its images alone, by MLLS on the calibrated posteriors
    and by BBSE with the sources' rates at the federation's threshold, beside the truth."""
    source_labels = np.concatenate([p.labels for p in sources])
    source_logits = np.concatenate([p.logits for p in sources])
    pi_s = float(source_labels.mean())
    # The parties' logits are calibrated already (``representation``).
    posteriors = hospital_posteriors(target.logits, calibration=IDENTITY_CALIBRATION, prevalence=pi_s,
                                     federation_prevalence=pi_s)
    called = source_logits >= 0
    bbse = bbse_prevalence(float(np.mean(target.logits >= 0)), true_positive_rate=float(called[source_labels == 1].mean()),
                           false_positive_rate=float(called[source_labels == 0].mean()))
    return PrevalenceCheck(float(target.labels.mean()), mlls_prevalence(posteriors, source_prevalence=pi_s), bbse)
