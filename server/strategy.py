"""The server strategy: FedAvg over the training hospitals, evaluation at every hospital.

Held-out hospitals never train; they only evaluate the global model each round, which is
how the o.o.d. performance is measured without any data leaving a hospital.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as strategies
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from common.calibration import CALIBRATIONS
from common.feature_shift import FeatureMoments, pool_moments
from common.protocol import (
    BUDGET_SPENT_METRIC,
    CONFIG_KEY,
    FEATURE_MOMENTS_KEY,
    FEDERATION_PREFIX,
    METRICS_KEY,
    REASON_KEY,
    STATISTICS_KEY,
    SiteProfile,
)
from client.objectives import OBJECTIVES
from server.audit import RoundAuditor, deliver_checkpoint
from server.guard import Guard, RoundJudgement
from server.guard.evidence import GuardMemory
from server.guard.reference import ReferenceSet, direction_evidence
from server.guard.round import apply_judgement, measure_replies, write_round_report
from server.history import RunHistory
from server.resume import ServerState
from server.robust import FLAME, FLTrust
from server.screening import model_spec, restore_dtypes, update_problem
from server.training import ServerTrainer


class CausalFedAvg(FedAvg):
    def __init__(
        self,
        *,
        profiles: dict[int, SiteProfile],
        history: RunHistory,
        fraction_train: float = 1.0,
        seed: int = 0,
        auditor: RoundAuditor | None = None,
        timeout_s: float = 600.0,
        state_path: Path | None = None,
        resume_from: ServerState | None = None,
        guard: Guard | None = None,
        reference: ReferenceSet | None = None,
        trainer: ServerTrainer | None = None,
        private: bool = False,
        evaluate_every: int = 1,
        num_rounds: int | None = None,
        objective: str = "erm",
        report_dir: Path | None = None,
        **strategy_options,
    ) -> None:
        train_nodes = [n for n, p in profiles.items() if p.role == "train"]
        super().__init__(
            fraction_train=fraction_train,
            min_train_nodes=min(2, len(train_nodes)),
            min_evaluate_nodes=len(profiles),
            min_available_nodes=len(profiles),
            **strategy_options,  # e.g. Krum's num_malicious_nodes when a baseline mixes in
        )
        self.guard, self.reference, self.trainer, self.report_dir = guard, reference, trainer, report_dir
        self.private = private  # hospitals train with DP-SGD
        self.evaluate_every, self.num_rounds = evaluate_every, num_rounds
        self.objective = objective  # whose combine() turns hospitals' statistics into the broadcast
        self.seed = seed
        self._round_started: float | None = None
        self.calibration: tuple[float, float] | None = None  # the last evaluated model's (scale, bias)
        self.federation_stats: dict[str, np.ndarray] = {}  # broadcast to every hospital next round
        self.profiles = profiles
        self.train_nodes = sorted(train_nodes)
        self.history = history
        self._sampler = random.Random(seed)
        self.auditor = auditor
        self.timeout_s = timeout_s
        self._grid: Grid | None = None
        self._sent: ArrayRecord | None = None  # the global model of this round: what updates must match
        self._evaluated: ArrayRecord | None = None  # the global model after this round
        self.state_path = state_path
        self._accepted_sites: set[str] = set()  # whose update entered this round's aggregate
        # The final model's feature moments over the accepted training hospitals (see
        # common.feature_shift): what a new hospital compares itself against before adapting.
        self.feature_moments: FeatureMoments | None = None
        self.feature_moments_sites: dict[str, FeatureMoments] = {}
        # Flower numbers rounds from 1 on every start: a resumed run shifts them.
        self.round_offset = 0
        if resume_from is not None:
            self._resume(resume_from)

    def _resume(self, state: ServerState) -> None:
        self.round_offset = state.completed_round
        retired = set(state.retired_sites)
        self.train_nodes = [n for n in self.train_nodes if self.profiles[n].site not in retired]
        if state.sampler_state is not None:
            self._sampler.setstate(state.sampler_state)
        self.federation_stats = dict(state.federation_statistics)
        if self.guard is not None:
            self.guard.memory = GuardMemory.from_dict(state.guard_memory)

    def _save_state(self, server_round: int) -> None:
        if self.state_path is None or self._evaluated is None:
            return
        training = {self.profiles[n].site for n in self.train_nodes}
        retired = sorted(p.site for p in self.profiles.values() if p.role == "train" and p.site not in training)
        arrays = ServerState.numpy_arrays(self._evaluated)
        memory = {} if self.guard is None else self.guard.memory.as_dict()
        ServerState(server_round, arrays, retired, self._sampler.getstate(), self.federation_stats,
                    memory).save(self.state_path)

    def _messages(self, arrays: ArrayRecord, config: ConfigRecord, nodes: list[int], kind: str):
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, nodes, kind)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        self._round_started = time.monotonic()
        self._grid = grid  # kept to hand each round's signed checkpoint to the hospitals
        self._sent = arrays
        wanted = max(self.min_train_nodes, round(len(self.train_nodes) * self.fraction_train))
        nodes = sorted(self._sampler.sample(self.train_nodes, min(wanted, len(self.train_nodes))))
        log(INFO, "configure_train: %d of %d training hospitals", len(nodes), len(self.train_nodes))
        config["server-round"] = server_round
        self._broadcast_statistics(config)
        return self._messages(arrays, config, nodes, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        self._evaluated = arrays
        last = self.num_rounds is not None and server_round >= self.num_rounds
        if server_round % self.evaluate_every and not last:
            return []  # not an evaluation round: the round still closes in aggregate_evaluate
        config["server-round"] = server_round
        self._broadcast_statistics(config)
        return self._messages(arrays, config, sorted(self.profiles), MessageType.EVALUATE)

    def _record_replies(self, server_round: int, replies: list[Message]) -> None:
        for reply in replies:
            profile = self.profiles.get(reply.metadata.src_node_id)
            if profile is None or reply.has_error():
                continue
            metrics: MetricRecord = reply.content.metric_records[METRICS_KEY]
            values = {k: float(v) for k, v in metrics.items() if k != "num-examples" and not isinstance(v, list)}
            self.history.record(server_round, profile.site, {"role": profile.role, **values})

    def _record_calibration(self, server_round: int, replies: list[Message]) -> None:
        """The round's calibration (scale, bias), fitted on the training hospitals'
        validation log-loss summed over them, and every hospital's decisions under it at its
        own (known or estimated) prevalence."""
        usable = [r for r in replies if not r.has_error() and "val-nll-grid" in r.content.metric_records[METRICS_KEY]]
        training = [r for r in usable if self.profiles.get(r.metadata.src_node_id, None) is not None
                    and self.profiles[r.metadata.src_node_id].role == "train"]
        if not training:
            return
        losses = np.sum([np.asarray(r.content.metric_records[METRICS_KEY]["val-nll-grid"]) for r in training], axis=0)
        chosen = int(np.argmin(losses))
        self.calibration = CALIBRATIONS[chosen]
        for reply in usable:
            metrics = reply.content.metric_records[METRICS_KEY]
            self.history.record(server_round, self._site(reply), {
                "calibration-scale": self.calibration[0], "calibration-bias": self.calibration[1],
                "prevalence-used": float(metrics["prevalence-grid"][chosen]),
                "test-cal-accuracy": float(metrics["test-accuracy-grid"][chosen]),
                "test-cal-balanced-accuracy": float(metrics["test-balanced-accuracy-grid"][chosen]),
                "test-cal-ece": float(metrics["test-ece-grid"][chosen]),
            })

    def _broadcast_statistics(self, config: ConfigRecord) -> None:
        for key, value in self.federation_stats.items():
            config[FEDERATION_PREFIX + key] = [float(v) for v in value]

    def _site(self, reply: Message) -> str:
        node = reply.metadata.src_node_id
        return self.profiles[node].site if node in self.profiles else f"node-{node}"

    def _retire_spent_budgets(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Hospitals whose privacy budget is spent leave the training rotation for good."""
        kept = []
        for reply in replies:
            metrics = None if reply.has_error() else reply.content.metric_records.get(METRICS_KEY)
            if metrics is None or not metrics.get(BUDGET_SPENT_METRIC):
                kept.append(reply)
                continue
            config = reply.content.config_records.get(CONFIG_KEY) or {}
            reason = str(config.get(REASON_KEY, "privacy budget spent"))
            log(WARNING, "%s stops training: %s", self._site(reply), reason)
            self.train_nodes = [n for n in self.train_nodes if n != reply.metadata.src_node_id]
            self.history.record(server_round, self._site(reply), {"training-stopped": reason})
            if self.auditor is not None:
                self.auditor.note_verdict(self._site(reply), f"stopped: {reason}")
        return kept

    def _screen(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Drop malformed updates (shape, dtype, size, NaN/Inf, counts) with a logged reason."""
        spec = model_spec(self._sent) if self._sent is not None else None
        kept = []
        for reply in replies:
            if reply.has_error() or spec is None:
                kept.append(reply)
                continue
            profile = self.profiles.get(reply.metadata.src_node_id)
            problem = update_problem(reply.content, spec, max_examples=profile.num_train if profile else 0)
            if problem is None:
                kept.append(reply)
                continue
            log(WARNING, "round %d: update from %s rejected: %s", server_round, self._site(reply), problem)
            self.history.record(server_round, self._site(reply), {"update-rejected": problem})
            if self.auditor is not None:
                self.auditor.note_verdict(self._site(reply), f"rejected: {problem}")
        return kept

    def _apply_guard(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Judge every update; drop the excluded ones, shorten the ones beyond the round's bound."""
        started = time.monotonic()
        kept = self._judge(server_round, replies)
        self.history.meta.setdefault("guard-seconds", []).append(round(time.monotonic() - started, 4))
        return kept

    def _judge(self, server_round: int, replies: list[Message]) -> list[Message]:
        sites = [self._site(r) for r in replies]
        sketches, samples, norms, steps = measure_replies(self.guard, replies, self._sent)
        direction = None
        if self.reference is not None and self.trainer is not None:
            cases = int(np.median([int(r.content.metric_records[METRICS_KEY]["num-examples"]) for r in replies]))
            rng = np.random.default_rng([self.seed, server_round, 7])

            def train(split, seed):
                return self.guard.sketch(self.trainer.update(self._sent, split, seed=seed, server_round=server_round))

            source = (f"{len(self.reference.split)} reference cases ({self.reference.path.name}, "
                      f"sha256 {self.reference.sha256[:12]})")
            direction = direction_evidence(sketches, train, self.reference.split, cases=max(cases, 2),
                                           trainings=self.guard.config.reference_trainings, rng=rng, source=source)
        judgement = self.guard.judge(server_round, sites, sketches, samples, norms, steps, direction=direction,
                                     private=self.private)
        if self.report_dir is not None:
            write_round_report(self.report_dir, judgement)
        self._record_judgement(server_round, judgement)
        return apply_judgement(judgement, replies, self._sent)

    def _record_judgement(self, server_round: int, judgement: RoundJudgement) -> None:
        for verdict in judgement.verdicts:
            self.history.record(server_round, verdict.client, {"guard-excluded": float(verdict.excluded),
                                                               "guard-clip": verdict.clip_scale})
            if verdict.excluded:
                log(WARNING, "round %d: guard excludes %s: %s", server_round, verdict.client, "; ".join(verdict.reasons))
            if self.auditor is None:
                continue
            if verdict.excluded:
                self.auditor.note_verdict(verdict.client, "excluded by the guard: " + "; ".join(verdict.reasons))
            elif verdict.reasons:
                self.auditor.note_verdict(verdict.client, f"down-weighted by the guard to {verdict.clip_scale:.3g} of "
                                          "its length: " + "; ".join(verdict.reasons))
            elif verdict.clip_scale < 1.0:
                self.auditor.note_verdict(verdict.client, f"accepted, shortened to {verdict.clip_scale:.3g} of its length")
        if self.auditor is not None:
            self.auditor.note_guard(judgement.detectors)

    def root_update(self) -> np.ndarray:
        """FLTrust's server update: one local round on the whole reference (root) set."""
        if self.reference is None or self.trainer is None:
            raise ValueError("FLTrust needs a reference (root) set: set federation.guard.reference_set")
        return self.trainer.update(self._sent, self.reference.split, seed=self.seed, server_round=1)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = self._retire_spent_budgets(server_round, list(replies))
        if self.auditor is not None:
            self.auditor.note_updates(replies)
        replies = self._screen(server_round, replies)
        self._record_replies(server_round, replies)
        usable = [r for r in replies if not r.has_error()]
        if self.guard is not None and len(usable) >= self.guard.config.min_clients:
            usable = self._apply_guard(server_round, usable)
        if usable:
            self.federation_stats = OBJECTIVES[self.objective].combine(hospital_statistics(usable))
        self._accepted_sites = {self._site(r) for r in usable}
        arrays, metrics = super().aggregate_train(server_round, usable) if usable else (None, None)
        if arrays is not None and self._sent is not None:
            arrays = restore_dtypes(arrays, model_spec(self._sent))
        if self.auditor is not None:
            self.auditor.note_aggregate(arrays)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        self._record_replies(server_round, replies)
        self._record_calibration(server_round, replies)
        self._pool_feature_moments(replies)
        self.history.close_round(server_round)
        if self.auditor is not None:
            checkpoint = self.auditor.close_round(server_round, self.history.rounds.get(server_round, {}))
            if self._grid is not None:
                deliver_checkpoint(self._grid, sorted(self.profiles), checkpoint, timeout_s=self.timeout_s)
        if self._round_started is not None:  # the whole round: training, guard, evaluation, log
            self.history.meta.setdefault("round-seconds", []).append(round(time.monotonic() - self._round_started, 4))
        self._save_state(server_round)  # last: the state only names rounds that are fully recorded
        return super().aggregate_evaluate(server_round, replies) if replies else None

    def _pool_feature_moments(self, replies: list[Message]) -> None:
        """Pool the moments of hospitals whose update this round's aggregate accepted (a
        flagged hospital does not get to describe the federation's images)."""
        parts: dict[str, FeatureMoments] = {}
        for reply in replies:
            if reply.has_error() or FEATURE_MOMENTS_KEY not in reply.content.config_records:
                continue
            site = self._site(reply)
            if site not in self._accepted_sites:
                continue
            try:
                parts[site] = FeatureMoments.from_record(reply.content.config_records[FEATURE_MOMENTS_KEY])
            except ValueError as error:
                log(WARNING, "feature moments from %s ignored: %s", site, error)
        sizes = [part.mean.size for part in parts.values()]
        common = max(set(sizes), key=sizes.count) if sizes else None
        parts = {site: part for site, part in parts.items() if part.mean.size == common}
        if parts:
            self.feature_moments_sites = parts
            self.feature_moments = pool_moments(list(parts.values()))


def hospital_statistics(replies: list[Message]) -> list[tuple[float, dict[str, np.ndarray]]]:
    """Each accepted reply's example count and statistics (what its objective contributes)."""
    parts = []
    for reply in replies:
        record = reply.content.config_records.get(STATISTICS_KEY)
        if record is not None:
            count = float(reply.content.metric_records[METRICS_KEY]["num-examples"])
            parts.append((count, {key: np.asarray(values, dtype=np.float64) for key, values in record.items()}))
    return parts


# Robust rules as baselines: the same hospital handling, a different aggregate.
ROBUST_RULES = {
    "fedavg": None,
    "krum": strategies.Krum,
    "multikrum": strategies.MultiKrum,
    "bulyan": strategies.Bulyan,
    "median": strategies.FedMedian,
    "trimmed-mean": strategies.FedTrimmedAvg,
    "fltrust": FLTrust,
    "flame": FLAME,
}


def strategy_class(aggregation: str) -> type[CausalFedAvg]:
    rule = ROBUST_RULES[aggregation]
    if rule is None:
        return CausalFedAvg
    return type(f"Causal{rule.__name__}", (CausalFedAvg, rule), {})


def aggregation_options(aggregation: str, *, assumed_malicious: int) -> dict:
    if aggregation in ("krum", "multikrum", "bulyan"):
        return {"num_malicious_nodes": assumed_malicious}
    return {}
