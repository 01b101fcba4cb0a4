"""Scenario settings shared by hospitals and server: the data each hospital holds and the
training recipe. Pydantic models, validated once when a scenario is read.

A scenario is written in TOML (``common/scenarios/default.toml``). The federation's own
section and the full ``Scenario`` live with the server (``server/config.py``); a simulation
adds its attack (``simulations/scenario.py``). This module imports nothing from them.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ConfounderName = Literal["tag", "denoising", "noise", "sex"]
CONFOUNDERS: tuple[str, ...] = ("tag", "denoising", "noise", "sex")
SiteRole = Literal["train", "heldout"]


class ScenarioError(ValueError):
    """A scenario that cannot be used; the message says where and why."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Acquisition(Strict):
    """How one hospital's scanner turns the scene into an image (label-independent)."""

    gamma: float = Field(1.0, gt=0.1, le=5.0, description="contrast curve exponent")
    brightness: float = Field(0.0, ge=-0.5, le=0.5)
    blur_sigma: float = Field(0.0, ge=0.0, le=3.0, description="optical blur, pixels")
    gaussian_noise: float = Field(0.02, ge=0.0, le=0.5, description="read-out noise std")
    photon_count: float | None = Field(
        None, gt=0, description="Poisson photon count at full intensity; None disables"
    )


class Site(Strict):
    """One hospital."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    role: SiteRole = "train"
    n_samples: int = Field(1000, ge=40, le=200_000)
    prevalence: float = Field(0.5, gt=0.0, lt=1.0, description="P(lesion) at this site")
    correlation: float = Field(
        0.5, ge=0.0, le=1.0,
        description="P(confounder state == label) for every active confounder not set in `correlations`; "
        "0.5 = no shortcut (simulated and MedMNIST sites; real tabular hospitals ignore it)",
    )
    correlations: dict[ConfounderName, float] = Field(
        default_factory=dict,
        description="per-confounder P(state == label) at this site, overriding `correlation`",
    )
    recorded: tuple[ConfounderName, ...] | None = Field(
        None,
        description="the confounders this hospital records per case (DICOM protocol, post-processing, "
        "sex); None: every active one. Any may exist unrecorded.",
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

    @field_validator("correlations")
    @classmethod
    def _probabilities(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {name: p for name, p in value.items() if not 0.0 <= p <= 1.0}
        if bad:
            raise ValueError(f"correlations are probabilities in [0, 1]: {bad}")
        return value

    def correlation_of(self, confounder: str) -> float:
        """P(state == label) of ``confounder`` at this site."""
        return self.correlations.get(confounder, self.correlation)

    def records(self, active: tuple[str, ...]) -> tuple[str, ...]:
        """The active confounders this hospital writes down per case."""
        return tuple(c for c in active if self.recorded is None or c in self.recorded)


class DataConfig(Strict):
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
        for site in self.sites:
            foreign = sorted((set(site.correlations) | set(site.recorded or ())) - set(self.confounders))
            if foreign:
                raise ValueError(f"site {site.name!r} sets confounders {foreign} that data.confounders does not activate")
        return self

    @property
    def train_sites(self) -> tuple[Site, ...]:
        return tuple(s for s in self.sites if s.role == "train")


class PrivacyConfig(Strict):
    """DP-SGD at every training hospital (Opacus); noise is calibrated per hospital so the
    planned rounds spend exactly ``target_epsilon``."""

    target_epsilon: float = Field(..., gt=0.0, le=100.0)
    delta: float = Field(1e-5, gt=0.0, lt=0.1)
    max_grad_norm: float = Field(1.0, gt=0.0)


class TrainingConfig(Strict):
    """What every training hospital does in a round. The objective's name and parameters
    are checked against the objective registry by ``client.objectives.check_training``."""

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


def format_validation_error(error: ValidationError, origin: str) -> str:
    """Every problem on a line of its own, with where it is. A list that came out too short
    only because one of its items was invalid is not a problem of its own."""
    items = error.errors()
    located = [tuple(item["loc"]) for item in items]
    lines = [f"invalid scenario {origin}:"]
    for item, loc in zip(items, located):
        if item["type"] == "too_short" and any(other[: len(loc)] == loc and len(other) > len(loc) for other in located):
            continue
        where = ".".join(str(part) for part in loc) or "(top level)"
        lines.append(f"  - {where}: {item['msg']}")
    return "\n".join(lines)


SCENARIO_FOLDER = "scenarios"


def read_scenario_source(source: str | Path | None = None) -> tuple[dict[str, Any], str]:
    """The raw table of a scenario and where it came from: a file when ``source`` names one
    that exists (whatever its suffix), else a built-in by name (``None``: ``default``)."""
    if source is not None and Path(source).is_file():
        path = Path(source)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise ScenarioError(f"cannot read scenario file {path}: {error}") from None
        origin = str(path)
    else:
        name = str(source) if source is not None else "default"
        if name.endswith(".toml") or "/" in name:
            raise ScenarioError(f"scenario file not found: {name}")
        text = _builtin_text(name)
        origin = f"built-in '{name}'"
    try:
        return tomllib.loads(text), origin
    except tomllib.TOMLDecodeError as error:
        raise ScenarioError(f"scenario {origin} is not valid TOML: {error}") from None


def _builtin_text(name: str) -> str:
    try:
        return resources.files("common").joinpath(f"{SCENARIO_FOLDER}/{name}.toml").read_text()
    except (FileNotFoundError, IsADirectoryError):
        raise ScenarioError(f"no scenario file or built-in named {name!r}; built-ins: {builtin_scenarios()}") from None


def builtin_scenarios() -> list[str]:
    folder = resources.files("common").joinpath(SCENARIO_FOLDER)
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def builtin_description(name: str) -> str:
    """The one-line meaning a built-in scenario gives itself (its ``description``)."""
    raw, _ = read_scenario_source(name)
    return str(raw.get("description", ""))
