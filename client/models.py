"""Model architectures, registered by name. Pure PyTorch.

Every model has a ``features`` module (the representation) and a linear ``head`` giving
one logit, and ``model(x)`` is the prediction used everywhere (evaluation, the server's
probe, adaptation). The two backdoor-adjusted models also have ``conditional(x, z)``,
P(Y | X, z) for one entry z of their confounder dictionary, which is what they train;
``model(x)`` is then the interventional prediction

    P(Y | do(X)) = sum_z P(Y | X, z) P(z)

with P(z) kept in a buffer, so FedAvg's example-weighted mean of the hospitals' local
frequencies is the federation's P(z).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.data import IMAGE_SHAPE

FEATURE_DIM = 64
# Per-case acquisition facts a hospital records (DICOM protocol, post-processing, burned-in
# marker, patient sex), in a fixed order so every hospital numbers the strata alike.
RECORDED_STATES = ("tag", "denoising", "noise", "sex")
NUM_STRATA = 2 ** len(RECORDED_STATES)


def strata_index(recorded: dict[str, np.ndarray], *, num_cases: int) -> np.ndarray:
    """Stratum number per case from its recorded binary states (absent ones count as 0)."""
    index = np.zeros(num_cases, dtype=np.int64)
    for bit, name in enumerate(RECORDED_STATES):
        if name in recorded:
            index |= (np.asarray(recorded[name], dtype=np.int64) & 1) << bit
    return index


def _image_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, FEATURE_DIM), nn.ReLU(),
    )


class ChestNet(nn.Module):
    """A small CNN without batch statistics: usable with Opacus and with tiny batches."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _image_features()
        self.head = nn.Linear(FEATURE_DIM, 1)

    def represent(self, images: torch.Tensor) -> torch.Tensor:
        """What the head reads: the features (projected, in the subspace models)."""
        return self.features(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.represent(images)).squeeze(-1)


class ChestNetBN(ChestNet):
    """ChestNet with batch normalisation after each convolution: what FedBN keeps local."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, FEATURE_DIM), nn.ReLU(),
        )


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> None:
    """Replace every batch-norm layer's running statistics by those of ``images`` (AdaBN)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over every batch below
    model.train()
    for start in range(0, len(images), batch_size):
        model(images[start : start + batch_size])
    for layer, momentum in zip(layers, saved):
        layer.momentum = momentum
    model.eval()


class TabularNet(nn.Module):
    """Logistic regression on standardised feature rows (FLamby's Fed-Heart-Disease baseline)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.head = nn.Linear(num_features, 1)

    def represent(self, rows: torch.Tensor) -> torch.Tensor:
        return self.features(rows)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.head(self.represent(rows)).squeeze(-1)


def mixture_logit(conditional_logits: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """logit of sum_z prior_z * sigmoid(l_z) for logits (n, K), computed in log space."""
    log_prior = torch.log(prior.clamp_min(1e-12))
    log_positive = torch.logsumexp(log_prior + F.logsigmoid(conditional_logits), dim=1)
    log_negative = torch.logsumexp(log_prior + F.logsigmoid(-conditional_logits), dim=1)
    return log_positive - log_negative


class StrataAdjustedNet(ChestNet):
    """Backdoor adjustment over known strata: logit P(Y | X, z) = f(X) + b_z.

    b_z is the hospital's own logit P(Y | z), from counts (``fit_strata``). When the image's
    evidence about the lesion and the stratum are independent given Y, that sum is exactly
    Bayes' rule, so f only has to learn the evidence the strata do not already give: a
    burned-in tag or a denoising filter recorded in z adds nothing, the lesion does.
    """

    def __init__(self, num_strata: int = NUM_STRATA) -> None:
        super().__init__()
        self.register_buffer("stratum_logit", torch.zeros(num_strata))
        self.register_buffer("stratum_prior", torch.full((num_strata,), 1.0 / num_strata))

    def conditional(self, images: torch.Tensor, strata: torch.Tensor) -> torch.Tensor:
        return super().forward(images) + self.stratum_logit[strata]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = super().forward(images)[:, None] + self.stratum_logit[None]
        return mixture_logit(logits, self.stratum_prior)

    def evidence_logit(self, images: torch.Tensor) -> torch.Tensor:
        """f(X) alone, what calibration and decisions read. A hospital's own P(Y | z), mixed
        in, swamps the image where a tag tracks the label (every case on one side of the
        threshold); its prevalence enters through the prior shift instead."""
        return super().forward(images)

    @torch.no_grad()
    def fit_strata(self, strata: torch.Tensor, labels: torch.Tensor) -> None:
        """P(z) and Laplace-smoothed logit P(Y | z) from one hospital's cases."""
        size = self.stratum_prior.numel()
        counts = torch.bincount(strata, minlength=size).float()
        positives = torch.bincount(strata, weights=labels.float(), minlength=size)
        self.stratum_prior.copy_(counts / counts.sum())
        self.stratum_logit.copy_(torch.log((positives + 1) / (counts - positives + 1)))


