"""Glue between Flower replies and the guard: flatten updates, leave-one-out on the server's
validation set, per-round anomaly reports (JSON)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, Message

from common.data import Split
from common.files import atomic_write_text
from common.metrics import auroc
from common.protocol import ARRAYS_KEY, METRICS_KEY
from server.guard import CausalGuard, Verdict

ANOMALY_DIR = "anomalies"


def flatten(record: ArrayRecord, names: list[str] | None = None) -> np.ndarray:
    """One float64 vector of the record's arrays, in ``names`` order (default: its own)."""
    return np.concatenate([record[name].numpy().astype(np.float64).ravel() for name in names or list(record)])


def unflatten(vector: np.ndarray, names: list[str], shapes: list[tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The inverse of ``flatten``: named arrays of the given shapes."""
    arrays, offset = {}, 0
    for name, shape in zip(names, shapes):
        size = int(np.prod(shape, dtype=np.int64))
        arrays[name] = vector[offset : offset + size].reshape(shape)
        offset += size
    return arrays


def as_record(vector: np.ndarray, like: ArrayRecord) -> ArrayRecord:
    """A flat vector back into a record shaped (names, shapes, dtypes) like ``like``."""
    names = list(like)
    arrays = unflatten(vector, names, [tuple(like[name].shape) for name in names])
    return ArrayRecord({name: Array(arrays[name].astype(like[name].numpy().dtype)) for name in names})


def bounded_update(vector: np.ndarray, start: np.ndarray, *, max_norm: float) -> np.ndarray:
    """The model ``vector`` with its update (``vector - start``) shrunk to at most ``max_norm``."""
    delta = vector - start
    norm = float(np.linalg.norm(delta))
    return vector if norm <= max_norm else start + delta * (max_norm / norm)


@dataclass
class ValidationProbe:
    """The server's small clean validation set, and how to score a flat parameter vector."""

    split: Split
    build_model: Callable[[], torch.nn.Module]

    def _logits(self, flat: np.ndarray, names: list[str], shapes: list[tuple[int, ...]]) -> torch.Tensor:
        model = self.build_model()
        arrays = unflatten(flat, names, shapes)
        model.load_state_dict({name: torch.as_tensor(value, dtype=torch.float32) for name, value in arrays.items()})
        model.eval()
        with torch.no_grad():
            return model(torch.as_tensor(self.split.images, dtype=torch.float32))

    def loss(self, flat: np.ndarray, names: list[str], shapes: list[tuple[int, ...]]) -> float:
        logits = self._logits(flat, names, shapes)
        return float(F.binary_cross_entropy_with_logits(logits, torch.as_tensor(self.split.labels).float()))

    def auroc(self, flat: np.ndarray, names: list[str], shapes: list[tuple[int, ...]]) -> float:
        return auroc(labels=self.split.labels, scores=self._logits(flat, names, shapes).numpy())


def leave_one_out_effects(
    vectors: np.ndarray, weights: np.ndarray, probe: ValidationProbe, names: list[str], shapes: list[tuple[int, ...]]
) -> tuple[np.ndarray, float]:
    """Validation loss of the aggregate without each client, minus with all of them."""
    total = weights @ vectors
    everyone = probe.loss(total / weights.sum(), names, shapes)
    effects = np.array([
        probe.loss((total - w * v) / (weights.sum() - w), names, shapes) - everyone
        for v, w in zip(vectors, weights)
    ])
    return effects, everyone


def solo_auroc_changes(
    vectors: np.ndarray, start: np.ndarray, probe: ValidationProbe, names: list[str], shapes: list[tuple[int, ...]]
) -> np.ndarray:
    """Validation AUROC of each client's model alone minus that of the model it started from.

    A ranking measure: a hospital whose prevalence differs moves the bias, and with it the
    log-loss, but not the ranking; flipped labels or a flipped update reverse the ranking.
    """
    before = probe.auroc(start, names, shapes)
    return np.array([probe.auroc(v, names, shapes) - before for v in vectors])


def guard_replies(
    guard: CausalGuard,
    replies: list[Message],
    global_arrays: ArrayRecord,
    sites: list[str],
    probe: ValidationProbe | None,
) -> tuple[list[Verdict], dict]:
    names = list(global_arrays.keys())
    shapes = [tuple(global_arrays[name].shape) for name in names]
    start = flatten(global_arrays, names)
    vectors = np.stack([flatten(r.content.array_records[ARRAYS_KEY], names) for r in replies])
    sketches = np.stack([guard.sketch(v - start) for v in vectors])
    samples = np.stack([guard.sample(v - start) for v in vectors])
    weights = np.array([float(r.content.metric_records[METRICS_KEY]["num-examples"]) for r in replies])
    effects, alone, base = (None, None, None)
    if probe is not None:
        effects, base = leave_one_out_effects(vectors, weights, probe, names, shapes)
        alone = solo_auroc_changes(vectors, start, probe, names, shapes)
    verdicts, graph = guard.judge(sites, sketches, effects, alone, samples)
    graph["validation_loss"] = base
    return verdicts, graph


def write_anomaly_report(folder: Path, server_round: int, verdicts: list[Verdict], graph: dict) -> Path:
    path = folder / ANOMALY_DIR / f"round-{server_round:03d}.json"
    body = {
        "round": server_round,
        "flagged": [v.client for v in verdicts if v.flagged],
        "verdicts": [v.as_dict() for v in verdicts],
        "edges": [{"a": a, "b": b, "partial_correlation": w} for a, b, w in graph.get("edges", [])],
        "set_aside": graph.get("set_aside", []),  # judged first, then left out of the others' yardsticks
        "validation_loss": graph.get("validation_loss"),
    }
    atomic_write_text(path, json.dumps(body, indent=1))
    return path
