"""Local training objectives, one small class each, registered by name (DomainBed style).

Every objective implements ``loss``; the shared ``update`` takes one optimizer step.
In a federation each hospital is one environment, so a per-client penalty summed by
FedAvg is the multi-environment objective (e.g. IRMv1's sum of per-environment penalties).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from client.priors import prior_shift_offset
from common.config import DataConfig, TrainingConfig

OBJECTIVES: dict[str, type[Objective]] = {}


class ObjectiveParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Objective(ABC):
    name: ClassVar[str]
    Params: ClassVar[type[ObjectiveParams]] = ObjectiveParams
    # DP-SGD clips per-example gradients: only valid when the loss is a mean of per-example terms.
    per_example_loss: ClassVar[bool] = True
    # The model it trains (client.models.ARCHITECTURES), and whether its batches need each
    # case's recorded stratum.
    architecture: ClassVar[str] = "plain"
    needs_strata: ClassVar[bool] = False

    def __init__(
        self, params: ObjectiveParams, *, server_round: int, num_rounds: int | None = None,
        federation: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.params = params
        self.server_round = server_round
        self.num_rounds = num_rounds  # the federation's planned rounds (None: not known here)
        # Cross-hospital statistics the server broadcast this round (e.g. the mean risk).
        self.federation = federation or {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            return  # a shared base, not an objective
        if cls.name in OBJECTIVES:
            raise TypeError(f"objective {cls.name!r} registered twice")
        OBJECTIVES[cls.name] = cls

    @property
    def warmup_rounds(self) -> int:
        """Rounds before the objective is fully in force; model selection skips them."""
        return 0

    def statistics(
        self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, strata: torch.Tensor | None = None
    ) -> dict[str, np.ndarray]:
        """What this hospital contributes to next round's federation statistics (none by default).

        Computed on its training split at the received global model; the server averages
        each entry over hospitals, weighted by their example counts, and broadcasts it.
        """
        return {}

    @classmethod
    def combine(cls, parts: list[tuple[float, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
        """What the server broadcasts from the hospitals' statistics (example count, values):
        by default each entry's example-weighted mean (NaN entries, such as a class a
        hospital does not have, are left out of that entry's mean)."""
        return weighted_mean_statistics(parts)

    def trainable(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The parameters local training moves (all of them unless the objective freezes some)."""
        return list(model.parameters())

    def local_state_keys(self, model: torch.nn.Module) -> set[str]:
        """Model entries this hospital keeps for itself instead of taking the global ones."""
        return set()

    def localise(self, model: torch.nn.Module, images: torch.Tensor) -> None:
        """Refresh statistics this hospital derives from its own unlabeled images, each time it
        receives the global model (e.g. FedBN's normalisation, for the weights just received)."""

    def prepare(
        self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, strata: torch.Tensor
    ) -> None:
        """Called once before local training, at the received model, on the training split."""

    def logits(self, model: torch.nn.Module, images: torch.Tensor, strata: torch.Tensor | None) -> torch.Tensor:
        """The logits the objective trains: the model's prediction, unless it conditions on strata."""
        return model(images)

    @abstractmethod
    def loss(
        self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, strata: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar to minimise on one mini-batch, and statistics to report."""

    def validation_loss(
        self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, strata: torch.Tensor | None = None
    ) -> float:
        """The objective itself on held-back data: what model selection minimises."""
        model.eval()
        loss, _ = self.loss(model, images, labels, strata)
        return loss.item()

    def update(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        images: torch.Tensor,
        labels: torch.Tensor,
        strata: torch.Tensor | None = None,
    ) -> dict[str, float]:
        loss, stats = self.loss(model, images, labels, strata)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return stats


def weighted_mean_statistics(parts: list[tuple[float, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """Example-weighted mean of each statistic over the hospitals (NaN entries left out)."""
    sums: dict[str, np.ndarray] = {}
    weights: dict[str, np.ndarray] = {}
    for count, values in parts:
        for key, value in values.items():
            vector = np.asarray(value, dtype=np.float64).reshape(-1)
            if key in sums and sums[key].shape != vector.shape:
                continue  # a malformed statistic does not get a vote
            finite = np.isfinite(vector)
            sums[key] = sums.get(key, np.zeros_like(vector)) + np.where(finite, vector, 0.0) * count
            weights[key] = weights.get(key, np.zeros_like(vector)) + finite * count
    return {key: np.where(weights[key] > 0, sums[key] / np.maximum(weights[key], 1e-12), np.nan) for key in sums}


def irm_penalty(logits: torch.Tensor, labels: torch.Tensor, *, split_halves: bool = True) -> torch.Tensor:
    """IRMv1: squared gradient of the risk w.r.t. a dummy classifier scale of 1.0.

    ``split_halves``: the unbiased mini-batch form (DomainBed), the product of the gradients
    on two halves of the batch; it can be negative. Off: the plain square, never negative,
    which suits scoring a whole validation split.
    """
    scale = torch.ones((), requires_grad=True)
    if not split_halves:
        loss = F.binary_cross_entropy_with_logits(logits * scale, labels)
        return torch.autograd.grad(loss, [scale], create_graph=True)[0] ** 2
    loss_a = F.binary_cross_entropy_with_logits(logits[0::2] * scale, labels[0::2])
    loss_b = F.binary_cross_entropy_with_logits(logits[1::2] * scale, labels[1::2])
    grad_a = torch.autograd.grad(loss_a, [scale], create_graph=True)[0]
    grad_b = torch.autograd.grad(loss_b, [scale], create_graph=True)[0]
    return grad_a * grad_b


class ERM(Objective):
    """Empirical risk minimisation: plain binary cross-entropy."""

    name = "erm"

    def loss(self, model, images, labels, strata=None):
        risk = F.binary_cross_entropy_with_logits(self.logits(model, images, strata), labels)
        return risk, {"risk": risk.item()}


class IRMParams(ObjectiveParams):
    penalty_weight: float = Field(1000.0, ge=0.0)
    warmup_rounds: int = Field(5, ge=0)


class IRMv1(Objective):
    """Invariant risk minimisation (Arjovsky et al. 2019) with a warm-up.

    During warm-up the penalty weight is 1 (the model first learns features); afterwards it
    jumps to ``penalty_weight`` and the loss is rescaled by it so the step size stays sane.

    Hospitals differ in prevalence, and under such label shift no single classifier is
    optimal at every hospital, so the plain penalty pushes the network to recognise the
    hospital (its scanner, its tags) to fit each one's prior: the very shortcut IRM is meant
    to remove. Each hospital therefore scores the federation's classifier shifted by its
    own prior (Bayes' rule, ``prior_shift_offset``), and the penalty asks only for what
    label shift leaves invariant. The federation's prevalence is a broadcast statistic.
    """

    name = "irm"
    Params = IRMParams
    per_example_loss = False  # the penalty couples the examples of a batch
    prior_offset: float | None = None  # this hospital's logit shift; None until prepare() ran

    @property
    def warmup_rounds(self) -> int:
        return self.params.warmup_rounds

    def penalty_weight(self) -> float:
        return self.params.penalty_weight if self.server_round > self.params.warmup_rounds else 1.0

    def statistics(self, model, images, labels, strata=None):
        return {"prevalence": np.array([float(labels.float().mean())])}

    def prepare(self, model, images, labels, strata):
        federation = self.federation.get("prevalence")
        self.prior_offset = 0.0  # before the first broadcast there is no federation prior to shift to
        if federation is not None and 0.0 < float(federation[0]) < 1.0:
            self.prior_offset = prior_shift_offset(
                local_positive=int(labels.sum()), local_total=len(labels), reference_prevalence=float(federation[0])
            )

    def logits(self, model, images, strata):
        return super().logits(model, images, strata) + (self.prior_offset or 0.0)

    def loss(self, model, images, labels, strata=None):
        logits = self.logits(model, images, strata)
        risk = F.binary_cross_entropy_with_logits(logits, labels)
        penalty = irm_penalty(logits, labels)
        weight = self.penalty_weight()
        total = (risk + weight * penalty) / max(weight, 1.0)
        return total, {"risk": risk.item(), "penalty": penalty.item()}

    def validation_loss(self, model, images, labels, strata=None):
        model.eval()
        if self.prior_offset is None:  # evaluation without training: this split's prior
            self.prepare(model, images, labels, strata)
        logits = self.logits(model, images, strata)
        risk = F.binary_cross_entropy_with_logits(logits, labels)
        penalty = irm_penalty(logits, labels, split_halves=False)
        weight = self.penalty_weight()
        return ((risk + weight * penalty) / max(weight, 1.0)).item()


def validate_objective(name: str, params: dict[str, Any]) -> ObjectiveParams:
    """Check an objective name and its parameters; raise ValueError with what is wrong."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; registered: {sorted(OBJECTIVES)}")
    try:
        return OBJECTIVES[name].Params.model_validate(params)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ValueError(f"bad parameters for objective {name!r}: {problems}") from None


def check_training(training: TrainingConfig, data: DataConfig) -> None:
    """Raise ValueError if the scenario's training recipe cannot run on its data: an unknown
    objective or parameters, DP-SGD with an objective whose loss is not per example, or an
    image model for feature rows."""
    validate_objective(training.objective, training.objective_params)
    objective = OBJECTIVES[training.objective]
    if training.privacy is not None and not objective.per_example_loss:
        raise ValueError(
            f"objective {training.objective!r} is not a sum of per-example losses, so DP-SGD's "
            "per-example clipping cannot bound its sensitivity; use it without [training.privacy]"
        )
    if training.privacy is not None and objective.architecture != "plain":
        raise ValueError(
            f"objective {training.objective!r} trains the {objective.architecture!r} model; DP-SGD runs on the plain "
            "one, whose layers Opacus can clip per example"
        )
    if data.source == "heart_disease" and objective.architecture != "plain":
        raise ValueError(
            f"objective {training.objective!r} needs an image model; the heart-disease hospitals have feature rows only"
        )


def build_objective(
    name: str, params: dict[str, Any], *, server_round: int, num_rounds: int | None = None,
    federation: dict[str, np.ndarray] | None = None,
) -> Objective:
    return OBJECTIVES[name](validate_objective(name, params), server_round=server_round, num_rounds=num_rounds,
                            federation=federation)


def planned_warmup_rounds(training: TrainingConfig, *, num_rounds: int) -> int:
    """The rounds a run of ``training`` spends warming up, which model selection skips."""
    return build_objective(training.objective, training.objective_params, server_round=1,
                           num_rounds=num_rounds).warmup_rounds



# Objectives that need federation statistics, and the backdoor adjustments, live in their
# own modules: importing them registers them (at the end, as they build on the classes above).
import client.federated_objectives  # noqa: E402, F401
import client.adjusted_objectives  # noqa: E402, F401
import client.subspace_objectives  # noqa: E402, F401
