"""How far a hospital's images sit from the federation's, as the model's features see them.

Training hospitals report the first two moments of the global model's features over their
training images at the last round; the server pools them into the run folder. A new
hospital compares its own moments against them before `causalfed adapt`: where the model
sees its images as it saw the federation's, there is no acquisition shift to undo, and
adapting anyway only sharpens the model on noise. Numpy only; the moments themselves come
from ``client.task.feature_moments``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.files import atomic_write_text

FEATURE_MOMENTS_FILE = "feature-moments.json"
# Cohen's "small" standardised effect: a mean shift below it is not a shift worth adapting to.
SMALL_EFFECT = 0.2


@dataclass(frozen=True)
class FeatureMoments:
    """Per-feature mean and variance over ``count`` images."""

    count: int
    mean: np.ndarray
    variance: np.ndarray

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"feature moments need at least one image, got {self.count}")
        if self.mean.shape != self.variance.shape or self.mean.ndim != 1:
            raise ValueError(f"mean {self.mean.shape} and variance {self.variance.shape} must be equal-length vectors")
        if not (np.all(np.isfinite(self.mean)) and np.all(np.isfinite(self.variance)) and np.all(self.variance >= 0)):
            raise ValueError("feature moments must be finite, with non-negative variances")

    def to_record(self) -> dict[str, list[float] | int]:
        return {"count": self.count, "mean": self.mean.tolist(), "variance": self.variance.tolist()}

    @classmethod
    def from_record(cls, record) -> FeatureMoments:
        try:
            return cls(
                int(record["count"]),
                np.asarray(record["mean"], dtype=np.float64),
                np.asarray(record["variance"], dtype=np.float64),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a feature-moments record: {error!r}") from None

    def save(self, path: Path, **context) -> None:
        atomic_write_text(path, json.dumps(context | self.to_record()))

    @classmethod
    def load(cls, path: Path) -> FeatureMoments:
        try:
            return cls.from_record(json.loads(path.read_text()))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not JSON: {error}") from None


def pool_moments(parts: list[FeatureMoments]) -> FeatureMoments:
    """The moments of the union of the parts' images (law of total variance)."""
    if not parts:
        raise ValueError("no feature moments to pool")
    counts = np.array([part.count for part in parts], dtype=np.float64)
    weights = counts / counts.sum()
    means = np.stack([part.mean for part in parts])
    mean = weights @ means
    variance = weights @ np.stack([part.variance for part in parts]) + weights @ (means - mean) ** 2
    return FeatureMoments(int(counts.sum()), mean, variance)


def standardised_shift(new: FeatureMoments, reference: FeatureMoments, *, floor: float = 1e-8) -> float:
    """Mean absolute standardised mean difference over features (the pooled-SD SMD).

    Features dead at both (no variance) carry no information and are left out.
    """
    if new.mean.shape != reference.mean.shape:
        raise ValueError(f"{new.mean.size} features against a reference of {reference.mean.size}")
    pooled_sd = np.sqrt((new.variance + reference.variance) / 2)
    alive = pooled_sd > floor
    if not alive.any():
        return 0.0
    return float(np.mean(np.abs(new.mean[alive] - reference.mean[alive]) / pooled_sd[alive]))
