"""Simulated hospitals for the ClientApp: node ``partition-id`` k holds site k of the
scenario, generated inside that node, so no data crosses between nodes."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from flwr.app import Context

from common.data import SiteData
from simulations.scenario import SimulationScenario


@lru_cache(maxsize=8)
def _scenario(scenario_json: str) -> SimulationScenario:
    return SimulationScenario.model_validate_json(scenario_json)


@lru_cache(maxsize=64)
def _simulate(scenario_json: str, partition_id: int) -> SiteData:
    from simulations.datasets import build_site

    return build_site(_scenario(scenario_json), partition_id)


@lru_cache(maxsize=16)
def _drifted(scenario_json: str, partition_id: int, server_round: int) -> SiteData:
    """Site ``partition_id`` as its data stands in ``server_round``: its prevalence and
    scanner moved linearly from the scenario's towards its drift's target at the last round."""
    from simulations.datasets import build_site

    scenario = _scenario(scenario_json)
    site = scenario.data.sites[partition_id]
    drift = scenario.behaviour[site.name].drift
    share = min(1.0, (server_round - 1) / max(scenario.federation.num_rounds - 1, 1))
    raw = scenario.model_dump(mode="json")
    entry = raw["data"]["sites"][partition_id]
    if drift.prevalence is not None:
        entry["prevalence"] = (1 - share) * site.prevalence + share * drift.prevalence
    if drift.acquisition is not None:
        start, end = site.acquisition.model_dump(), drift.acquisition.model_dump()
        entry["acquisition"] = {k: _between(start[k], end[k], share) for k in start}
    raw["seed"] = scenario.seed + 7919 * server_round  # new patients as the data moves
    return build_site(type(scenario).model_validate(raw), partition_id)


def _between(start, end, share: float):
    if start is None or end is None:
        return end if share >= 0.5 else start
    return (1 - share) * start + share * end


@dataclass(frozen=True)
class ScenarioSites:
    """Simulated hospitals: node ``partition-id`` k holds site k of the scenario."""

    scenario_json: str

    def __call__(self, context: Context, server_round: int | None = None) -> SiteData:
        partition = int(context.node_config["partition-id"])
        scenario = _scenario(self.scenario_json)
        behaviour = scenario.behaviour.get(scenario.data.sites[partition].name)
        if server_round is not None and behaviour is not None and behaviour.drift is not None:
            return _drifted(self.scenario_json, partition, server_round)
        return _simulate(self.scenario_json, partition)

    def available(self, partition: int, message_type: str, server_round: int) -> bool:
        """Whether hospital ``partition`` trains in ``server_round`` (late joiners, dropouts);
        every hospital evaluates."""
        scenario = _scenario(self.scenario_json)
        behaviour = scenario.behaviour.get(scenario.data.sites[partition].name)
        if behaviour is None or message_type != "train":
            return True
        if server_round < behaviour.joins_at:
            return False
        draw = np.random.default_rng([scenario.seed, partition, server_round, 99]).random()
        return draw >= behaviour.dropout

    def epsilon_budget(self, context: Context) -> float | None:
        return _scenario(self.scenario_json).data.sites[int(context.node_config["partition-id"])].epsilon_budget
