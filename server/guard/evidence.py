"""What the guard sees of a round and remembers of past ones, and what a detector finds.

Plain typed data. The detectors (``detectors.py``) read a ``RoundView`` and return one
``Finding`` per client; the guard (``guard.py``) keeps the ``GuardMemory``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DirectionEvidence:
    """Per client: cosine of its update with honest training on the reference cases (less
    the direction a prevalence moves an update), and the error of that cosine."""

    cosines: np.ndarray
    errors: np.ndarray
    cases: int  # reference cases it was measured on
    source: str = "the reference set"  # which cases, for reports (file and hash)


@dataclass
class RoundView:
    """Everything the detectors may use, for one round's clients (same order everywhere)."""

    server_round: int
    clients: list[str]
    sketches: np.ndarray  # (n, k) CountSketches of the updates
    samples: np.ndarray  # (n, m) the same m coordinates of every update
    norms: np.ndarray  # exact update lengths
    steps: np.ndarray  # local optimizer steps each hospital reports
    memory: GuardMemory
    direction: DirectionEvidence | None = None
    private: bool = False  # hospitals train with DP-SGD

    def others(self, index: int) -> np.ndarray:
        return np.arange(len(self.clients)) != index


@dataclass(frozen=True)
class Finding:
    """One detector's word on one client this round."""

    detector: str
    client: str
    flagged: bool
    value: float  # the statistic, in the units of ``threshold``
    threshold: float
    reason: str  # one line, for people
    weight: float = 1.0  # the share of its update this finding lets count (copies count once)
    source: str | None = None  # what its update was computed from, when the finding says so (an edge)

    def as_dict(self) -> dict[str, Any]:
        value = self.value if math.isfinite(self.value) else None
        return {"detector": self.detector, "flagged": self.flagged, "value": value,
                "threshold": self.threshold, "reason": self.reason, "weight": self.weight, "source": self.source}


@dataclass
class ClientRecord:
    """What the guard keeps of one client: its last accepted update (sketch) and when, and
    its recent direction scores."""

    accepted_round: int | None = None
    accepted_sketch: np.ndarray | None = None
    direction_z: deque = field(default_factory=lambda: deque(maxlen=50))

    def as_dict(self) -> dict[str, Any]:
        return {"accepted_round": self.accepted_round,
                "accepted_sketch": None if self.accepted_sketch is None else self.accepted_sketch.tolist(),
                "direction_z": list(self.direction_z)}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> ClientRecord:
        sketch = saved.get("accepted_sketch")
        record = cls(saved.get("accepted_round"), None if sketch is None else np.asarray(sketch, dtype=np.float64))
        record.direction_z.extend(float(z) for z in saved.get("direction_z", []))
        return record


@dataclass
class GuardMemory:
    """The guard's state across rounds: per client, and last round's sketches (replays)."""

    clients: dict[str, ClientRecord] = field(default_factory=dict)
    previous_round: int | None = None
    previous: dict[str, np.ndarray] = field(default_factory=dict)

    def record(self, client: str) -> ClientRecord:
        return self.clients.setdefault(client, ClientRecord())

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values: a resumed run's guard remembers what this one did."""
        return {"clients": {c: r.as_dict() for c, r in self.clients.items()},
                "previous_round": self.previous_round,
                "previous": {c: s.tolist() for c, s in self.previous.items()}}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> GuardMemory:
        return cls({c: ClientRecord.from_dict(r) for c, r in saved.get("clients", {}).items()},
                   saved.get("previous_round"),
                   {c: np.asarray(s, dtype=np.float64) for c, s in saved.get("previous", {}).items()})
