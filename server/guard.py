"""The server guard: a causal dependency graph over client contributions, each round.

Every update is first compressed to a fixed-size CountSketch, so each step below costs time
linear in the number of parameters. Detectors (a registry, one small class each) then give
every client a p-value with an explanation:

- ``forecast``: how far the update departs from what this client's own accepted history
  predicts. A hospital that is always different is not penalised; a sudden change is.
- ``magnitude``: the update's norm against the client's own history (or, without one, the
  other clients). This catches free-riders and scaled model replacement.
- ``dependence``: partial correlations between the unexplained parts (innovations) of the
  updates (and plain correlation for near-copies, which explain each other away). Colluders, and attacks built from other clients' updates, share structure that
  independent hospitals do not. The edges form the graph.
- ``intervention``: the exact effect of leaving this client out on a small validation
  set held by the server.
- ``solo-ranking``: the other intervention, the validation AUROC if the round's model were
  this client's alone. Leaving one of ten out moves the aggregate by a tenth; applying one
  alone moves it fully. AUROC, not loss: a hospital with another prevalence shifts the
  bias and so the loss, while flipped labels or a flipped update reverse the ranking.

The p-values are combined per client (Bonferroni within detector families, then across
them) and controlled across clients by Benjamini-Hochberg at level ``fdr``. Suspicion
accumulates across rounds: each client's p-value is combined with its last rounds'
(Fisher's method, which treats rounds as independent), a client flagged in enough of the
recent rounds stays excluded until it behaves, and only plainly unsuspicious rounds enter
a client's history. Flagged updates are excluded from the aggregate. Borderline ones are
down-weighted.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from scipy.stats import combine_pvalues, norm
from scipy.stats import t as student_t

DETECTORS: dict[str, type[Detector]] = {}
SKETCH_SIZE = 512


# ---------------------------------------------------------------- pure maths


def count_sketch(vector: np.ndarray, *, size: int = SKETCH_SIZE, seed: int = 0) -> np.ndarray:
    """CountSketch of a flat vector: every coordinate goes to one bucket with a random sign.

    Linear in the vector's length, and inner products are preserved in expectation.
    """
    rng = np.random.default_rng(seed)
    buckets = rng.integers(0, size, len(vector))
    signs = rng.choice(np.array([-1.0, 1.0]), len(vector))
    return np.bincount(buckets, weights=signs * vector, minlength=size)


def robust_spread(values: np.ndarray) -> float:
    """1.4826 * MAD: the standard deviation for normal data, ignoring up to half outliers."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 * MAD): stays honest with up to half the clients lying."""
    median = np.median(values)
    return (values - median) / max(robust_spread(values), 1e-12 + 1e-6 * abs(median))


HEAVY_TAIL_DF = 5  # robust z-scores of a few clients are heavy-tailed: Student-t, not normal


def upper_p(z: np.ndarray) -> np.ndarray:
    return student_t.sf(z, HEAVY_TAIL_DF)


def benjamini_hochberg(p_values: np.ndarray, *, level: float) -> np.ndarray:
    """Which hypotheses BH rejects at false-discovery rate ``level``."""
    n = len(p_values)
    order = np.argsort(p_values)
    thresholds = level * (np.arange(1, n + 1) / n)
    passed = p_values[order] <= thresholds
    rejected = np.zeros(n, dtype=bool)
    if passed.any():
        rejected[order[: np.max(np.flatnonzero(passed)) + 1]] = True
    return rejected


def partial_correlations(innovations: np.ndarray, *, shrinkage: float = 0.1) -> np.ndarray:
    """Partial correlations between rows (clients), from a shrunk correlation matrix."""
    correlation = np.corrcoef(innovations)
    correlation = np.nan_to_num(correlation)
    shrunk = (1 - shrinkage) * correlation + shrinkage * np.eye(len(correlation))
    precision = np.linalg.inv(shrunk)
    scale = np.sqrt(np.outer(np.diag(precision), np.diag(precision)))
    partial = -precision / scale
    np.fill_diagonal(partial, 1.0)
    return partial


# ---------------------------------------------------------------- client memory


