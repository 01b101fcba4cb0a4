"""Scenario configuration: pydantic models, validated once when a scenario is loaded.

A scenario names the hospitals (their acquisition and how strongly each shortcut tracks
the label there), the training recipe and the federation. It is written in TOML; see
``simulations/scenarios/default.toml``.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ConfounderName = Literal["tag", "denoising", "noise", "sex"]
SiteRole = Literal["train", "heldout"]


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Acquisition(_Strict):
    """How one hospital's scanner turns the scene into an image (label-independent)."""

    gamma: float = Field(1.0, gt=0.1, le=5.0, description="contrast curve exponent")
    brightness: float = Field(0.0, ge=-0.5, le=0.5)
    blur_sigma: float = Field(0.0, ge=0.0, le=3.0, description="optical blur, pixels")
    gaussian_noise: float = Field(0.02, ge=0.0, le=0.5, description="read-out noise std")
    photon_count: float | None = Field(
        None, gt=0, description="Poisson photon count at full intensity; None disables"
    )


class Site(_Strict):
    """One hospital."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    role: SiteRole = "train"
    n_samples: int = Field(1000, ge=40, le=200_000)
    prevalence: float = Field(0.5, gt=0.0, lt=1.0, description="P(lesion) at this site")
    correlation: float = Field(
        0.5, ge=0.0, le=1.0,
        description="P(confounder state == label) for every active confounder; 0.5 = none "
        "(simulated and MedMNIST sites; real tabular hospitals ignore it)",
    )
    acquisition: Acquisition = Acquisition()
    label_noise: float | None = Field(
        None, ge=0.0, lt=0.5, description="this site's annotation noise (None: the scenario's label_noise)"
    )
    epsilon_budget: float | None = Field(
        None, gt=0.0,
        description="this hospital's DP budget; it stops training once another round would exceed it "
        "(None: the federation's target_epsilon)",
    )


class DataConfig(_Strict):
    source: Literal["synthetic", "medmnist", "heart_disease"] = "synthetic"
    medmnist_file: str | None = Field(
        None, description="path to a MedMNIST .npz (binary labels) when source = 'medmnist'"
    )
    heart_disease_dir: str = Field(
        "../shared/data/heart_disease", description="the UCI files when source = 'heart_disease'"
    )
    missing: Literal["flamby", "indicators"] = Field(
        "flamby", description="heart disease: FLamby's drop convention, or mean-fill with missingness indicators"
    )
    label_noise: float = Field(0.2, ge=0.0, lt=0.5, description="P(label != lesion)")
    lesion_intensity: float = Field(0.3, gt=0.0, le=1.0)
    confounders: tuple[ConfounderName, ...] = ("tag", "denoising", "noise")
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.25, gt=0.0, lt=0.5)
    sites: tuple[Site, ...] = Field(min_length=2)

    @field_validator("confounders")
    @classmethod
    def _unique_confounders(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"confounders listed twice: {list(value)}")
        return value

    @model_validator(mode="after")
    def _check_sites(self) -> DataConfig:
        names = [site.name for site in self.sites]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"site names must be unique, repeated: {duplicated}")
        if sum(site.role == "train" for site in self.sites) < 2:
            raise ValueError("a federation needs at least 2 sites with role = 'train'")
        if self.source == "medmnist" and not self.medmnist_file:
            raise ValueError("source = 'medmnist' needs medmnist_file")
        if self.source == "medmnist" and "sex" in self.confounders:
            raise ValueError("the 'sex' confounder changes simulated anatomy; real images cannot take it")
        if self.source == "heart_disease":
            known = ("cleveland", "hungary", "switzerland", "va")
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(f"heart-disease sites are the real hospitals {list(known)}; unknown: {unknown}")
        return self

    @property
    def input_shape(self) -> tuple[int, ...]:
        """What one case looks like to the model: an image, or a row of features."""
        if self.source == "heart_disease":
            from simulations.heart_disease import feature_names

            return (len(feature_names(self.missing)),)
        from common.data import IMAGE_SHAPE

        return IMAGE_SHAPE

    @property
    def train_sites(self) -> tuple[Site, ...]:
        return tuple(s for s in self.sites if s.role == "train")


class PrivacyConfig(_Strict):
    """DP-SGD at every training hospital (Opacus); noise is calibrated per hospital so the
    planned rounds spend exactly ``target_epsilon``."""

    target_epsilon: float = Field(..., gt=0.0, le=100.0)
    delta: float = Field(1e-5, gt=0.0, lt=0.1)
    max_grad_norm: float = Field(1.0, gt=0.0)


class TrainingConfig(_Strict):
    objective: str = "erm"
    objective_params: dict[str, float] = Field(default_factory=dict)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(64, ge=2, le=4096)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    privacy: PrivacyConfig | None = None
    prior_adjustment: bool = Field(
        False,
        description="each hospital shifts the global model's logit by its own prior odds against the "
        "federation's (P(Y) differs by site, P(X|Y) is shared): Bayes' rule under label shift",
    )

    @model_validator(mode="after")
    def _known_objective(self) -> TrainingConfig:
        # Imported here: the registry lives with the client, the config must not import torch eagerly.
        from client.objectives import OBJECTIVES, validate_objective

        validate_objective(self.objective, self.objective_params)
        objective = OBJECTIVES[self.objective]
        if self.privacy is not None and not objective.per_example_loss:
            raise ValueError(
                f"objective {self.objective!r} is not a sum of per-example losses, so DP-SGD's "
                "per-example clipping cannot bound its sensitivity; use it without [training.privacy]"
            )
        if self.privacy is not None and objective.needs_strata:
            raise ValueError(f"objective {self.objective!r} needs per-case strata, which DP-SGD's sampler does not carry")
        if self.privacy is not None and objective.architecture != "plain":
            raise ValueError(
                f"objective {self.objective!r} trains the {objective.architecture!r} model; DP-SGD runs on the plain "
                "one, whose layers Opacus can clip per example"
            )
        return self

    @property
    def architecture(self) -> str:
        """The model the objective trains (client.models.ARCHITECTURES)."""
        from client.objectives import OBJECTIVES

        return OBJECTIVES[self.objective].architecture


class GuardConfig(_Strict):
    """The server guard (server/guard.py): causal dependency graph over client updates."""

    enabled: bool = True
    fdr: float = Field(0.01, gt=0.0, lt=0.5, description="false-discovery rate across clients, per round")
    # 1000: a flipped update's cosine with the validation ranking is -0.15 to -0.45, and its
    # bootstrap error (``ValidationDirectionDetector``) shrinks as one over the root of the
    # cases. With 200 cases flippers were caught in round 3 to never; with 500 in rounds 1
    # to 6; with 1000, round-1 flippers on seeds 2, 11 and 12 stood at z 5 to 6, and seed
    # 2's mean TPR rose from 0.86 to 0.98 (benchmarks/GUARD_HISTORY.md, tenth version).
    validation_cases: int = Field(1000, ge=0, le=10_000, description="server-side clean validation set (0: none)")


AggregationName = Literal["fedavg", "krum", "multikrum", "bulyan", "median", "trimmed-mean"]


class FederationConfig(_Strict):
    num_rounds: int = Field(20, ge=1, le=10_000)
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    engine: Literal["ray", "inprocess"] = "ray"
    round_timeout_s: float = Field(600.0, gt=0.0)
    aggregation: AggregationName = Field("fedavg", description="Flower's rule behind the guard (robust baselines)")
    assumed_malicious: int = Field(0, ge=0, description="what Krum/MultiKrum/Bulyan are told to tolerate")
    guard: GuardConfig | None = None


class AttackConfig(_Strict):
    """Simulation only: which hospitals attack, and how (simulations/attacks.py)."""

    name: str
    malicious: tuple[str, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _known_attack(self) -> AttackConfig:
        from simulations.attacks import ATTACKS

        if self.name not in ATTACKS:
            raise ValueError(f"unknown attack {self.name!r}; registered: {sorted(ATTACKS)}")
        return self


class Scenario(_Strict):
    name: str = Field("default", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0)
    data: DataConfig
    training: TrainingConfig = TrainingConfig()
    federation: FederationConfig = FederationConfig()
    attack: AttackConfig | None = None

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
    def _objective_fits_data(self) -> Scenario:
        from client.objectives import OBJECTIVES

        objective = OBJECTIVES[self.training.objective]
        if self.data.source == "heart_disease" and (objective.architecture != "plain" or objective.needs_strata):
            raise ValueError(
                f"objective {self.training.objective!r} needs image models and recorded acquisition strata; "
                "the heart-disease hospitals have feature rows only"
            )
        if objective.needs_strata and not self.data.confounders:
            raise ValueError(f"objective {self.training.objective!r} needs recorded strata; data.confounders is empty")
        return self

    @model_validator(mode="after")
    def _attackers_exist(self) -> Scenario:
        if self.attack is not None:
            train = {s.name for s in self.data.sites if s.role == "train"}
            unknown = sorted(set(self.attack.malicious) - train)
            if unknown:
                raise ValueError(f"attackers must be training hospitals; not one: {unknown}")
            if self.federation.engine != "inprocess":
                raise ValueError("attack simulations run on the in-process engine (attackers see honest updates)")
        return self

    def digest(self) -> str:
        """SHA-256 of the canonical JSON form: identifies this exact configuration."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def with_overrides(self, **sections: dict[str, Any]) -> Scenario:
        """A copy with some fields replaced, re-validated (e.g. ``training={"objective": "irm"}``)."""
        raw = self.model_dump(mode="json")
        for section, values in sections.items():
            if isinstance(raw.get(section), dict) and isinstance(values, dict):
                raw[section].update(values)
            else:
                raw[section] = values
        return Scenario.model_validate(raw)

    def without_shortcuts(self) -> Scenario:
        """The oracle's world: training sites whose confounders are independent of the label."""
        raw = self.model_dump(mode="json")
        for site in raw["data"]["sites"]:
            if site["role"] == "train":
                site["correlation"] = 0.5
        return Scenario.model_validate(raw)