# The prototypes' logits are stored divided by this: Adam's steps on them are this much
# larger, so the dictionary learns within the few steps of a round.
LOGIT_SCALE = 10.0


class StyleAdjustedNet(ChestNet):
    """Backdoor adjustment over learned acquisition-style prototypes (after MCDRL).

    A shallow convolution's channel means and standard deviations describe the image's
    style (contrast, noise, smoothing, burned-in marks: what AdaIN swaps). The style
    queries a dictionary of prototypes by cross-attention; each prototype k carries a
    label logit b_k, and the attended b is z's contribution: logit P(Y | X, z) = f(X) + z.
    Prediction averages over the prototypes with their mean attention P(z) as weights.
    """

    def __init__(self, num_prototypes: int = 8, key_dim: int = 16) -> None:
        super().__init__()
        self.style = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        # Style statistics differ by orders of magnitude (means vs. noise levels): normalised
        # before they query, or the attention stays uniform and the dictionary says nothing.
        self.query = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, key_dim))
        self.keys = nn.Parameter(torch.randn(num_prototypes, key_dim))
        # Unequal from the start: with equal logits the attention gets no gradient at all.
        self.prototype_logit = nn.Parameter(0.05 * torch.randn(num_prototypes))
        self.register_buffer("prototype_prior", torch.full((num_prototypes,), 1.0 / num_prototypes))

    def attention(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.style(images).flatten(2)
        style = torch.cat([maps.mean(dim=2), torch.log(maps.std(dim=2) + 1e-3)], dim=1)
        scores = self.query(style) @ self.keys.T
        return torch.softmax(scores, dim=1)

    def style_logit(self, images: torch.Tensor) -> torch.Tensor:
        """What the image's style alone says about the label: the attended prototype logit."""
        return self.attention(images) @ self.prototype_logit * LOGIT_SCALE

    def conditional(self, images: torch.Tensor, style_logit: torch.Tensor) -> torch.Tensor:
        return super().forward(images) + style_logit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = super().forward(images)[:, None] + LOGIT_SCALE * self.prototype_logit[None]
        return mixture_logit(logits, self.prototype_prior)

    def set_prior(self, frequencies: torch.Tensor) -> None:
        self.prototype_prior.copy_(frequencies / frequencies.sum())


class _Projected:
    """The head reads the features projected off a subspace: ``projection`` (a buffer, the
    identity until the subspace objectives set it) maps features to what the head sees."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("projection", torch.eye(FEATURE_DIM))

    def represent(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images) @ self.projection

    @torch.no_grad()
    def remove_directions(self, directions: torch.Tensor) -> None:
        """Project the features off the span of ``directions`` (rows, any scale)."""
        basis = torch.linalg.qr(directions.T).Q if len(directions) else directions.new_zeros((FEATURE_DIM, 0))
        self.projection.copy_(torch.eye(FEATURE_DIM) - basis @ basis.T)


class ProjectedNet(_Projected, ChestNet):
    """ChestNet whose head reads its features off the spurious subspace (``remove_directions``)."""


class StrataProjectedNet(_Projected, StrataAdjustedNet):
    """Backdoor adjustment over recorded strata, with the head reading projected features."""


ImageModel = Callable[[], nn.Module]
ARCHITECTURES: dict[str, ImageModel] = {
    "plain": ChestNet,
    "batchnorm": ChestNetBN,
    "strata-adjusted": StrataAdjustedNet,
    "style-adjusted": StyleAdjustedNet,
    "projected": ProjectedNet,
    "strata-projected": StrataProjectedNet,
}


def new_model(*, seed: int, input_shape: tuple[int, ...] = IMAGE_SHAPE, architecture: str = "plain") -> nn.Module:
    """The named image architecture for 28x28 images; TabularNet for feature rows (d,)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; registered: {sorted(ARCHITECTURES)}")
    torch.manual_seed(seed)
    if tuple(input_shape) == IMAGE_SHAPE:
        return ARCHITECTURES[architecture]()
    if len(input_shape) == 1 and input_shape[0] > 0:
        if architecture != "plain":
            raise ValueError(f"architecture {architecture!r} needs images; feature rows get logistic regression")
        return TabularNet(input_shape[0])
    raise ValueError(f"no model for inputs of shape {tuple(input_shape)}")


def architecture_of(state_keys: set[str]) -> str:
    """The registered image architecture whose parameters are exactly ``state_keys``."""
    for name, build in ARCHITECTURES.items():
        if set(build().state_dict()) == set(state_keys):
            return name
    raise ValueError("these weights match no registered image architecture")


def model_for_state(state: dict, *, input_shape: tuple[int, ...] = IMAGE_SHAPE) -> nn.Module:
    """A model of the architecture the saved ``state`` belongs to, loaded with it."""
    architecture = architecture_of(set(state)) if tuple(input_shape) == IMAGE_SHAPE else "plain"
    model = new_model(seed=0, input_shape=input_shape, architecture=architecture)
    model.load_state_dict(state)
    return model