@dataclass
class ClientMemory:
    """What the guard remembers of one client: only rounds in which it was accepted."""

    residual: np.ndarray | None = None  # EWMA forecast of its departure from the consensus
    log_norm: float | None = None  # EWMA forecast of its update's log-norm
    alignment: float | None = None  # EWMA forecast of its cosine with the consensus
    recent_flags: deque = field(default_factory=lambda: deque(maxlen=3))
    recent_p: deque = field(default_factory=lambda: deque(maxlen=3))  # combined p-values of its last rounds
    ranking_z: deque = field(default_factory=lambda: deque(maxlen=4))  # solo-ranking z of past rounds
    solo_change: float | None = None  # EWMA forecast of its model-alone AUROC change

    def remember(
        self, residual: np.ndarray, log_norm: float, alignment: float, solo_change: float | None, *, smoothing: float
    ) -> None:
        if self.residual is None:
            self.residual, self.log_norm, self.alignment = residual.copy(), log_norm, alignment
        else:
            self.residual = (1 - smoothing) * self.residual + smoothing * residual
            self.log_norm = (1 - smoothing) * self.log_norm + smoothing * log_norm
            self.alignment = (1 - smoothing) * self.alignment + smoothing * alignment
        if solo_change is not None:
            self.solo_change = solo_change if self.solo_change is None else (
                (1 - smoothing) * self.solo_change + smoothing * solo_change
            )


@dataclass
class RoundEvidence:
    """Everything the detectors may use, for the clients of one round (same order)."""

    clients: list[str]
    sketches: np.ndarray  # (n, k)
    residuals: np.ndarray  # departures from the coordinate-wise median
    innovations: np.ndarray  # residuals minus each client's forecast
    log_norms: np.ndarray
    alignments: np.ndarray  # cosine of each update with the median of the others'
    memories: list[ClientMemory]
    loo_effects: np.ndarray | None  # validation loss without the client minus with everyone
    solo_auroc_changes: np.ndarray | None = None  # validation AUROC of its model alone minus the start's


@dataclass
class Finding:
    p_values: np.ndarray
    reasons: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


class Detector(ABC):
    name: ClassVar[str]
    # Detectors asking the same question (e.g. two interventions on the validation set)
    # share a family; Bonferroni runs within families, then across them.
    family: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        DETECTORS[cls.name] = cls

    @abstractmethod
    def inspect(self, evidence: RoundEvidence) -> Finding: ...


class ForecastDetector(Detector):
    name = "forecast"

    def inspect(self, evidence: RoundEvidence) -> Finding:
        surprise = np.linalg.norm(evidence.innovations, axis=1)
        z = robust_z(np.log(surprise + 1e-12))
        reasons = [
            f"departs from its own forecast {s / np.median(surprise):.1f}x as much as the median client"
            for s in surprise
        ]
        return Finding(upper_p(z), reasons)


class MagnitudeDetector(Detector):
    name = "magnitude"

    def inspect(self, evidence: RoundEvidence) -> Finding:
        expected = np.array([
            m.log_norm if m.log_norm is not None else np.median(evidence.log_norms) for m in evidence.memories
        ])
        gap = evidence.log_norms - expected
        z = robust_z(gap)
        reasons = [f"update norm {math.exp(g):.2g}x what was expected" for g in gap]
        return Finding(2 * upper_p(np.abs(z)), reasons)  # too small (free-rider) or too large


class AlignmentDetector(Detector):
    """Direction against the consensus of the others (cosine with their median update),
    relative to what this client's history predicts: sign flips and reversed objectives."""

    name = "alignment"

    def inspect(self, evidence: RoundEvidence) -> Finding:
        expected = np.array([
            m.alignment if m.alignment is not None else np.median(evidence.alignments) for m in evidence.memories
        ])
        drop = expected - evidence.alignments
        z = robust_z(drop)
        reasons = [f"cosine with the others' median update {a:+.2f} (expected {e:+.2f})"
                   for a, e in zip(evidence.alignments, expected)]
        return Finding(upper_p(z), reasons)


def consensus_alignment(sketches: np.ndarray) -> np.ndarray:
    """Cosine of each client's sketch with the coordinate-wise median of the others'."""
    out = np.empty(len(sketches))
    for i in range(len(sketches)):
        others = np.median(np.delete(sketches, i, axis=0), axis=0)
        out[i] = sketches[i] @ others / (np.linalg.norm(sketches[i]) * np.linalg.norm(others) + 1e-12)
    return out


