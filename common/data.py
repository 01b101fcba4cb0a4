"""Site datasets as plain arrays: what one hospital holds, split into train/val/test.

Images are float32 in [0, 1] with shape (n, 1, 28, 28); a tabular hospital (e.g. the UCI
heart-disease sites) holds feature rows of shape (n, d) in the same field. Labels are int64
in {0, 1}.
``confounders`` keeps the hidden state of every simulated confounder per image, so tests
and analyses can check the causal structure; a real hospital's file simply has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SHAPE = (1, 28, 28)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    images: np.ndarray
    labels: np.ndarray
    confounders: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        is_image = self.images.ndim == 4 and self.images.shape[1:] == IMAGE_SHAPE
        if not (is_image or self.images.ndim == 2):
            raise ValueError(f"inputs must be images (n, 1, 28, 28) or feature rows (n, d), got {self.images.shape}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and not np.isin(self.labels, (0, 1)).all():
            raise ValueError("labels must be binary (0/1)")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def subset(self, index: np.ndarray) -> Split:
        return Split(
            images=self.images[index],
            labels=self.labels[index],
            confounders={k: v[index] for k, v in self.confounders.items()},
        )


@dataclass(frozen=True)
class SiteData:
    name: str
    role: str
    train: Split
    val: Split
    test: Split

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def save(self, path: Path) -> None:
        """Write one hospital's data as a single .npz (what a deployed SuperNode mounts)."""
        arrays: dict[str, np.ndarray] = {"name": np.array(self.name), "role": np.array(self.role)}
        for split_name in SPLITS:
            split = self.split(split_name)
            arrays[f"{split_name}_images"] = split.images
            arrays[f"{split_name}_labels"] = split.labels
            for key, value in split.confounders.items():
                arrays[f"{split_name}_confounder_{key}"] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> SiteData:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"site data file not found: {path}")
        with np.load(path, allow_pickle=False) as npz:
            missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in npz]
            if missing:
                raise ValueError(f"{path} is not a causalfed site file; missing arrays {missing}")
            splits = {}
            for split_name in SPLITS:
                prefix = f"{split_name}_confounder_"
                splits[split_name] = Split(
                    images=npz[f"{split_name}_images"].astype(np.float32),
                    labels=npz[f"{split_name}_labels"].astype(np.int64),
                    confounders={k[len(prefix):]: npz[k] for k in npz.files if k.startswith(prefix)},
                )
            name = str(npz["name"]) if "name" in npz else path.stem
            role = str(npz["role"]) if "role" in npz else "train"
        return cls(name=name, role=role, **splits)


def split_indices(
    n: int, *, val_fraction: float, test_fraction: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """A random train/val/test partition of ``range(n)``."""
    order = rng.permutation(n)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return {
        "val": order[:n_val],
        "test": order[n_val : n_val + n_test],
        "train": order[n_val + n_test :],
    }
