"""The guard's detectors (a registry, one small class each) and how their findings combine.

Each detector turns one round's evidence (``server/guard_evidence.py``) into a p-value per
client with a reason; the guard (``server/guard.py``) combines them. See
``server/guard.py`` for what each asks. Here: the signs of an attack (size, habit,
dependence, fabrication); the harm family, measured on the server's validation cases, is
in ``server/harm_detectors.py`` and registers into the same registry.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
from scipy.stats import norm
from sklearn.metrics.pairwise import cosine_similarity

from server.guard_evidence import Finding, RoundEvidence
from server.guard_stats import (
    outlier_upper_p,
    partial_correlations,
    robust_z,
    spread_regularity,
    spread_units,
    upper_p,
)

DETECTORS: dict[str, type[Detector]] = {}
# Harm to the server's validation ranking, measured by intervening on the aggregate. The
# other families look for the signs of an attack (an update's size, habit, dependence,
# fabrication); harm is what the guard exists to prevent, so its family gets a larger,
# a-priori share of the test level (``combine_by_family``).
HARM_FAMILY = "intervention"


class Detector(ABC):
    name: ClassVar[str]
    # Detectors asking the same question (e.g. two interventions on the validation set)
    # share a family; Bonferroni runs within families, then across them (``combine_by_family``).
    family: ClassVar[str | None] = None
    # A detector that asks only whether a client changed its habit: a change of habit
    # towards what ranks the clean validation cases is learning, not harm (see ``excuse``).
    habit_only: ClassVar[bool] = False
    # A detector that sums its own evidence over rounds (Stouffer) is left out of the guard's
    # Fisher combination over rounds, which would count its past rounds a second time.
    sums_over_rounds: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        DETECTORS[cls.name] = cls

    @abstractmethod
    def inspect(self, evidence: RoundEvidence) -> Finding: ...


class ForecastDetector(Detector):
    """How far the update departs from its own forecast, against how far this client usually
    departs from it. A hospital in a minority (another prevalence) moves more from round to
    round as the model moves; only a change in its own habit is evidence."""

    name = "forecast"
    habit_only = True
    # Departing from its forecast within this factor of usual (beyond the round's common
    # change) is not evidence: eight hospitals whose surprises moved alike gave a spread of
    # 0.01, against which an honest 1.2x read as p 4e-6.
    min_ratio: ClassVar[float] = 1.5

    def inspect(self, evidence: RoundEvidence) -> Finding:
        median = float(np.median(evidence.log_surprises))
        usual = np.array([m.log_surprise if m.log_surprise is not None else median for m in evidence.memories])
        gap = evidence.log_surprises - usual
        large = gap - np.median(gap) > math.log(self.min_ratio)
        reasons = [f"departs from its own forecast {math.exp(g):.1f}x as much as usual" for g in gap]
        return Finding(np.where(large, upper_p(robust_z(gap)), 1.0), reasons)


class MagnitudeDetector(Detector):
    """An update larger than what was expected of it (its own accepted history or, without
    one, the round's median norm): scaled updates, model replacement (boosted backdoors)."""

    name = "magnitude"
    family = "magnitude"
    # A norm within this factor of what was expected (beyond the round's common drift) is
    # not evidence: seven hospitals whose norms happen to agree closely give a tiny spread,
    # against which an honest 1.1x looked like p 2e-6. Attacks scale by 3x or more.
    min_ratio: ClassVar[float] = 1.5
    side: ClassVar[float] = 1.0  # +1: larger than expected is evidence; -1: smaller

    def inspect(self, evidence: RoundEvidence) -> Finding:
        expected = np.array([
            m.log_norm if m.log_norm is not None else np.median(evidence.log_norms) for m in evidence.memories
        ])
        gap = evidence.log_norms - expected
        beyond = self.side * (gap - np.median(gap)) > math.log(self.min_ratio)
        # Several beyond the floor are held to the clients within it: seed 4's three boosted
        # backdoor updates were otherwise caught a round late.
        p_values = outlier_upper_p(gap, beyond, side=self.side)
        reasons = [f"update norm {math.exp(g):.2g}x what was expected" for g in gap]
        return Finding(np.where(beyond, p_values, 1.0), reasons)


class ShrinkageDetector(MagnitudeDetector):
    """An update smaller than expected: a free-rider sending back (nearly) the model it got.

    The other side of ``magnitude``, so in its family (the two together are one two-sided
    test). A habit: an update that shrinks while it points with the validation ranking is
    a hospital converging (seed 10: an honest hospital's norm fell to 0.52x its history,
    its validation-direction z -2.95, and it was flagged). A free-rider's update points
    nowhere (``data-span`` sees that too)."""

    name = "shrinkage"
    habit_only = True
    side = -1.0


class AlignmentDetector(Detector):
    """Direction against the consensus of the others (cosine with their median update),
    relative to what this client's history predicts: sign flips and reversed objectives.

    Only against a history: across non-IID hospitals the first round's cosines fall in
    clusters (in the benchmark, the low-prevalence hospitals at -0.06 to -0.46, the rest at
    +0.2 to +0.3), so a hospital that is merely in the smaller cluster would look reversed."""

    name = "alignment"
    habit_only = True
    # A cosine this much below its forecast, or less, is not evidence: seven hospitals that
    # happen to agree closely give a tiny spread (an honest drop of 0.08 read as p 2e-4).
    min_drop: ClassVar[float] = 0.2

    def inspect(self, evidence: RoundEvidence) -> Finding:
        n = len(evidence.clients)
        known = np.array([m.alignment is not None for m in evidence.memories])
        p_values, reasons = np.ones(n), ["no history yet"] * n
        if known.sum() < 3:  # too few histories to tell a drop from the round's common drift
            return Finding(p_values, reasons)
        expected = np.array([m.alignment for m, k in zip(evidence.memories, known) if k])
        drop = expected - evidence.alignments[known]
        p_values[known] = np.where(drop > self.min_drop, upper_p(robust_z(drop)), 1.0)
        for i, e in zip(np.flatnonzero(known), expected):
            reasons[i] = f"cosine with the others' median update {evidence.alignments[i]:+.2f} (expected {e:+.2f})"
        return Finding(p_values, reasons)


class DependenceDetector(Detector):
    name = "dependence"
    # Similar hospitals do correlate (0.5-0.6 seen between honest sites); copies do far more.
    min_partial_correlation: ClassVar[float] = 0.8

    # Three or more near-copies explain each other away in partial correlations, so a
    # near-duplicate (plain correlation this high) is an edge too. Near-duplicate updates,
    # not only innovations: a large group (three boosted backdoor updates) pulls the
    # median, and every innovation of the hospitals it pulls away from then shares that
    # shift (seed 5: two honest hospitals at plain correlation 0.91, updates' cosine 0.75).
    min_correlation: ClassVar[float] = 0.9

    def inspect(self, evidence: RoundEvidence) -> Finding:
        n, k = evidence.innovations.shape
        partial = partial_correlations(evidence.innovations)
        plain = np.nan_to_num(np.corrcoef(evidence.innovations))
        near_identical = cosine_similarity(evidence.sketches) >= self.min_correlation
        copies = (np.abs(plain) >= self.min_correlation) & near_identical
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


class CraftedDetector(Detector):
    """Updates built from the others' coordinate-wise statistics (ALIE, Min-Max) sit inside
    the honest spread by construction, so distances and directions miss them. Their tell
    is regularity: they depart from the others' mean by the same number of standard
    deviations at every coordinate, where an honest hospital's departure varies in size
    and sign from one coordinate to the next."""

    name = "crafted"
    family = "fabricated"  # with data-span: was the update made rather than learnt?
    # Honest hospitals reach 2.3 in the benchmark's benign run, crafted updates 7.7-28;
    # below this floor a client's regularity is not evidence, however it ranks.
    min_regularity: ClassVar[float] = 4.0

    def inspect(self, evidence: RoundEvidence) -> Finding:
        n = len(evidence.clients)
        if evidence.measured.samples is None or n < 3:
            return Finding(np.ones(n), [""] * n)  # no coordinates, or no others to compare with
        units = [spread_units(evidence.measured.samples, i) for i in range(n)]
        regularity = np.array([spread_regularity(u) for u in units])
        z = robust_z(regularity)
        p_values = np.where(regularity > self.min_regularity, upper_p(z), 1.0)
        reasons = [f"departs from the others' mean by {np.median(u):+.2f} of their standard deviations at "
                   f"nearly every coordinate (regularity {r:.1f}; honest updates vary)" for u, r in zip(units, regularity)]
        return Finding(p_values, reasons)


class DataSpanDetector(Detector):
    """An update learnt from cases moves along what their gradients move. Its share of norm
    in the span of the validation ranking gradients is, in the benchmark, 14 to 28 times
    what an isotropic noise vector's would be, every round and for every hospital; a
    Gaussian-noise or random-direction update's is about 1, whatever its size. Such an
    update was made, not learnt (``server/guard_round.py``, ``data_span_ratios``).

    Relative to the other clients (a robust z of the log ratio, lower tail), and only
    below ``max_ratio``: hospitals training with DP-SGD all carry noise, and a hospital
    far above noise's share is learning, however it compares."""

    name = "data-span"
    family = "fabricated"
    # Noise's ratio is 1 +/- 0.11 (41 directions: sqrt of a chi-square over its degrees of
    # freedom); 3 is 18 of those from it, and 5 times under the lowest honest ratio seen.
    max_ratio: ClassVar[float] = 3.0

    def inspect(self, evidence: RoundEvidence) -> Finding:
        n, ratios = len(evidence.clients), evidence.measured.data_span_ratios
        if ratios is None or not np.isfinite(ratios).all():
            return Finding(np.ones(n), [""] * n)  # no validation gradients to compare with
        # Several under the floor are held to the learners: seed 10's three noise updates
        # stood at z -7.8 against all ten clients, at -15 against the seven learners.
        unlearnt = ratios < self.max_ratio
        p_values = np.where(unlearnt, outlier_upper_p(np.log(np.maximum(ratios, 1e-12)), unlearnt, side=-1.0), 1.0)
        reasons = [f"its update has {r:.1f}x the share of its norm along the validation gradients that noise "
                   f"would have (learnt updates: the round's median {np.median(ratios):.1f}x)" for r in ratios]
        return Finding(p_values, reasons)


def helpful_clients(findings: dict[str, Finding], *, min_pooled_help: float) -> np.ndarray:
    """Clients whose updates, this round's included, point with the validation ranking:
    over their recent rounds by at least ``min_pooled_help`` (pooled z), and this round's
    too (so a client that turns, or stops pointing anywhere, is not covered by its past)."""
    direction = findings.get("validation-direction")
    if direction is None or "pooled" not in direction.extra:
        return np.zeros(len(next(iter(findings.values())).p_values), dtype=bool)
    return (direction.extra["pooled"] <= -min_pooled_help) & (direction.extra["z"] < 0)


def excuse(findings: dict[str, Finding], helpful: np.ndarray, *, names: set[str] | None = None) -> dict[str, Finding]:
    """The findings with habit-only detectors' evidence (or that of the detectors ``names``)
    set aside for ``helpful`` clients.

    Why: once an honest hospital is flagged for a change of habit, its history stops
    learning, and its next rounds are compared with a stale forecast, so the flag feeds
    itself (seed 2, sign-flip with two attackers: hospital 08 flagged from round 2 to the
    end while its updates had a +0.27 cosine with the validation ranking). Only habit
    detectors are excused: a boosted or crafted update may point the right way too, and
    is caught by its size or regularity.
    """
    if not helpful.any():
        return findings
    return {name: Finding(np.where(helpful, 1.0, finding.p_values), finding.reasons,
                          {**finding.extra, "unexcused_p": finding.p_values})
            if (DETECTORS[name].habit_only if names is None else name in names) else finding
            for name, finding in findings.items()}


def combine_by_family(p_values: dict[str, np.ndarray], *, harm_share: float = 0.5) -> np.ndarray:
    """Per client, Bonferroni within each detector family, then a weighted Bonferroni across
    the families: the harm family (``intervention``) is tested at ``harm_share`` of the
    level, and the other families share the rest equally (weights fixed a priori, so the
    combination is a p-value whatever the data)."""
    families: dict[str, list[np.ndarray]] = {}
    for name, values in p_values.items():
        families.setdefault(DETECTORS[name].family or name, []).append(values)
    per_family = {family: np.minimum(1.0, np.min(members, axis=0) * len(members))
                  for family, members in families.items()}
    others = len(per_family) - (HARM_FAMILY in per_family)
    shares = {family: harm_share if family == HARM_FAMILY else (1.0 - harm_share) / others for family in per_family}
    total = sum(shares.values())  # under 1 where harm or the others are missing: plain Bonferroni then
    return np.minimum(1.0, np.min([p * total / shares[family] for family, p in per_family.items()], axis=0))


# The harm family registers itself on import; importing it here keeps one registry, complete
# for anyone who imports this module.
from server import harm_detectors  # noqa: E402,F401
