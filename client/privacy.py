"""DP-SGD for one hospital's local training (Opacus), with a privacy ledger kept across rounds.

Pure PyTorch/Opacus, no Flower. The ledger is the RDP accountant's history, a list of
``(noise_multiplier, sample_rate, steps)``: the ClientApp keeps it in ``context.state``
so epsilon accumulates over the whole federation instead of restarting every round
(the official Opacus example resets it per round, which under-reports the loss).
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import DataLoader, TensorDataset

from client.task import run_updates, split_strata, split_tensors
from common.data import Split

if TYPE_CHECKING:
    from client.objectives import Objective

LedgerEntry = tuple[float, float, int]
# Opacus's default RDP orders stop at 63, too low for the small budgets hospitals ask for
# (it warns that the optimum is the largest order): go higher for a tighter epsilon.
RDP_ORDERS = [*RDPAccountant.DEFAULT_ALPHAS, *range(64, 256, 16), *range(256, 1025, 64)]


class PrivacyBudgetSpent(RuntimeError):
    """Another round of training would take this hospital past its epsilon budget."""


@dataclass
class PrivacyLedger:
    """Every DP-SGD step this hospital has taken in the federation, for the accountant."""

    entries: list[LedgerEntry] = field(default_factory=list)

    def epsilon(self, *, delta: float) -> float:
        return epsilon_for(self.entries, delta=delta)

    def to_json(self) -> str:
        return json.dumps(self.entries)

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        return cls([(float(z), float(q), int(s)) for z, q, s in json.loads(text)])


def epsilon_for(entries: list[LedgerEntry], *, delta: float) -> float:
    """RDP epsilon after all ``entries`` (0 when nothing was spent)."""
    if not entries:
        return 0.0
    merged: dict[tuple[float, float], int] = {}
    for noise, rate, steps in entries:  # same mechanism, same cost: one accountant entry
        merged[(noise, rate)] = merged.get((noise, rate), 0) + steps
    accountant = RDPAccountant()
    accountant.history = [(noise, rate, steps) for (noise, rate), steps in merged.items()]
    return float(accountant.get_epsilon(delta=delta, alphas=RDP_ORDERS))


def batches_per_epoch(*, num_examples: int, batch_size: int) -> int:
    return max(1, math.ceil(num_examples / batch_size))


def sample_rate_for(*, num_examples: int, batch_size: int) -> float:
    """Opacus's Poisson rate for a loader of this size: one over its number of batches."""
    return 1.0 / batches_per_epoch(num_examples=num_examples, batch_size=batch_size)


@functools.lru_cache(maxsize=256)  # a binary search over the accountant: worth remembering
def calibrated_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, total_steps: int
) -> float:
    """The smallest noise that keeps the whole planned training within ``target_epsilon``."""
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=total_steps,
            alphas=RDP_ORDERS,
        )
    )


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    budget: float


def check_budget(ledger: PrivacyLedger, settings: DPSettings, *, sample_rate: float, steps: int) -> float:
    """Epsilon after one more round; raises PrivacyBudgetSpent if that exceeds the budget."""
    after = epsilon_for([*ledger.entries, (settings.noise_multiplier, sample_rate, steps)], delta=settings.delta)
    # A hair of slack: the calibration itself targets the budget to within 1%.
    if after > settings.budget * 1.01:
        spent = ledger.epsilon(delta=settings.delta)
        raise PrivacyBudgetSpent(
            f"privacy budget spent: epsilon {spent:.3f} so far, another round would reach "
            f"{after:.3f} > budget {settings.budget:g} (delta {settings.delta:g}); this hospital stops training"
        )
    return after


def train_privately(
    model: torch.nn.Module,
    split: Split,
    objective: Objective,
    settings: DPSettings,
    ledger: PrivacyLedger,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    seed: int,
) -> dict[str, float]:
    """DP-SGD (per-example clipping, Gaussian noise, Poisson batches) for one round.

    The round's steps join ``ledger`` whether or not a Poisson draw came out empty, so
    the recorded loss is never below the real one.
    """
    per_epoch = batches_per_epoch(num_examples=len(split), batch_size=batch_size)
    sample_rate = 1.0 / per_epoch
    check_budget(ledger, settings, sample_rate=sample_rate, steps=epochs * per_epoch)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    objective.prepare(model, *split_tensors(split), split_strata(split))  # as train_locally does
    model.train()
    private_model, dp_optimizer, loader = _make_private(model, optimizer, split, settings, batch_size=batch_size, seed=seed)
    batches = ((images, labels) for _ in range(epochs) for images, labels in loader if len(labels) > 0)
    try:
        with warnings.catch_warnings():
            # Inputs never require grad, so Opacus's backward hooks say so on every batch.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            stats = run_updates(private_model, dp_optimizer, objective, batches)  # empty Poisson draws skipped
    finally:
        private_model._close()  # detach Opacus hooks: the plain model goes back to Flower
    ledger.entries.append((settings.noise_multiplier, sample_rate, epochs * per_epoch))
    return stats | {
        "dp-epsilon": ledger.epsilon(delta=settings.delta),
        "dp-noise-multiplier": settings.noise_multiplier,
        "dp-sample-rate": sample_rate,
        "dp-max-grad-norm": settings.max_grad_norm,
        "dp-delta": settings.delta,
        "dp-steps": float(epochs * per_epoch),
    }


def _make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    split: Split,
    settings: DPSettings,
    *,
    batch_size: int,
    seed: int,
):
    """Wrap model, optimizer and data for DP-SGD: (private_model, dp_optimizer, poisson_loader)."""
    dataset = TensorDataset(
        torch.as_tensor(split.images, dtype=torch.float32), torch.as_tensor(split.labels).float()
    )
    loader = DataLoader(dataset, batch_size=batch_size, generator=torch.Generator().manual_seed(seed))
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off; the simulator does not need a CSPRNG.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        return engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(seed + 1),
        )
