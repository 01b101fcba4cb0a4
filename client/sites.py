"""Where a ClientApp finds its hospital's data.

Deployed, a SuperNode is started with ``--node-config 'data-path="/data/site.npz"'`` and
reads that file. In a local simulation every virtual node generates its own hospital from
the scenario and its ``partition-id``, so no data crosses between nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from flwr.app import Context

from common.config import Scenario
from common.data import SiteData


class SiteSource(Protocol):
    def __call__(self, context: Context) -> SiteData: ...


class BudgetSource(Protocol):
    def __call__(self, context: Context) -> float | None: ...


@lru_cache(maxsize=8)
def _load_file(path: str) -> SiteData:
    return SiteData.load(Path(path))


@lru_cache(maxsize=8)
def _scenario(scenario_json: str) -> Scenario:
    return Scenario.model_validate_json(scenario_json)


@lru_cache(maxsize=8)
def _simulate(scenario_json: str, partition_id: int) -> SiteData:
    from simulations.datasets import build_site  # simulation code only where simulating

    return build_site(_scenario(scenario_json), partition_id)


def site_from_node_config(context: Context) -> SiteData:
    path = context.node_config.get("data-path")
    if not path:
        raise ValueError(
            "this SuperNode has no data: start it with --node-config 'data-path=\"/path/site.npz\"'"
        )
    return _load_file(str(path))


def budget_from_node_config(context: Context) -> float | None:
    """The hospital's own DP budget: ``--node-config 'epsilon-budget=3.0'`` (unset: the federation's)."""
    value = context.node_config.get("epsilon-budget")
    if value is None or value == "":
        return None
    budget = float(value)
    if not budget > 0:
        raise ValueError(f"epsilon-budget must be positive, got {value!r}")
    return budget


@dataclass(frozen=True)
class ScenarioSites:
    """Simulated hospitals: node ``partition-id`` k holds site k of the scenario."""

    scenario_json: str

    def __call__(self, context: Context) -> SiteData:
        partition_id = int(context.node_config["partition-id"])
        return _simulate(self.scenario_json, partition_id)

    def epsilon_budget(self, context: Context) -> float | None:
        return _scenario(self.scenario_json).data.sites[int(context.node_config["partition-id"])].epsilon_budget
