"""Site datasets as plain arrays: what one hospital holds, split into train/val/test.

Images are float32 in [0, 1] with shape (n, 1, 28, 28); a tabular hospital (e.g. the UCI
heart-disease sites) holds feature rows of shape (n, d) in the same field. Labels are int64
in {0, 1}.

``recorded`` holds what the hospital writes down per case (acquisition protocol,
post-processing, patient sex: 0/1 states by confounder name); the backdoor-adjusted
objectives use it as strata. ``confounders`` holds a simulation's hidden truth (every
confounder's state and the lesion), for tests and analyses; a real hospital's file has none.

The file a hospital provides (``docs/site-data.md``) is one ``.npz`` with, for each split
``train``, ``val`` and ``test``: ``<split>_images``, ``<split>_labels`` and optionally
``<split>_meta_<name>`` per recorded confounder; plus optional ``name`` and ``role``.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SHAPE = (1, 28, 28)
SPLITS = ("train", "val", "test")
META_PREFIX = "meta_"
HIDDEN_PREFIX = "confounder_"


class SiteDataError(ValueError):
    """A hospital's data that cannot be used; the message names the file and the array."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray
    labels: np.ndarray
    recorded: dict[str, np.ndarray] = field(default_factory=dict)
    confounders: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        is_image = self.images.ndim == 4 and self.images.shape[1:] == IMAGE_SHAPE
        if not (is_image or self.images.ndim == 2):
            raise ValueError(f"inputs must be images (n, 1, 28, 28) or feature rows (n, d), got {self.images.shape}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and not np.isin(self.labels, (0, 1)).all():
            raise ValueError("labels must be binary (0/1)")
        for name, states in self.recorded.items():
            if len(states) != len(self.labels):
                raise ValueError(f"recorded {name!r} has {len(states)} values for {len(self.labels)} cases")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def subset(self, index: np.ndarray) -> Split:
        return Split(
            images=self.images[index],
            labels=self.labels[index],
            recorded={k: v[index] for k, v in self.recorded.items()},
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
            for key, value in split.recorded.items():
                arrays[f"{split_name}_{META_PREFIX}{key}"] = value
            for key, value in split.confounders.items():
                arrays[f"{split_name}_{HIDDEN_PREFIX}{key}"] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> SiteData:
        """Read and check a hospital's file; SiteDataError names the file and the array."""
        path = Path(path)
        if not path.is_file():
            raise SiteDataError(f"site data file not found: {path}")
        if not zipfile.is_zipfile(path):
            raise SiteDataError(f"{path}: not an .npz file, or a truncated one (an .npz is a zip archive of named "
                                "arrays; see docs/site-data.md)")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise SiteDataError(f"{path}: corrupt or truncated .npz ({type(error).__name__})") from None
        return site_from_arrays(arrays, origin=str(path), default_name=path.stem)


def _checked(arrays: dict[str, np.ndarray], key: str, origin: str) -> np.ndarray:
    if key not in arrays:
        raise SiteDataError(f"{origin}: array {key!r} is missing (see docs/site-data.md)")
    return arrays[key]


def _split_from_arrays(arrays: dict[str, np.ndarray], split: str, origin: str) -> Split:
    images = _checked(arrays, f"{split}_images", origin)
    labels = _checked(arrays, f"{split}_labels", origin)
    where = f"{origin}: array '{split}_images'"
    if not np.issubdtype(images.dtype, np.number) or images.dtype == np.bool_:
        raise SiteDataError(f"{where} has dtype {images.dtype}, expected numbers")
    if not (images.ndim == 4 and images.shape[1:] == IMAGE_SHAPE) and images.ndim != 2:
        raise SiteDataError(f"{where} has shape {images.shape}, expected (n, 1, 28, 28) images or (n, d) rows")
    if not np.all(np.isfinite(images)):
        raise SiteDataError(f"{where} holds {int((~np.isfinite(images)).sum())} NaN or infinite values")
    if images.ndim == 4 and (images.min(initial=0.0) < 0.0 or images.max(initial=0.0) > 1.0):
        raise SiteDataError(f"{where} has values outside [0, 1] ({images.min():.3g} to {images.max():.3g})")
    where = f"{origin}: array '{split}_labels'"
    if labels.ndim != 1 or len(labels) != len(images):
        raise SiteDataError(f"{where} has shape {labels.shape}, expected ({len(images)},) to match the images")
    if not np.issubdtype(labels.dtype, np.number) or not np.isin(labels, (0, 1)).all():
        raise SiteDataError(f"{where} must hold only 0 and 1, found {sorted(np.unique(labels).tolist())[:5]}")
    recorded, hidden = {}, {}
    for key, values in arrays.items():
        for prefix, target in ((f"{split}_{META_PREFIX}", recorded), (f"{split}_{HIDDEN_PREFIX}", hidden)):
            if key.startswith(prefix):
                if values.shape != (len(labels),) or not np.isin(values, (0, 1)).all():
                    raise SiteDataError(f"{origin}: array {key!r} must hold one 0/1 state per case ({len(labels)})")
                target[key[len(prefix):]] = values.astype(np.int64)
    return Split(images.astype(np.float32), labels.astype(np.int64), recorded, hidden)


def site_from_arrays(arrays: dict[str, np.ndarray], *, origin: str, default_name: str) -> SiteData:
    splits = {name: _split_from_arrays(arrays, name, origin) for name in SPLITS}
    shapes = {s.input_shape for s in splits.values() if len(s)}
    if len(shapes) > 1:
        raise SiteDataError(f"{origin}: the splits' inputs differ in shape: {sorted(shapes)}")
    if len(splits["train"]) < 2:
        raise SiteDataError(f"{origin}: array 'train_labels' holds {len(splits['train'])} cases; a hospital needs 2 or more")
    name = str(arrays["name"]) if "name" in arrays else default_name
    role = str(arrays["role"]) if "role" in arrays else "train"
    if role not in ("train", "heldout"):
        raise SiteDataError(f"{origin}: array 'role' is {role!r}, expected 'train' or 'heldout'")
    return SiteData(name=name, role=role, **splits)


def check_site(site: SiteData, *, origin: str) -> SiteData:
    """Every check a hospital's file gets, on data already in memory (a simulated hospital)."""
    arrays: dict[str, np.ndarray] = {"name": np.array(site.name), "role": np.array(site.role)}
    for split_name in SPLITS:
        split = site.split(split_name)
        arrays |= {f"{split_name}_images": split.images, f"{split_name}_labels": split.labels}
        arrays |= {f"{split_name}_{META_PREFIX}{k}": v for k, v in split.recorded.items()}
    return site_from_arrays(arrays, origin=origin, default_name=site.name)


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
