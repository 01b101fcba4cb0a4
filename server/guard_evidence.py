"""What the guard knows of each round and each client: the clients' memories (forecasts from
their accepted history), what the server measured of their updates, and a detector's finding.

Plain data with the small maths that updates it; the detectors (``server/detectors.py``)
read it, the guard (``server/guard.py``) builds and keeps it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from server.guard_stats import stouffer

def _ewma(old: Any, new: Any, smoothing: float) -> Any:
    return new if old is None else (1 - smoothing) * old + smoothing * new


@dataclass
class ClientMemory:
    """What the guard remembers of one client: only rounds in which it was accepted."""

    residual: np.ndarray | None = None  # EWMA forecast of its departure from the consensus
    log_norm: float | None = None  # EWMA forecast of its update's log-norm
    alignment: float | None = None  # EWMA forecast of its cosine with the consensus
    recent_flags: deque = field(default_factory=lambda: deque(maxlen=3))
    recent_p: deque = field(default_factory=lambda: deque(maxlen=3))  # combined p-values of its last rounds
    solo_change: float | None = None  # EWMA forecast of its model-alone AUROC change, less the round's median
    log_surprise: float | None = None  # EWMA of how far it usually departs from its own forecast (log)
    past_z: dict[str, deque] = field(default_factory=dict)  # per accumulating detector: its z of past rounds

    def z_history(self, detector: str) -> deque:
        return self.past_z.setdefault(detector, deque(maxlen=4))

    def remember(
        self, *, residual: np.ndarray, log_norm: float, alignment: float, log_surprise: float | None,
        smoothing: float, trust: float,
    ) -> None:
        """Move every forecast towards this round's value (exponentially weighted).

        A first round teaches the departure from the consensus ``trust`` of the way from
        none. The norm is taught first by a fully trusted round: until then the yardstick
        stays the round's typical norm. Three boosted backdoor updates, down-weighted in
        round 1, had otherwise made the boosted norm their own yardstick from round 2 on
        (seed 5, never caught); taught half way, their round-2 magnitude evidence was still
        halved (seed 9: p 2e-2 against 9e-4 in round 1), and they stayed in at half weight.
        """
        self.residual = trust * residual if self.residual is None else _ewma(self.residual, residual, smoothing)
        if self.log_norm is not None:
            self.log_norm = _ewma(self.log_norm, log_norm, smoothing)
        elif trust >= 1.0:
            self.log_norm = log_norm
        self.alignment = _ewma(self.alignment, alignment, smoothing)
        if log_surprise is not None:
            self.log_surprise = _ewma(self.log_surprise, log_surprise, smoothing)

    def remember_solo_change(self, solo_change: float, *, smoothing: float) -> None:
        """Move the forecast of how its model alone ranks the validation cases (relative to
        the round's median) towards this round's, whatever the verdict.

        Why every round: how a hospital's cases rank the validation set is a trait of the
        hospital, as its prevalence is, and solo ranking asks only whether that changed.
        Seed 5: an honest hospital whose model alone always ranked 0.08-0.11 below the
        round's median was flagged in round 1, so its forecast stayed at zero and it was
        flagged for the same trait in every later round. The evidence of round 1 is not
        lost: its z stays in the client's sum over rounds. Persistent harm is for
        ``validation-direction``, which is judged against zero, not a history.
        """
        self.solo_change = _ewma(self.solo_change, solo_change, smoothing)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values, so that a resumed run's guard remembers what this one did."""
        return {"residual": None if self.residual is None else self.residual.tolist(),
                "log_norm": self.log_norm, "alignment": self.alignment, "solo_change": self.solo_change,
                "log_surprise": self.log_surprise,
                "recent_flags": list(self.recent_flags), "recent_p": list(self.recent_p),
                "past_z": {name: list(z) for name, z in self.past_z.items()}}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> ClientMemory:
        memory = cls(residual=None if saved["residual"] is None else np.asarray(saved["residual"], dtype=np.float64),
                     log_norm=saved["log_norm"], alignment=saved["alignment"], solo_change=saved["solo_change"],
                     log_surprise=saved["log_surprise"])
        memory.recent_flags.extend(bool(f) for f in saved["recent_flags"])
        memory.recent_p.extend(float(p) for p in saved["recent_p"])
        # States saved before more than one detector accumulated kept only solo-ranking's.
        for name, values in saved.get("past_z", {"solo-ranking": saved.get("ranking_z", [])}).items():
            memory.z_history(name).extend(float(z) for z in values)
        return memory


@dataclass
class Measurements:
    """What the server measured of each client's update besides its sketch (same order as
    the clients; None where it was not measured, e.g. without a validation set)."""

    loo_effects: np.ndarray | None = None  # validation loss without the client minus with everyone
    solo_auroc_changes: np.ndarray | None = None  # validation AUROC of its model alone minus the start's
    ranking_alignments: np.ndarray | None = None  # cosine with the validation ranking's descent direction
    ranking_errors: np.ndarray | None = None  # their bootstrap standard errors
    reference_alignments: np.ndarray | None = None  # cosine with the server's balanced reference training
    reference_errors: np.ndarray | None = None  # their jackknife standard errors over the references
    data_span_ratios: np.ndarray | None = None  # share of its norm along validation gradients, over noise's share
    samples: np.ndarray | None = None  # (n, m): the same m coordinates of every update, unmixed

    def subset(self, indices: np.ndarray) -> Measurements:
        return Measurements(**{f.name: None if (v := getattr(self, f.name)) is None else v[indices]
                               for f in fields(self)})


@dataclass
class RoundEvidence:
    """Everything the detectors may use, for the clients of one round (same order)."""

    clients: list[str]
    sketches: np.ndarray  # (n, k)
    residuals: np.ndarray  # departures from the coordinate-wise median
    innovations: np.ndarray  # residuals minus each client's forecast
    log_surprises: np.ndarray  # log-norm of each innovation
    log_norms: np.ndarray
    alignments: np.ndarray  # cosine of each update with the median of the others'
    memories: list[ClientMemory]
    measured: Measurements


@dataclass
class Finding:
    p_values: np.ndarray
    reasons: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def pooled_over_rounds(memories: list[ClientMemory], detector: str, z: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Per client, Stouffer's sum of ``detector``'s past scores and this round's ``z``, and
    how many rounds it holds: a NaN score (no measurement) is left out, not counted as 0."""
    rounds = [[v for v in (*m.z_history(detector), value) if math.isfinite(v)] for m, value in zip(memories, z)]
    return np.array([stouffer(r) for r in rounds]), [len(r) for r in rounds]


