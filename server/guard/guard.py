"""The guard: every registered detector on every update, verdicts, and the influence bound.

A client is excluded when an excluding detector flags it, and down-weighted
(``GuardConfig.suspect_weight``) when only a down-weighting one does; every accepted update
is shortened to the round's bound (``GuardConfig.clip_ratio``), so no hospital, honest or
not, moves the model by more than a few typical updates. Nothing here looks at prevalence, scanner, size or
joining time except to allow for them: those are how honest hospitals differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.guard.config import GuardConfig
from server.guard.detectors import Direction
from server.guard.evidence import DirectionEvidence, Finding, GuardMemory, RoundView
from server.guard.maths import coordinate_sample, count_sketch, step_allowance
from server.guard.registry import DETECTORS


@dataclass(frozen=True)
class Verdict:
    client: str
    excluded: bool
    clip_scale: float  # 1: accepted as sent; below 1: shortened to the round's bound; 0: excluded
    findings: tuple[Finding, ...]

    @property
    def reasons(self) -> list[str]:
        return [f"{f.detector}: {f.reason}" for f in self.findings if f.flagged]

    def as_dict(self) -> dict[str, Any]:
        return {"client": self.client, "excluded": self.excluded, "clip_scale": self.clip_scale,
                "reasons": self.reasons, "findings": [f.as_dict() for f in self.findings]}


@dataclass(frozen=True)
class RoundJudgement:
    server_round: int
    verdicts: list[Verdict]
    detectors: dict[str, str]  # what each detector judged on, or why it was off
    median_norm: float

    @property
    def excluded(self) -> list[str]:
        return [v.client for v in self.verdicts if v.excluded]

    @property
    def edges(self) -> list[dict[str, str]]:
        """The dependency graph's edges this round: which update was computed from what."""
        return [{"from": f.source, "to": v.client, "detector": f.detector}
                for v in self.verdicts for f in v.findings if f.source is not None]

    def as_dict(self) -> dict[str, Any]:
        return {"round": self.server_round, "excluded": self.excluded, "detectors": self.detectors,
                "median_update_length": self.median_norm, "edges": self.edges,
                "verdicts": [v.as_dict() for v in self.verdicts]}


@dataclass
class Guard:
    """Thin state holder: the configuration and the memory; the detectors do the judging."""

    config: GuardConfig = field(default_factory=GuardConfig)
    seed: int = 0
    memory: GuardMemory = field(default_factory=GuardMemory)

    def sketch(self, delta: np.ndarray) -> np.ndarray:
        return count_sketch(delta, size=self.config.sketch_size, seed=self.seed)

    def sample(self, delta: np.ndarray) -> np.ndarray:
        return coordinate_sample(delta, size=self.config.sample_size, seed=self.seed)

    def judge(
        self,
        server_round: int,
        clients: list[str],
        sketches: np.ndarray,
        samples: np.ndarray,
        norms: np.ndarray,
        steps: np.ndarray,
        *,
        direction: DirectionEvidence | None = None,
        private: bool = False,
    ) -> RoundJudgement:
        """Verdicts for this round's clients; commits what the memory keeps of the round."""
        view = RoundView(server_round, list(clients), sketches, samples, np.asarray(norms, dtype=np.float64),
                         np.asarray(steps, dtype=np.float64), self.memory, direction, private)
        per_client: list[list[Finding]] = [[] for _ in clients]
        ran: dict[str, str] = {}
        for name, detector_class in DETECTORS.items():
            detector = detector_class()
            off = detector.unavailable(view, self.config) if len(clients) >= self.config.min_clients else \
                f"off: fewer than {self.config.min_clients} updates"
            if off is not None:
                ran[name] = off
                continue
            for i, finding in enumerate(detector.inspect(view, self.config)):
                per_client[i].append(finding)
            ran[name] = detector.basis(view)
        median = float(np.median(view.norms)) if len(clients) else 0.0
        bounds = self.config.clip_ratio * median * step_allowance(view.steps) if len(clients) else np.zeros(0)
        verdicts = []
        for i, client in enumerate(clients):
            excluded = any(f.flagged and DETECTORS[f.detector].excludes for f in per_client[i])
            weight = min((f.weight for f in per_client[i]), default=1.0)
            if any(f.flagged and not DETECTORS[f.detector].excludes for f in per_client[i]):
                weight *= self.config.suspect_weight
            scale = 0.0 if excluded else weight * min(1.0, float(bounds[i]) / max(float(view.norms[i]), 1e-300))
            verdicts.append(Verdict(client, excluded, scale, tuple(per_client[i])))
        self._remember(view, verdicts)
        return RoundJudgement(server_round, verdicts, ran, median)

    def _remember(self, view: RoundView, verdicts: list[Verdict]) -> None:
        memory = self.memory
        scores = Direction.round_scores(view, self.config) if view.direction is not None else None
        for i, verdict in enumerate(verdicts):
            record = memory.record(verdict.client)
            if not verdict.excluded:
                record.accepted_round, record.accepted_sketch = view.server_round, view.sketches[i].copy()
            if scores is not None and math.isfinite(scores[i]):
                record.direction_z.append(float(scores[i]))  # evidence adds up whatever the verdict
        memory.previous_round = view.server_round
        memory.previous = {c: view.sketches[i].copy() for i, c in enumerate(view.clients)}