class DependenceDetector(Detector):
    name = "dependence"
    # Similar hospitals do correlate (0.5-0.6 seen between honest sites); copies do far more.
    min_partial_correlation: ClassVar[float] = 0.8

    # Three or more near-copies explain each other away in partial correlations, so a
    # near-duplicate (plain correlation this high) is an edge too.
    min_correlation: ClassVar[float] = 0.9

    def inspect(self, evidence: RoundEvidence) -> Finding:
        n, k = evidence.innovations.shape
        partial = partial_correlations(evidence.innovations)
        plain = np.nan_to_num(np.corrcoef(evidence.innovations))
        copies = np.abs(plain) >= self.min_correlation
        partial = np.where(copies & (np.abs(plain) > np.abs(partial)), plain, partial)
        fisher = np.arctanh(np.clip(partial, -0.999999, 0.999999)) * math.sqrt(max(k - n - 1, 1))
        strong = (np.abs(partial) >= self.min_partial_correlation) | copies
        np.fill_diagonal(strong, False)
        edges = [(i, j, float(partial[i, j])) for i in range(n) for j in range(i + 1, n) if strong[i, j]]
        p_values, reasons = np.ones(n), [""] * n
        for i in range(n):
            partners = [j for j in range(n) if strong[i, j]]
            if partners:
                worst = max(partners, key=lambda j: abs(fisher[i, j]))
                p_values[i] = min(1.0, 2 * norm.sf(abs(fisher[i, worst])) * (n - 1))
                reasons[i] = f"partial correlation {partial[i, worst]:+.2f} with {evidence.clients[worst]}"
        return Finding(p_values, reasons, {"edges": [(evidence.clients[i], evidence.clients[j], w) for i, j, w in edges]})


class InterventionDetector(Detector):
    name = "intervention"
    family = "intervention"
    min_effect: ClassVar[float] = 0.002  # validation log-loss: below this it is noise

    def inspect(self, evidence: RoundEvidence) -> Finding:
        n = len(evidence.clients)
        if evidence.loo_effects is None:
            return Finding(np.ones(n), [""] * n)
        harm = -evidence.loo_effects  # > 0: the aggregate is better without this client
        z = robust_z(harm)
        p_values = np.where(harm > self.min_effect, upper_p(z), 1.0)
        reasons = [f"leaving it out changes validation loss by {e:+.4f}" for e in evidence.loo_effects]
        return Finding(p_values, reasons)


def stouffer(z_scores: list[float]) -> float:
    """One z-score from several independent ones: their sum over the square root of their count."""
    return float(np.sum(z_scores) / math.sqrt(len(z_scores)))


class SoloRankingDetector(Detector):
    """Evidence accumulates over rounds (Stouffer): 200 validation cases rank one client's
    model only roughly, but an attacker is among the worst every round, an honest hospital
    only now and then. As for the forecast, the yardstick is the client's own accepted
    history where it has one: a hospital whose cases always rank the validation set a
    little worse (another prevalence, other shortcuts) is not blamed for it every round."""

    name = "solo-ranking"
    family = "intervention"
    min_drop: ClassVar[float] = 0.03  # validation AUROC: smaller drops are sampling noise

    def inspect(self, evidence: RoundEvidence) -> Finding:
        n = len(evidence.clients)
        if evidence.solo_auroc_changes is None or not np.isfinite(evidence.solo_auroc_changes).all():
            return Finding(np.ones(n), [""] * n)  # no ranking to compare (e.g. a one-class validation set)
        drop = -evidence.solo_auroc_changes
        median = float(np.median(evidence.solo_auroc_changes))
        expected = np.array([m.solo_change if m.solo_change is not None else median for m in evidence.memories])
        surprise = expected - evidence.solo_auroc_changes  # > 0: worse than its own record
        z = np.clip(surprise / max(robust_spread(drop), 1e-6), -3.0, 6.0)  # one freak round must not dominate the sum
        pooled = np.array([stouffer([*m.ranking_z, value]) for m, value in zip(evidence.memories, z)])
        # Normal tail: a sum over rounds of clipped scores is no longer heavy-tailed.
        p_values = np.where(drop > self.min_drop, norm.sf(pooled), 1.0)
        reasons = [f"its model alone changes validation AUROC by {c:+.3f} (z {s:+.1f} over {len(m.ranking_z) + 1} rounds)"
                   for c, s, m in zip(evidence.solo_auroc_changes, pooled, evidence.memories)]
        return Finding(p_values, reasons, {"z": z})


def accumulate_over_rounds(current: float, past: list[float]) -> float:
    """This round's p-value or Fisher's combination with the client's recent rounds,
    whichever is smaller (x2 for taking the smaller): a sudden change still counts alone,
    and steady moderate evidence (every round a little suspicious) adds up."""
    if not past:
        return current
    fisher = combine_pvalues(np.clip([*past, current], 1e-300, 1.0), method="fisher").pvalue
    return float(min(1.0, 2 * min(current, fisher)))


def combine_by_family(p_values: dict[str, np.ndarray]) -> np.ndarray:
    """Per client, Bonferroni within each detector family, then across the families."""
    families: dict[str, list[np.ndarray]] = {}
    for name, values in p_values.items():
        families.setdefault(DETECTORS[name].family or name, []).append(values)
    per_family = [np.minimum(1.0, np.min(members, axis=0) * len(members)) for members in families.values()]
    return np.minimum(1.0, np.min(per_family, axis=0) * len(per_family))