def _format_validation_error(error: ValidationError, origin: str) -> str:
    lines = [f"invalid scenario {origin}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  - {where}: {item['msg']}")
    return "\n".join(lines)


def parse_scenario(raw: dict[str, Any], *, origin: str = "<dict>") -> Scenario:
    try:
        return Scenario.model_validate(raw)
    except ValidationError as error:
        raise ScenarioError(_format_validation_error(error, origin)) from None


def load_scenario(source: str | Path | None = None) -> Scenario:
    """Load a scenario from a TOML file, or a built-in one by name (``None`` = ``default``)."""
    if source is None or (isinstance(source, str) and not source.endswith(".toml")):
        name = source or "default"
        try:
            text = resources.files("simulations").joinpath(f"scenarios/{name}.toml").read_text()
        except FileNotFoundError:
            raise ScenarioError(
                f"no built-in scenario named {name!r}; built-ins: {builtin_scenarios()}"
            ) from None
        origin = f"built-in '{name}'"
    else:
        path = Path(source)
        if not path.is_file():
            raise ScenarioError(f"scenario file not found: {path}")
        text, origin = path.read_text(), str(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ScenarioError(f"scenario {origin} is not valid TOML: {error}") from None
    return parse_scenario(raw, origin=origin)


def builtin_scenarios() -> list[str]:
    folder = resources.files("simulations").joinpath("scenarios")
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))
