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


@lru_cache(maxsize=8)
def _load_file(path: str) -> SiteData:
    return SiteData.load(Path(path))


@lru_cache(maxsize=8)
def _simulate(scenario_json: str, partition_id: int) -> SiteData:
    from simulations.datasets import build_site  # simulation code only where simulating

    return build_site(Scenario.model_validate_json(scenario_json), partition_id)


def site_from_node_config(context: Context) -> SiteData:
    path = context.node_config.get("data-path")
    if not path:
        raise ValueError(
            "this SuperNode has no data: start it with --node-config 'data-path=\"/path/site.npz\"'"
        )
    return _load_file(str(path))


@dataclass(frozen=True)
class ScenarioSites:
    """Simulated hospitals: node ``partition-id`` k holds site k of the scenario."""

    scenario_json: str

    def __call__(self, context: Context) -> SiteData:
        partition_id = int(context.node_config["partition-id"])
        return _simulate(self.scenario_json, partition_id)