# ---------------------------------------------------------------- the guard


@dataclass
class Verdict:
    client: str
    flagged: bool
    weight: float
    combined_p: float
    p_values: dict[str, float]
    reasons: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"client": self.client, "flagged": self.flagged, "weight": self.weight,
                "confidence": 1 - self.combined_p, "p_values": self.p_values, "evidence": self.reasons}


@dataclass
class CausalGuard:
    """Thin state holder: per-client memories; the statistics are the functions above."""

    fdr: float = 0.01
    evidence_level: float = 1e-3  # a detector's p-value below this is reported as evidence
    downweight_below: float = 0.05
    smoothing: float = 0.5
    quarantine_after: int = 2  # flags within the last 3 rounds that keep a client out
    detectors: tuple[str, ...] = (
        "forecast", "magnitude", "alignment", "dependence", "intervention", "solo-ranking",
    )
    seed: int = 0
    memories: dict[str, ClientMemory] = field(default_factory=dict)

    def sketch(self, delta: np.ndarray) -> np.ndarray:
        return count_sketch(delta, seed=self.seed)

    def evidence(
        self, clients: list[str], sketches: np.ndarray, loo_effects: np.ndarray | None,
        solo_auroc_changes: np.ndarray | None = None,
    ) -> RoundEvidence:
        memories = [self.memories.setdefault(c, ClientMemory()) for c in clients]
        residuals = sketches - np.median(sketches, axis=0)
        forecasts = np.stack([m.residual if m.residual is not None else np.zeros(sketches.shape[1]) for m in memories])
        log_norms = np.log(np.linalg.norm(sketches, axis=1) + 1e-12)
        alignments = consensus_alignment(sketches)
        return RoundEvidence(clients, sketches, residuals, residuals - forecasts, log_norms, alignments, memories,
                             loo_effects, solo_auroc_changes)

    def judge(
        self, clients: list[str], sketches: np.ndarray, loo_effects: np.ndarray | None = None,
        solo_auroc_changes: np.ndarray | None = None,
    ) -> tuple[list[Verdict], dict]:
        """Verdicts for this round's clients, and the dependency graph's edges."""
        evidence = self.evidence(clients, sketches, loo_effects, solo_auroc_changes)
        findings = {name: DETECTORS[name]().inspect(evidence) for name in self.detectors}
        this_round = combine_by_family({name: f.p_values for name, f in findings.items()})
        combined = np.array([accumulate_over_rounds(float(p), list(m.recent_p))
                             for p, m in zip(this_round, evidence.memories)])
        rejected = benjamini_hochberg(combined, level=self.fdr)
        verdicts = []
        for i, client in enumerate(clients):
            memory = evidence.memories[i]
            memory.recent_flags.append(bool(rejected[i]))
            memory.recent_p.append(float(this_round[i]))
            quarantined = sum(memory.recent_flags) >= self.quarantine_after
            flagged = bool(rejected[i]) or quarantined
            reasons = [f"{name}: {f.reasons[i]}" for name, f in findings.items()
                       if f.p_values[i] < self.evidence_level and f.reasons[i]]
            if quarantined and not rejected[i]:
                reasons.append(f"flagged in {sum(memory.recent_flags)} of the last {len(memory.recent_flags)} rounds")
            if combined[i] < this_round[i]:
                reasons.append(f"evidence over its last {len(memory.recent_p)} rounds: p {combined[i]:.2g} "
                               f"(this round alone {this_round[i]:.2g})")
            weight = 0.0 if flagged else (0.5 if combined[i] < self.downweight_below else 1.0)
            verdicts.append(Verdict(client, flagged, weight, float(combined[i]),
                                    {name: float(f.p_values[i]) for name, f in findings.items()}, reasons))
            # Only plainly unsuspicious rounds teach the forecasts: an attacker that slips
            # through once must not become its own yardstick.
            if weight == 1.0:
                solo = None if evidence.solo_auroc_changes is None else float(evidence.solo_auroc_changes[i])
                solo = solo if solo is not None and math.isfinite(solo) else None
                memory.remember(evidence.residuals[i], float(evidence.log_norms[i]), float(evidence.alignments[i]),
                                solo, smoothing=self.smoothing)
        if "solo-ranking" in findings and "z" in findings["solo-ranking"].extra:
            for memory, z in zip(evidence.memories, findings["solo-ranking"].extra["z"]):
                memory.ranking_z.append(float(z))
        edges = findings["dependence"].extra.get("edges", []) if "dependence" in findings else []
        return verdicts, {"edges": edges}
