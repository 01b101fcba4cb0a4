"""The server's state after each completed round, so a crashed federation can resume.

Written atomically (temp file, fsync, rename) after the round's metrics and provenance
record: on disk there is always a complete state for the last round that finished.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from common.files import atomic_write_bytes

STATE_FILE = "server-state.npz"
META_KEY = "__meta__"


class ResumeError(RuntimeError):
    """A run folder that cannot be resumed; the message says why."""


@dataclass
class ServerState:
    completed_round: int
    arrays: dict[str, np.ndarray]
    retired_sites: list[str] = field(default_factory=list)
    sampler_state: Any = None
    # The statistics the next round broadcasts (mean risk, prevalence, prototypes...):
    # without them a resumed round would train on another objective than the original.
    federation_statistics: dict[str, np.ndarray] = field(default_factory=dict)
    # The guard's memory (each client's last accepted update, its direction scores, last
    # round's updates): without it a resumed run would judge as if it had just started.
    guard_memory: dict[str, Any] = field(default_factory=dict)

    def to_arrayrecord(self) -> ArrayRecord:
        return ArrayRecord({name: Array(value) for name, value in self.arrays.items()})

    @staticmethod
    def numpy_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
        return {name: array.numpy() for name, array in record.items()}

    def save(self, path: Path) -> None:
        meta = {"completed_round": self.completed_round, "retired_sites": self.retired_sites,
                "sampler_state": self.sampler_state,
                "federation_statistics": {k: np.asarray(v).tolist() for k, v in self.federation_statistics.items()},
                "guard_memory": self.guard_memory}
        buffer = io.BytesIO()
        np.savez(buffer, **self.arrays, **{META_KEY: np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)})
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> ServerState:
        if not path.is_file():
            raise ResumeError(f"no server state at {path}: the run finished no round, start it afresh")
        with np.load(path, allow_pickle=False) as saved:
            meta = json.loads(saved[META_KEY].tobytes().decode())
            arrays = {name: saved[name] for name in saved.files if name != META_KEY}
        statistics = {k: np.asarray(v, dtype=np.float64) for k, v in meta.get("federation_statistics", {}).items()}
        return cls(meta["completed_round"], arrays, meta["retired_sites"], _as_tuples(meta["sampler_state"]), statistics,
                   meta.get("guard_memory", {}))


def _as_tuples(value: Any) -> Any:
    # random.Random.setstate wants the tuples JSON turned into lists back.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def load_resume_point(run_dir: Path) -> tuple[ServerState, list[dict[str, Any]]]:
    """The last completed round's state and the metrics rounds up to it. Rounds past the
    state were cut short by the crash: they are run again, so their metrics are dropped."""
    state = ServerState.load(run_dir / STATE_FILE)
    metrics = run_dir / "metrics.json"
    rounds = json.loads(metrics.read_text())["rounds"] if metrics.is_file() else []
    return state, [r for r in rounds if r["round"] <= state.completed_round]
