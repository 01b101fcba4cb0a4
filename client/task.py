"""Pure PyTorch: the model, local training and evaluation. No Flower in this module."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from client.models import FEATURE_DIM, new_model, strata_index  # noqa: F401 (re-exported)
from common.protocol import TrainInstructions
from common.data import Split
from common.feature_shift import FeatureMoments
from common.metrics import binary_metrics

if TYPE_CHECKING:
    from client.objectives import Objective


def model_for(objective: str, *, input_shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """A fresh model of the kind ``objective`` trains (``client.objectives``), for these inputs."""
    from client.objectives import OBJECTIVES  # objectives import this module's types

    return new_model(seed=seed, input_shape=input_shape, architecture=OBJECTIVES[objective].architecture)


def train_as_instructed(model: nn.Module, split: Split, instructions: TrainInstructions, *, seed: int) -> dict[str, float]:
    """One round of local training, in place, as the server's instructions ask (no DP-SGD):
    what a hospital does, and what the server's reference trainings repeat."""
    from client.objectives import build_objective

    objective = build_objective(instructions.objective, instructions.params(), server_round=instructions.server_round,
                                num_rounds=instructions.num_rounds)
    return train_locally(model, split, objective, epochs=instructions.local_epochs, batch_size=instructions.batch_size,
                         learning_rate=instructions.learning_rate, weight_decay=instructions.weight_decay, seed=seed)


def state_to_numpy(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, v.detach().cpu().numpy()) for k, v in model.state_dict().items())


def load_numpy_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    expected = model.state_dict()
    if set(state) != set(expected):
        raise ValueError(
            f"model arrays do not match: missing {sorted(set(expected) - set(state))}, "
            f"unexpected {sorted(set(state) - set(expected))}"
        )
    tensors = OrderedDict()
    for key, reference in expected.items():
        value = np.asarray(state[key])
        if value.shape != tuple(reference.shape):
            raise ValueError(f"array {key!r} has shape {value.shape}, expected {tuple(reference.shape)}")
        tensors[key] = torch.as_tensor(value, dtype=reference.dtype)
    model.load_state_dict(tensors)


def split_tensors(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images and labels as the float tensors training and the objectives use."""
    return torch.as_tensor(split.images, dtype=torch.float32), torch.as_tensor(split.labels).float()


def split_strata(split: Split) -> torch.Tensor:
    """Each case's stratum from the acquisition states its hospital recorded."""
    return torch.as_tensor(strata_index(split.recorded, num_cases=len(split)))


def train_locally(
    model: nn.Module,
    split: Split,
    objective: Objective,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    seed: int,
) -> dict[str, float]:
    """Run ``epochs`` passes of ``objective.update`` over shuffled mini-batches.

    A fresh Adam per call: each round restarts the optimizer, which is also the restart
    IRM needs when its penalty switches on at a round boundary.
    """
    images, labels = split_tensors(split)
    strata = split_strata(split)
    generator = torch.Generator().manual_seed(seed)
    objective.prepare(model, images, labels, strata)
    groups = [group if isinstance(group, dict) else {"params": [group]} for group in objective.trainable(model)]
    groups = [{"params": g["params"], "lr": learning_rate * g.get("lr_scale", 1.0)} for g in groups]
    optimizer = torch.optim.Adam(groups, lr=learning_rate, weight_decay=weight_decay)

    def batches() -> Iterator[tuple[torch.Tensor, ...]]:
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=generator)
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                if len(batch) >= 2:  # a lone example gives no usable penalty estimate
                    yield images[batch], labels[batch], strata[batch]

    return run_updates(model, optimizer, objective, batches())


def run_updates(
    model: nn.Module, optimizer: torch.optim.Optimizer, objective: Objective, batches: Iterable
) -> dict[str, float]:
    """One ``objective.update`` per batch; the statistics averaged over steps, and the steps."""
    model.train()
    totals: dict[str, float] = {}
    steps = 0
    for images, labels, *strata in batches:
        for key, value in objective.update(model, optimizer, images, labels, *strata).items():
            totals[key] = totals.get(key, 0.0) + value
        steps += 1
    return {key: value / max(steps, 1) for key, value in totals.items()} | {"steps": float(steps)}


def evidence_reader(model: nn.Module):
    """The callable giving the logit that calibration and decisions read."""
    return getattr(model, "evidence_logit", model)


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    """The logits that calibration and decisions read (float64): the model's
    ``evidence_logit`` where it has one (strata-adjusted models), else its output."""
    model.eval()
    read = evidence_reader(model)
    tensor = torch.as_tensor(images, dtype=torch.float32)
    outputs = [read(tensor[i : i + batch_size]) for i in range(0, len(tensor), batch_size)]
    return torch.cat(outputs).double().numpy() if outputs else np.zeros(0)


@torch.no_grad()
def predict_scores(
    model: nn.Module, images: np.ndarray, *, batch_size: int = 512, logit_offset: float = 0.0
) -> np.ndarray:
    """Probabilities of label 1 (after adding ``logit_offset`` to the model's logit)."""
    model.eval()
    tensor = torch.as_tensor(images, dtype=torch.float32)
    outputs = [
        torch.sigmoid(model(tensor[i : i + batch_size]) + logit_offset) for i in range(0, len(tensor), batch_size)
    ]
    return torch.cat(outputs).numpy() if outputs else np.zeros(0, dtype=np.float32)


def evaluate(
    model: nn.Module, split: Split, objective: Objective | None = None, *, logit_offset: float = 0.0
) -> dict[str, float]:
    """AUROC, accuracy and log-loss of the model on one split (and the objective's value)."""
    scores = predict_scores(model, split.images, logit_offset=logit_offset)
    metrics = binary_metrics(labels=split.labels, scores=scores)
    if objective is not None:
        images, labels = split_tensors(split)
        metrics["objective"] = (
            objective.validation_loss(model, images, labels, split_strata(split)) if len(labels) > 1 else float("nan")
        )
    return metrics


@torch.no_grad()
def feature_moments(model: nn.Module, images: np.ndarray, *, batch_size: int = 512) -> FeatureMoments:
    """The moments of ``model.features`` over ``images`` (eval mode, in batches)."""
    model.eval()
    tensor = torch.as_tensor(images, dtype=torch.float32)
    features = torch.cat([model.features(tensor[i : i + batch_size]) for i in range(0, len(tensor), batch_size)])
    values = features.double().numpy()
    return FeatureMoments(len(values), values.mean(axis=0), values.var(axis=0))
