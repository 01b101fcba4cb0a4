"""The guard's detectors, one small class each (registered in ``registry.py``).

Each asks one question that an honest hospital's heterogeneity cannot answer "yes": a
sicker, smaller, later or differently scanned hospital trains on its own cases with the
federation's recipe, so its update is learnt (not noise, not idle, not a copy, not built
from the others' statistics, not their consensus reversed), no longer than its local steps
explain, and continuous with its own past. What a prevalence or a scanner does to an
update's direction relative to the others is never evidence on its own: in the benchmark's
benign worlds an honest hospital whose cases do not carry the federation's shortcut points
against the others' mean in every round (cosine -0.7). Direction is judged only against
honest training on the server's reference cases, when it holds some.

Each detector returns one ``Finding`` per client: the statistic, the threshold it was held
to (``GuardConfig``), whether it flagged, and why in one line.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from server.guard.config import GuardConfig
from server.guard.evidence import Finding, RoundView
from server.guard.maths import (
    cosine,
    pairwise_distances,
    span_share_over_chance,
    spread_regularity,
    step_allowance,
    stouffer,
)


# The node of the dependency graph standing for the other hospitals' statistics.
CONSENSUS = "others' statistics"


class Detector(ABC):
    name: ClassVar[str]
    question: ClassVar[str]  # what it asks, for reports
    # Whether a flag excludes the update (True) or only down-weights it (``suspect_weight``):
    # a detector excludes only on evidence no honest heterogeneity produced on held-out cases.
    excludes: ClassVar[bool] = True

    def unavailable(self, view: RoundView, config: GuardConfig) -> str | None:
        """Why this detector cannot judge this round (None: it can)."""
        return None

    @abstractmethod
    def inspect(self, view: RoundView, config: GuardConfig) -> list[Finding]: ...

    def basis(self, view: RoundView) -> str:
        """What it judged this round, for the report and the provenance log."""
        return f"ran on {len(view.clients)} updates"

    def _findings(self, view: RoundView, values, flagged, threshold: float, reasons, *,
                  source: str | None = None) -> list[Finding]:
        """One finding per client; ``source`` names what a flagged update was computed from."""
        return [Finding(self.name, client, bool(f), float(v), threshold, reason, source=source if f else None)
                for client, v, f, reason in zip(view.clients, values, flagged, reasons)]


class Idle(Detector):
    name = "idle"
    question = "did it train at all (free-riders send the model back)?"

    def inspect(self, view, config):
        ratios = view.norms / max(float(np.median(view.norms)), 1e-300)
        reasons = [f"update length {r:.3g}x the round's median (idle below {config.idle_ratio:g}x)" for r in ratios]
        return self._findings(view, ratios, ratios < config.idle_ratio, config.idle_ratio, reasons)


class Boosted(Detector):
    name = "boosted"
    question = "is its update longer than its local training explains (model replacement)?"

    def inspect(self, view, config):
        ratios = view.norms / max(float(np.median(view.norms)), 1e-300) / step_allowance(view.steps)
        reasons = [f"update length {r:.2f}x the round's median for its local steps (boosted above "
                   f"{config.boost_ratio:g}x)" for r in ratios]
        return self._findings(view, ratios, ratios > config.boost_ratio, config.boost_ratio, reasons)


class Unlearnt(Detector):
    name = "unlearnt"
    question = "was it learnt from cases like the others' (noise is not)?"
    # Down-weights only: on the held-out benign cases a 10x larger hospital and a hospital
    # of a 5-hospital federation late in training fell under the share too.
    excludes = False

    def unavailable(self, view, config):
        if view.private:
            return "off: hospitals train with DP-SGD, whose noise is a random direction too"
        if len(view.clients) < config.min_clients:
            return f"off: fewer than {config.min_clients} updates"
        return None

    def inspect(self, view, config):
        values = np.array([span_share_over_chance(view.sketches[i], view.sketches[view.others(i)])
                           for i in range(len(view.clients))])
        reasons = [f"{v:.1f}x a random direction's share of its length in the span of the other updates "
                   f"(unlearnt below {config.unlearnt_share:g}x)" for v in values]
        return self._findings(view, values, values < config.unlearnt_share, config.unlearnt_share, reasons)


class Copy(Detector):
    """A near-copy of another hospital's update, this round or the last.

    A copy of last round's update is a replay: flagged. Within a round a copy group cannot
    say who copied whom: a member whose update continues its own last accepted update more
    closely than the others' continue theirs is the original, and the rest are flagged;
    where that cannot be told (no history, or a mimic that copied from the start), nobody
    is excluded and the group counts once (each member at 1 / its size)."""

    name = "copy"
    question = "is it a replay or a copy of another hospital's update?"

    def unavailable(self, view, config):
        return None if len(view.clients) >= 2 or view.memory.previous else "off: a single update"

    def basis(self, view):
        if not view.memory.previous:
            return super().basis(view)
        return f"ran on {len(view.clients)} updates and {len(view.memory.previous)} of round {view.memory.previous_round}"

    def inspect(self, view, config):
        n, lengths = len(view.clients), np.linalg.norm(view.sketches, axis=1)
        now = pairwise_distances(view.sketches) / np.maximum(np.maximum.outer(lengths, lengths), 1e-300)
        np.fill_diagonal(now, np.inf)
        values, partners, replayed = np.full(n, np.inf), [""] * n, np.zeros(n, dtype=bool)
        sources: list[str | None] = [None] * n
        for i, client in enumerate(view.clients):
            if n >= 2:
                j = int(np.argmin(now[i]))
                values[i], partners[i], sources[i] = now[i, j], f"{view.clients[j]}'s update this round", view.clients[j]
            for other, sketch in view.memory.previous.items():
                if other == client:
                    continue
                distance = float(np.linalg.norm(view.sketches[i] - sketch)) / max(lengths[i], np.linalg.norm(sketch), 1e-300)
                if distance < values[i]:
                    values[i], partners[i] = distance, f"{other}'s update of round {view.memory.previous_round}"
                    replayed[i], sources[i] = True, f"{other} (round {view.memory.previous_round})"
        flagged, weights = replayed & (values < config.copy_distance), np.ones(n)
        for group in _copy_groups(now < config.copy_distance):
            continuity = np.sort([_continuity(view, i, config) for i in group])[::-1]
            if continuity[0] - continuity[1] >= config.copy_distance:  # one continues its past clearly best
                original = group[int(np.argmax([_continuity(view, i, config) for i in group]))]
                flagged[[i for i in group if i != original]] = True
            else:
                weights[group] = 1.0 / len(group)
        reasons = [f"{v:.3f} of its length from {p} (a copy below {config.copy_distance:g})"
                   + (f"; cannot tell who copied whom: counted once (x{w:.2g})" if w < 1 else "")
                   if p else "no other update" for v, p, w in zip(values, partners, weights)]
        close = values < config.copy_distance
        return [Finding(self.name, c, bool(f), float(v), config.copy_distance, r, float(w), s if near else None)
                for c, v, f, r, w, s, near in zip(view.clients, values, flagged, reasons, weights, sources, close)]


def _copy_groups(close: np.ndarray) -> list[list[int]]:
    """Connected groups of two or more clients linked by near-copies."""
    seen, groups = set(), []
    for start in range(len(close)):
        if start in seen or not close[start].any():
            continue
        group, frontier = [], [start]
        while frontier:
            i = frontier.pop()
            if i in seen:
                continue
            seen.add(i)
            group.append(i)
            frontier.extend(int(j) for j in np.flatnonzero(close[i]) if j not in seen)
        groups.append(sorted(group))
    return groups


def _continuity(view: RoundView, index: int, config: GuardConfig) -> float:
    """Cosine of a client's update with its own last accepted one; -2 (below any cosine)
    without a recent one."""
    record = view.memory.clients.get(view.clients[index])
    if record is None or record.accepted_sketch is None or record.accepted_round is None:
        return -2.0
    if view.server_round - record.accepted_round > config.reversal_memory:
        return -2.0
    return cosine(view.sketches[index], record.accepted_sketch)


class Mirror(Detector):
    name = "mirror"
    question = "is it the other hospitals' consensus reversed (inner-product manipulation)?"

    def unavailable(self, view, config):
        return None if len(view.clients) >= config.min_clients else f"off: fewer than {config.min_clients} updates"

    def inspect(self, view, config):
        values = np.array([cosine(view.sketches[i], view.sketches[view.others(i)].mean(axis=0))
                           for i in range(len(view.clients))])
        reasons = [f"cosine {v:+.2f} with the others' mean update (their consensus reversed at or below "
                   f"-{config.mirror_cosine:g})" for v in values]
        return self._findings(view, values, values <= -config.mirror_cosine, -config.mirror_cosine, reasons,
                              source=CONSENSUS)


class Crafted(Detector):
    name = "crafted"
    question = "was it computed from the others' coordinate-wise statistics (ALIE, Min-Max)?"
    # Down-weights only: on the held-out benign cases an honest hospital of prevalence 0.95
    # among five reached the regularity (their standard deviations, from four updates, are rough).
    excludes = False

    def unavailable(self, view, config):
        needed = config.min_clients + 1
        return None if len(view.clients) >= needed else f"off: fewer than {needed} updates"

    def inspect(self, view, config):
        values = np.array([spread_regularity(view.samples, i) for i in range(len(view.clients))])
        reasons = [f"departs from the others' mean by the same number of their standard deviations at nearly "
                   f"every coordinate (regularity {v:.1f}; crafted at or above {config.crafted_regularity:g})"
                   for v in values]
        return self._findings(view, values, values >= config.crafted_regularity, config.crafted_regularity, reasons,
                              source=CONSENSUS)


class Reversal(Detector):
    name = "reversal"
    question = "did it turn against its own recent training (a hospital that behaved, then strikes)?"

    def basis(self, view):
        return "ran on each hospital's own accepted updates"

    def inspect(self, view, config):
        n = len(view.clients)
        values, reasons = np.full(n, np.nan), ["no accepted update of its own in recent rounds"] * n
        for i, client in enumerate(view.clients):
            record = view.memory.clients.get(client)
            if record is None or record.accepted_sketch is None or record.accepted_round is None:
                continue
            if view.server_round - record.accepted_round > config.reversal_memory:
                continue
            values[i] = cosine(view.sketches[i], record.accepted_sketch)
            reasons[i] = (f"cosine {values[i]:+.2f} with its own accepted update of round {record.accepted_round} "
                          f"(reversed at or below -{config.reversal_cosine:g})")
        flagged = np.nan_to_num(values, nan=1.0) <= -config.reversal_cosine
        return self._findings(view, values, flagged, -config.reversal_cosine, reasons)


class Direction(Detector):
    """Against the server's reference cases: does the update point with or against what
    honest local training on them does (FLTrust's question), once the direction a
    prevalence moves an update is taken out? Scored per round in units of the references'
    jackknife error and an honest wobble, pooled over the client's recent rounds."""

    name = "direction"
    question = "does it point against what honest training on the reference cases does?"
    # Down-weights only: on the held-out benign cases an honest hospital of prevalence 0.95
    # pointed against training on the (prevalence 0.5) reference cases for six rounds.
    excludes = False

    def unavailable(self, view, config):
        return None if view.direction is not None else "off: no reference set (data-free mode)"

    def basis(self, view):
        return f"ran on {view.direction.source}"

    def inspect(self, view, config):
        evidence = view.direction
        round_z = self.round_scores(view, config)
        values, reasons = np.zeros(len(view.clients)), []
        for i, client in enumerate(view.clients):
            past = list(view.memory.clients.get(client).direction_z) if client in view.memory.clients else []
            window = [*past[-(config.direction_window - 1):], float(round_z[i])] if config.direction_window > 1 else \
                [float(round_z[i])]
            values[i] = stouffer(window)
            reasons.append(f"cosine {evidence.cosines[i]:+.2f} +/- {evidence.errors[i]:.2f} with honest training on "
                           f"{evidence.cases} reference cases; z {values[i]:+.1f} over {len(window)} rounds "
                           f"(against at or above {config.direction_z:g})")
        return self._findings(view, values, values >= config.direction_z, config.direction_z, reasons)

    @staticmethod
    def round_scores(view: RoundView, config: GuardConfig) -> np.ndarray:
        """This round's z per client (> 0: against), as the memory keeps them."""
        assert view.direction is not None
        return np.clip(-view.direction.cosines / np.hypot(view.direction.errors, config.direction_wobble), -6.0, 6.0)
