"""A simulated scenario: the server's scenario plus, optionally, an attack.

Attacks exist only in simulation (``simulations/attacks.py``); a deployed server refuses a
scenario with an ``[attack]`` table.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from common.config import Acquisition, Strict
from server.config import Scenario
from server.config import load_scenario as load_server_scenario
from server.config import parse_scenario as parse_server_scenario


class AttackConfig(Strict):
    """Which hospitals attack, how (``simulations/attacks.py``), and from which round."""

    name: str
    malicious: tuple[str, ...] = Field(min_length=1)
    start_round: int = Field(1, ge=1, description="the first round in which the attackers attack")

    @model_validator(mode="after")
    def _known_attack(self) -> AttackConfig:
        from simulations.attacks import ATTACKS

        if self.name not in ATTACKS:
            raise ValueError(f"unknown attack {self.name!r}; registered: {sorted(ATTACKS)}")
        return self


class Drift(Strict):
    """Where a hospital's data has moved to by the last round; linear in between."""

    prevalence: float | None = Field(None, gt=0.0, lt=1.0)
    acquisition: Acquisition | None = None


class SiteBehaviour(Strict):
    """How a simulated hospital takes part over time (in-process engine)."""

    joins_at: int = Field(1, ge=1, description="the first round it trains in (a late joiner)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="chance it misses a given training round")
    drift: Drift | None = Field(None, description="its data drifts during the run towards this")


class SimulationScenario(Scenario):
    attack: AttackConfig | None = None
    behaviour: dict[str, SiteBehaviour] = Field(
        default_factory=dict, description="per hospital name: late joining, dropouts, drifting data"
    )

    @model_validator(mode="after")
    def _behaviour_of_known_sites(self) -> SimulationScenario:
        unknown = sorted(set(self.behaviour) - {s.name for s in self.data.sites})
        if unknown:
            raise ValueError(f"behaviour given for hospitals the scenario does not have: {unknown}")
        if self.behaviour and self.federation.engine != "inprocess":
            raise ValueError("late joiners, dropouts and drift are simulated on the in-process engine")
        return self

    @model_validator(mode="after")
    def _attackers_exist(self) -> SimulationScenario:
        if self.attack is not None:
            train = {s.name for s in self.data.sites if s.role == "train"}
            unknown = sorted(set(self.attack.malicious) - train)
            if unknown:
                raise ValueError(f"attackers must be training hospitals; not one: {unknown}")
            if self.federation.engine != "inprocess":
                raise ValueError("attack simulations run on the in-process engine (attackers see honest updates)")
        return self


def load_scenario(source: str | Path | None = None) -> SimulationScenario:
    """A scenario from a TOML file (any path that exists) or a built-in by name (``None``: default)."""
    return load_server_scenario(source, model=SimulationScenario)


def parse_scenario(raw: dict, *, origin: str = "<dict>") -> SimulationScenario:
    """A simulated scenario from its raw table; ScenarioError says every problem and where."""
    return parse_server_scenario(raw, origin=origin, model=SimulationScenario)
