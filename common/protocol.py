"""The message schema between ServerApp and ClientApps, validated at both edges.

Flower records carry flat key/value pairs; these pydantic models say which keys exist
and what they may hold, so a malformed instruction fails loudly on arrival.
"""

from __future__ import annotations

import json

import numpy as np
from typing import Any

from flwr.app import ConfigRecord
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.config import TrainingConfig

PROFILE_KEY = "profile"
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
CHECKPOINT_KEY = "checkpoint"
# Training hospitals add the global model's feature moments to their last evaluation reply.
FEATURE_MOMENTS_KEY = "feature-moments"
EVAL_SPLITS = ("val", "test")


class ProtocolError(ValueError):
    """A message whose content does not follow the causalfed schema."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    @classmethod
    def from_record(cls, record: ConfigRecord | None) -> Any:
        if record is None:
            raise ProtocolError(f"message has no {cls.__name__} record")
        try:
            return cls.model_validate(dict(record))
        except ValidationError as error:
            raise ProtocolError(f"bad {cls.__name__}: {error}") from None

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(self.model_dump(by_alias=True))


class SiteProfile(_Record):
    """What a hospital tells the server about itself (no patient data)."""

    site: str = Field(min_length=1)
    role: str = Field(pattern="^(train|heldout)$")
    num_train: int = Field(alias="num-train", ge=0)
    # Label count only (no cases): lets the server tell every hospital the federation's
    # prevalence, against which each corrects for its own (prior-shift adjustment).
    num_positive: int = Field(0, alias="num-positive", ge=0)
    # What one case looks like (an image, or a row of features): the server builds the
    # federation's model for it.
    input_shape: list[int] = Field(default_factory=list, alias="input-shape")


class TrainInstructions(_Record):
    """The local recipe the server asks every training hospital to follow this round."""

    server_round: int = Field(alias="server-round", ge=1)
    objective: str
    objective_params: str = Field(alias="objective-params", description="JSON object")
    learning_rate: float = Field(alias="learning-rate", gt=0)
    local_epochs: int = Field(alias="local-epochs", ge=1)
    batch_size: int = Field(alias="batch-size", ge=2)
    weight_decay: float = Field(alias="weight-decay", ge=0)
    seed: int = Field(ge=0)
    num_rounds: int = Field(alias="num-rounds", ge=1)
    dp_target_epsilon: float = Field(0.0, alias="dp-target-epsilon", ge=0, description="0: no DP-SGD")
    dp_delta: float = Field(1e-5, alias="dp-delta", gt=0, lt=1)
    dp_max_grad_norm: float = Field(1.0, alias="dp-max-grad-norm", gt=0)
    prior_adjustment: bool = Field(False, alias="prior-adjustment")
    federation_prevalence: float = Field(0.5, alias="federation-prevalence", gt=0, lt=1)

    @classmethod
    def for_training(
        cls, training: TrainingConfig, *, seed: int, num_rounds: int, server_round: int = 1
    ) -> TrainInstructions:
        privacy = training.privacy
        dp = {} if privacy is None else {
            "dp-target-epsilon": privacy.target_epsilon,
            "dp-delta": privacy.delta,
            "dp-max-grad-norm": privacy.max_grad_norm,
        }
        return cls.model_validate(dp | {
            "server-round": server_round,
            "objective": training.objective,
            "objective-params": json.dumps(training.objective_params, sort_keys=True),
            "learning-rate": training.learning_rate,
            "local-epochs": training.local_epochs,
            "batch-size": training.batch_size,
            "weight-decay": training.weight_decay,
            "seed": seed,
            "num-rounds": num_rounds,
            "prior-adjustment": training.prior_adjustment,
        })

    def params(self) -> dict[str, Any]:
        try:
            value = json.loads(self.objective_params)
        except json.JSONDecodeError as error:
            raise ProtocolError(f"objective-params is not JSON: {error}") from None
        if not isinstance(value, dict):
            raise ProtocolError("objective-params must be a JSON object")
        return value


# A hospital whose privacy budget is spent answers a train message with this metric set
# (and no model): the server stops asking it to train.
BUDGET_SPENT_METRIC = "dp-budget-spent"
REASON_KEY = "reason"


STATISTICS_KEY = "statistics"
FEDERATION_PREFIX = "federation-stat-"


def federation_statistics(config: ConfigRecord | None) -> dict[str, np.ndarray]:
    """The cross-hospital statistics the server broadcast in this round's config."""
    if config is None:
        return {}
    return {
        key.removeprefix(FEDERATION_PREFIX): np.asarray(value, dtype=np.float64)
        for key, value in config.items()
        if key.startswith(FEDERATION_PREFIX)
    }


def federation_prevalence(profiles: list[SiteProfile]) -> float:
    """P(y=1) over the training hospitals' training cases, Laplace-smoothed."""
    training = [p for p in profiles if p.role == "train"]
    positives = sum(p.num_positive for p in training)
    return (positives + 1) / (sum(p.num_train for p in training) + 2)


def eval_metric_key(split: str, metric: str) -> str:
    return f"{split}-{metric}"
