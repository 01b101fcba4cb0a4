"""Pooled ERM: the non-private reference that trains one model on every training
hospital's cases together, with the same recipe and evaluation as a federation.

Its history has the federation's format (per round, per site: val/test metrics), so the
same model-selection rules apply to it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from client.objectives import build_objective, planned_warmup_rounds
from client.task import evaluate, model_for, train_locally
from simulations.scenario import SimulationScenario as Scenario
from common.data import Split
from common.protocol import EVAL_SPLITS, eval_metric_key
from simulations.datasets import build_site


def pool(splits: list[Split]) -> Split:
    def common(field: str) -> dict[str, np.ndarray]:
        keys = set.intersection(*(set(getattr(s, field)) for s in splits)) if splits else set()
        return {k: np.concatenate([getattr(s, field)[k] for s in splits]) for k in sorted(keys)}

    return Split(
        images=np.concatenate([s.images for s in splits]),
        labels=np.concatenate([s.labels for s in splits]),
        recorded=common("recorded"),
        confounders=common("confounders"),
    )


def run_pooled(scenario: Scenario, *, model_path: Path | None = None) -> dict:
    """Train on the pooled training splits for the scenario's rounds x local epochs
    (the final weights to ``model_path``, as a federation's run folder keeps them)."""
    started = time.monotonic()
    sites = [build_site(scenario, i) for i in range(len(scenario.data.sites))]
    pooled = pool([s.train for s in sites if s.role == "train"])
    training = scenario.training
    model = model_for(scenario.training.objective, input_shape=pooled.input_shape, seed=scenario.seed)
    rounds = []
    for server_round in range(1, scenario.federation.num_rounds + 1):
        objective = build_objective(training.objective, training.objective_params, server_round=server_round,
                                    num_rounds=scenario.federation.num_rounds)
        train_locally(
            model, pooled, objective,
            epochs=training.local_epochs, batch_size=training.batch_size, learning_rate=training.learning_rate,
            weight_decay=training.weight_decay, seed=scenario.seed * 10_000 + server_round,
        )
        metrics = {}
        for site in sites:
            entry = {"role": site.role}
            for split in EVAL_SPLITS:
                for name, value in evaluate(model, site.split(split), objective).items():
                    entry[eval_metric_key(split, name)] = value
            metrics[site.name] = entry
        rounds.append({"round": server_round, "sites": metrics})
    if model_path is not None:
        torch.save(model.state_dict(), model_path)
    warmup = planned_warmup_rounds(training, num_rounds=scenario.federation.num_rounds)
    meta = {"scenario": scenario.name, "engine": "pooled", "warmup-rounds": warmup,
            "seconds": round(time.monotonic() - started, 1)}
    return {"meta": meta, "rounds": rounds}
