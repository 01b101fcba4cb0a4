"""Flower glue: from a round's train replies to what the guard measures, and back.

Updates are measured one at a time (sketch, coordinate sample, length, local steps), so
the guard never holds more than one full-length update; accepted updates that exceed the
round's bound are shortened array by array.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Message

from common.files import atomic_write_text
from common.protocol import ARRAYS_KEY, METRICS_KEY
from server.arrays import flatten, scaled_update
from server.guard.guard import Guard, RoundJudgement

ANOMALY_DIR = "anomalies"


def local_steps(reply: Message) -> float:
    """The optimizer steps a hospital reports for its local training (1 if it says none)."""
    metrics = reply.content.metric_records[METRICS_KEY]
    return float(metrics.get("train-steps", 1.0))


def measure_replies(
    guard: Guard, replies: list[Message], sent: ArrayRecord
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per reply: the update's sketch and coordinate sample, its length and local steps."""
    names = list(sent)
    start = flatten(sent, names)
    sketches, samples, norms = [], [], []
    for reply in replies:
        delta = flatten(reply.content.array_records[ARRAYS_KEY], names) - start
        sketches.append(guard.sketch(delta))
        samples.append(guard.sample(delta))
        norms.append(float(np.linalg.norm(delta)))
    steps = np.array([local_steps(r) for r in replies])
    return np.stack(sketches), np.stack(samples), np.array(norms), steps


def apply_judgement(judgement: RoundJudgement, replies: list[Message], sent: ArrayRecord) -> list[Message]:
    """The accepted replies, each shortened to the round's bound where it exceeded it."""
    kept = []
    for reply, verdict in zip(replies, judgement.verdicts):
        if verdict.excluded:
            continue
        if verdict.clip_scale < 1.0:
            record = reply.content.array_records[ARRAYS_KEY]
            reply.content.array_records[ARRAYS_KEY] = scaled_update(record, sent, verdict.clip_scale)
        kept.append(reply)
    return kept


def write_round_report(folder: Path, judgement: RoundJudgement) -> Path:
    """``anomalies/round-NNN.json``: every verdict with every detector's finding."""
    path = Path(folder) / ANOMALY_DIR / f"round-{judgement.server_round:03d}.json"
    atomic_write_text(path, json.dumps(judgement.as_dict(), indent=1))
    return path


def read_round_reports(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(folder) / ANOMALY_DIR).glob("round-*.json"))]
