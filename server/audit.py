"""What the server writes to the provenance log, and how hospitals receive checkpoints.

One record at run start (code, configuration, participants and their registered
identities), one per round (who trained, SHA-256 of every update and of the aggregate,
verdicts, metrics, DP accounting inputs) and one at the end. After each record the signed
checkpoint goes to every hospital, which keeps it: a later rewrite of the log by whoever
holds the signing key no longer matches what the hospitals hold.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log as flwr_log

from common.protocol import ARRAYS_KEY, CHECKPOINT_KEY, METRICS_KEY, SiteProfile
from common.provenance.log import ProvenanceLog
from common.provenance.records import Checkpoint

CHECKPOINT_ACTION = f"{MessageType.QUERY}.checkpoint"
SOURCE_PACKAGES = ("cli", "client", "common", "server", "simulations")


def source_tree_sha256() -> str:
    """SHA-256 over the Python sources of causalfed's packages (path and content, sorted)."""
    digest = hashlib.sha256()
    for package in SOURCE_PACKAGES:
        root = Path(importlib.import_module(package).__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def deliver_checkpoint(grid: Grid, nodes: list[int], checkpoint: Checkpoint, *, timeout_s: float) -> list[int]:
    """Send the checkpoint to every hospital; returns the nodes that did not confirm keeping it."""
    content = RecordDict({CHECKPOINT_KEY: ConfigRecord({CHECKPOINT_KEY: checkpoint.to_json()})})
    messages = [Message(content, dst_node_id=n, message_type=CHECKPOINT_ACTION) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout_s))
    confirmed = {r.metadata.src_node_id for r in replies if not r.has_error()}
    missing = sorted(set(nodes) - confirmed)
    if missing:
        flwr_log(WARNING, "checkpoint %d not confirmed by nodes %s", checkpoint.tree_size, missing)
    return missing


@dataclass
class RoundAuditor:
    """Collects one round's evidence while the strategy runs and appends it to the log."""

    log: ProvenanceLog
    profiles: dict[int, SiteProfile]
    updates: dict[str, str] = field(default_factory=dict)
    verdicts: dict[str, str] = field(default_factory=dict)
    dp: dict[str, dict[str, float]] = field(default_factory=dict)
    aggregate: str | None = None
    guard: dict[str, str] | None = None  # which detectors ran this round, on what (or why not)
    run_context: dict[str, str] = field(default_factory=dict)

    def _site(self, node: int) -> str:
        return self.profiles[node].site if node in self.profiles else f"node-{node}"

    def start_run(
        self, *, config_sha256: str, fab_hash: str, identities: dict[int, str], resumed_after: int | None = None,
        guard: dict | None = None,
    ) -> Checkpoint:
        """The run-start record, or ``run-resume`` when continuing after round ``resumed_after``."""
        # Node ids are 64-bit: as strings, since canonical JSON numbers stop at 2**53.
        participants = [
            {"node": str(node), "site": p.site, "role": p.role, "num_train": p.num_train, "identity": identities.get(node, "")}
            for node, p in sorted(self.profiles.items())
        ]
        # Repeated in every round record, so each record stands on its own.
        self.run_context = {
            "run_id": self.log.log_id,
            "config_sha256": config_sha256,
            "code_sha256": source_tree_sha256(),
            "fab_hash": fab_hash,
        }
        body = {**self.run_context, "participants": participants}
        if guard is not None:
            body["guard"] = guard  # on or off, data-free or on which reference cases
        if resumed_after is not None:
            return self.log.append("run-resume", body | {"resumed_after_round": resumed_after})
        return self.log.append("run-start", body)

    def note_updates(self, replies: list[Message]) -> None:
        for reply in replies:
            site = self._site(reply.metadata.src_node_id)
            if reply.has_error():
                self.updates[site] = "error: " + reply.error.reason
                continue
            if ARRAYS_KEY in reply.content.array_records:
                self.updates[site] = reply.content.array_records[ARRAYS_KEY].object_id
            metrics = reply.content.metric_records.get(METRICS_KEY) or {}
            # The accountant's inputs, so anyone can recompute the hospital's epsilon.
            dp = {k.removeprefix("train-dp-"): v for k, v in metrics.items() if k.startswith("train-dp-")}
            if dp:
                self.dp[site] = dp

    def note_verdict(self, site: str, verdict: str) -> None:
        self.verdicts[site] = verdict

    def note_guard(self, detectors: dict[str, str]) -> None:
        self.guard = dict(detectors)

    def note_aggregate(self, arrays: ArrayRecord | None) -> None:
        self.aggregate = arrays.object_id if arrays is not None else None

    def close_round(self, server_round: int, metrics: dict[str, Any]) -> Checkpoint:
        delivered = [site for site, digest in self.updates.items() if not digest.startswith("error")]
        verdicts = {site: "accepted" for site in delivered} | self.verdicts
        body = {
            **self.run_context,
            "round": server_round,
            "participants": sorted(set(self.updates) | set(self.verdicts)),
            "update_sha256": self.updates,
            "aggregate_sha256": self.aggregate,
            "verdicts": verdicts,
            "metrics": metrics,
            "dp": {site: self.dp.get(site) for site in sorted(verdicts)},
        }
        if self.guard is not None:
            body["guard"] = self.guard
        self.updates, self.verdicts, self.dp, self.aggregate, self.guard = {}, {}, {}, None, None
        return self.log.append("round", body)

    def end_run(self, *, rounds: int, final_arrays: ArrayRecord, feature_moments_sha256: str | None = None) -> Checkpoint:
        body = {"rounds": rounds, "final_model_sha256": final_arrays.object_id}
        if feature_moments_sha256 is not None:  # what `causalfed adapt` compares new hospitals against
            body["feature_moments_sha256"] = feature_moments_sha256
        return self.log.append("run-end", body)
