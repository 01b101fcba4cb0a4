"""The UCI Heart Disease files from 4 real hospitals (FLamby's Fed-Heart-Disease), as they are.

Each file is one hospital: Cleveland, Hungary, Switzerland, Long Beach VA. The shift between
them is real (age, sex mix, prevalence from 36% to 94%), and so is the missingness. It is
handled explicitly, in one of two ways:

- ``flamby``: FLamby's convention, so results compare with its published figures. Drop
  ``ca``, ``slope`` and ``thal`` (missing at most sites), drop the rows still incomplete,
  and one-hot encode ``cp``: 13 features. This leaves 303/261/46/130 patients, split
  66/34 into train/test as FLamby does (199/104, 172/89, 30/16, 85/45).
- ``indicators``: keep every patient and all 13 attributes. ``chol == 0`` also counts as
  missing (it is Switzerland's placeholder). Each missing value is replaced by the
  federation's training mean, and a 0/1 column says which values were missing.

Features are standardised with the federation's training mean and standard deviation.
These come from per-hospital counts, sums and sums of squares: one round of federated
summation stands in for pooling.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from common.config import DataConfig, ScenarioError
from common.data import SiteData, Split

COLUMNS = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak", "slope", "ca", "thal")
HOSPITAL_FILES = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}
FLAMBY_DROPPED = ("slope", "ca", "thal")
CHEST_PAIN_TYPES = (1, 2, 3, 4)
FLAMBY_TEST_FRACTION = 0.34  # reproduces FLamby's per-centre train/test counts exactly
# The split is fixed, as FLamby's is: seeds vary training, not which patients are tested.
SPLIT_SEED = 42


def feature_names(missing: str) -> list[str]:
    if missing == "flamby":
        kept = [c for c in COLUMNS if c not in FLAMBY_DROPPED and c != "cp"]
        return kept + [f"cp={value}" for value in CHEST_PAIN_TYPES]
    return list(COLUMNS) + [f"{column} missing" for column in COLUMNS]


def read_hospital(folder: Path, hospital: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw attributes (NaN where the file says '?') and binary labels (num > 0)."""
    path = Path(folder) / HOSPITAL_FILES[hospital]
    if not path.is_file():
        raise ScenarioError(f"heart-disease file not found: {path} (set data.heart_disease_dir)")
    with path.open() as handle:
        rows = [[np.nan if value == "?" else float(value) for value in row] for row in csv.reader(handle) if row]
    table = np.asarray(rows, dtype=np.float64)
    if table.shape[1] != len(COLUMNS) + 1:
        raise ScenarioError(f"{path}: expected {len(COLUMNS) + 1} columns, found {table.shape[1]}")
    return table[:, :-1], (table[:, -1] > 0).astype(np.int64)


def _flamby_rows(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    kept = [i for i, c in enumerate(COLUMNS) if c not in FLAMBY_DROPPED]
    complete = ~np.isnan(raw[:, kept]).any(axis=1)
    table = raw[complete]
    columns = [table[:, COLUMNS.index(c)] for c in COLUMNS if c not in FLAMBY_DROPPED and c != "cp"]
    chest_pain = table[:, COLUMNS.index("cp")]
    columns += [(chest_pain == value).astype(np.float64) for value in CHEST_PAIN_TYPES]
    return np.stack(columns, axis=1), complete


def _indicator_rows(raw: np.ndarray) -> np.ndarray:
    table = raw.copy()
    chol = COLUMNS.index("chol")
    table[table[:, chol] == 0, chol] = np.nan  # a placeholder, not a cholesterol level
    return np.concatenate([table, np.isnan(table).astype(np.float64)], axis=1)


@lru_cache(maxsize=4)
def _federation(folder: str, missing: str) -> dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Per hospital: features and labels of each split, standardised federation-wide."""
    splits = {}
    for hospital in HOSPITAL_FILES:
        raw, labels = read_hospital(Path(folder), hospital)
        if missing == "flamby":
            features, kept = _flamby_rows(raw)
            labels = labels[kept]
        else:
            features = _indicator_rows(raw)
        train, test = train_test_split(
            np.arange(len(labels)), test_size=FLAMBY_TEST_FRACTION, random_state=SPLIT_SEED, shuffle=True
        )
        splits[hospital] = ({"train": features[train], "test": features[test]}, {"train": labels[train], "test": labels[test]})
    mean, std = _federated_moments([x["train"] for x, _ in splits.values()])
    for features, _ in splits.values():
        for name, values in features.items():
            filled = np.where(np.isnan(values), mean, values)  # the federation's mean
            features[name] = ((filled - mean) / std).astype(np.float32)
    return splits


def _federated_moments(tables: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std from each hospital's (count, sum, sum of squares), ignoring missing values."""
    count = sum((~np.isnan(t)).sum(axis=0) for t in tables)
    total = sum(np.nansum(t, axis=0) for t in tables)
    squares = sum(np.nansum(t**2, axis=0) for t in tables)
    mean = total / np.maximum(count, 1)
    std = np.sqrt(np.maximum(squares / np.maximum(count, 1) - mean**2, 0.0))
    return mean, np.where(std > 1e-8, std, 1.0)


def heart_disease_site(data: DataConfig, site_index: int) -> SiteData:
    """One real hospital; its validation split is carved from its training split."""
    site = data.sites[site_index]
    features, labels = _federation(str(Path(data.heart_disease_dir).resolve()), data.missing)[site.name]
    rng = np.random.default_rng(SPLIT_SEED)
    order = rng.permutation(len(labels["train"]))
    n_val = max(2, round(len(order) * data.val_fraction))
    val, train = order[:n_val], order[n_val:]
    return SiteData(
        name=site.name,
        role=site.role,
        train=Split(images=features["train"][train], labels=labels["train"][train]),
        val=Split(images=features["train"][val], labels=labels["train"][val]),
        test=Split(images=features["test"], labels=labels["test"]),
    )
