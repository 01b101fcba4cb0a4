"""A whole scenario as the server runs it: the hospitals' data and recipe (``common/config.py``)
and the federation's own settings (rounds, engine, aggregation rule, guard).

The deployed ServerApp reads one of these; a simulation adds its attack
(``simulations/scenario.py``). Objective names and parameters are checked against the
client's registry here, at the edge, once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, ValidationError, model_validator

from client.objectives import check_training
from common.config import (
    DataConfig,
    ScenarioError,
    Strict,
    TrainingConfig,
    format_validation_error,
    read_scenario_source,
)
from server.guard.config import GuardConfig

AggregationName = Literal["fedavg", "krum", "multikrum", "bulyan", "median", "trimmed-mean", "fltrust", "flame"]


class FederationConfig(Strict):
    num_rounds: int = Field(20, ge=1, le=10_000)
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    engine: Literal["ray", "inprocess"] = Field(
        "inprocess", description="'inprocess': the ServerApp and ClientApps exchange messages through an in-process "
        "Grid (fast; attacks and late joiners need it); 'ray': Flower's simulation engine (docs/simulation.md)"
    )
    round_timeout_s: float = Field(600.0, gt=0.0)
    evaluate_every: int = Field(
        1, ge=1, description="hospitals evaluate the global model every this many rounds (and after the last)"
    )
    aggregation: AggregationName = Field(
        "fedavg", description="the rule behind the guard: FedAvg, or a robust baseline (Flower's, FLTrust, FLAME)"
    )
    assumed_malicious: int = Field(0, ge=0, description="what Krum/MultiKrum/Bulyan are told to tolerate")
    guard: GuardConfig | None = None


class Scenario(Strict):
    name: str = Field("default", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = Field("", max_length=300, description="one line: what this scenario shows")
    seed: int = Field(0, ge=0)
    data: DataConfig
    training: TrainingConfig = TrainingConfig()
    federation: FederationConfig = FederationConfig()

    @model_validator(mode="after")
    def _robust_rule_fits(self) -> Scenario:
        federation, n = self.federation, len(self.data.train_sites)
        f = federation.assumed_malicious
        if federation.aggregation in ("krum", "multikrum") and n <= 2 * f + 2:
            raise ValueError(f"Krum tolerates f attackers among n > 2f + 2 hospitals; n = {n}, f = {f}")
        if federation.aggregation == "bulyan" and n < 4 * f + 3:
            raise ValueError(f"Bulyan needs n >= 4f + 3 hospitals; n = {n}, f = {f}")
        return self

    @model_validator(mode="after")
    def _training_fits_data(self) -> Scenario:
        check_training(self.training, self.data)
        return self

    def digest(self) -> str:
        """SHA-256 of the canonical JSON form: identifies this exact configuration."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def with_overrides(self, **sections: Any):
        """A copy with some fields replaced, re-validated (e.g. ``training={"objective": "irm"}``)."""
        raw = self.model_dump(mode="json")
        for section, values in sections.items():
            if isinstance(raw.get(section), dict) and isinstance(values, dict):
                raw[section].update(values)
            else:
                raw[section] = values
        return type(self).model_validate(raw)

    def without_shortcuts(self):
        """The oracle's world: training sites whose confounders are independent of the label."""
        raw = self.model_dump(mode="json")
        for site in raw["data"]["sites"]:
            if site["role"] == "train":
                site["correlation"], site["correlations"] = 0.5, {}
        return type(self).model_validate(raw)


ScenarioModel = TypeVar("ScenarioModel", bound=Scenario)


def parse_scenario(raw: dict[str, Any], *, origin: str = "<dict>", model: type[ScenarioModel] = Scenario) -> ScenarioModel:
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise ScenarioError(format_validation_error(error, origin)) from None


def load_scenario(source: str | Path | None = None, *, model: type[ScenarioModel] = Scenario) -> ScenarioModel:
    """A scenario from a TOML file (any path that exists) or a built-in by name (``None``: default)."""
    raw, origin = read_scenario_source(source)
    return parse_scenario(raw, origin=origin, model=model)
