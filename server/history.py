"""Per-round, per-hospital metrics of a run, written to ``metrics.json`` after every round.

The file is replaced atomically (write, fsync, rename) so a crash never leaves half a file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.files import atomic_write_text
from common.provenance.records import json_safe

SiteMetrics = dict[str, float | str]


@dataclass
class RunHistory:
    """Collects what every hospital reported each round; optionally persists it."""

    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    on_round: Callable[[int, dict[str, SiteMetrics]], None] | None = None
    rounds: dict[int, dict[str, SiteMetrics]] = field(default_factory=dict)

    def record(self, server_round: int, site: str, metrics: SiteMetrics) -> None:
        self.rounds.setdefault(server_round, {}).setdefault(site, {}).update(metrics)

    def close_round(self, server_round: int) -> None:
        self.save()
        if self.on_round is not None:
            self.on_round(server_round, self.rounds.get(server_round, {}))

    def as_dict(self) -> dict[str, Any]:
        return json_safe({
            "meta": self.meta,
            "rounds": [{"round": r, "sites": self.rounds[r]} for r in sorted(self.rounds)],
        })

    def save(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, json.dumps(self.as_dict(), indent=1, sort_keys=True))


def load_history(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
