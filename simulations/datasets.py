"""Hospital datasets for a scenario: synthetic (the SCM) or real MedMNIST images with the
same injected acquisition and confounders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.config import DataConfig, ScenarioError
from server.config import Scenario
from common.data import IMAGE_SHAPE, SiteData, Split, split_indices
from simulations.scm import acquire, confounder_states, make_site, site_seed


def build_site(scenario: Scenario, site_index: int) -> SiteData:
    data = scenario.data
    if not 0 <= site_index < len(data.sites):
        raise ValueError(f"site index {site_index} out of range: scenario has {len(data.sites)} sites")
    if data.source == "synthetic":
        return make_site(data, site_index, seed=scenario.seed)
    if data.source == "heart_disease":
        from simulations.heart_disease import heart_disease_site

        return heart_disease_site(data, site_index)
    return medmnist_site(data, site_index, seed=scenario.seed)


def load_medmnist_binary(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All images (n, 28, 28) in [0, 1] and binary labels of a grayscale MedMNIST .npz."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"MedMNIST file not found: {path}")
    with np.load(path) as npz:
        keys = [f"{split}_{kind}" for split in ("train", "val", "test") for kind in ("images", "labels")]
        if any(k not in npz for k in keys):
            raise ScenarioError(f"{path} is not a MedMNIST file: expected arrays {keys}")
        images = np.concatenate([npz[f"{s}_images"] for s in ("train", "val", "test")])
        labels = np.concatenate([npz[f"{s}_labels"] for s in ("train", "val", "test")]).reshape(-1)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ScenarioError(f"{path}: need 28x28 grayscale images, got shape {images.shape[1:]}")
    if not np.isin(labels, (0, 1)).all():
        raise ScenarioError(f"{path}: labels are not binary ({sorted(np.unique(labels))[:6]}...)")
    return images.astype(np.float32) / 255.0, labels.astype(np.int64)


def _assign_patients(
    labels: np.ndarray, data: DataConfig, *, seed: int
) -> list[np.ndarray]:
    """Disjoint patient indices per site, drawn to match each site's prevalence."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 10_000]))
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in (0, 1)}
    assignments = []
    for site in data.sites:
        n_positive = round(site.n_samples * site.prevalence)
        wanted = {1: n_positive, 0: site.n_samples - n_positive}
        for label, count in wanted.items():
            if count > len(pools[label]):
                raise ScenarioError(
                    f"site {site.name!r} needs {count} images with label {label}, only "
                    f"{len(pools[label])} left in {data.medmnist_file}: lower n_samples"
                )
        chosen = [pools[c][: wanted[c]] for c in (0, 1)]
        for c in (0, 1):
            pools[c] = pools[c][wanted[c] :]
        assignments.append(np.concatenate(chosen).astype(np.int64))
    return assignments


def medmnist_site(data: DataConfig, site_index: int, *, seed: int) -> SiteData:
    """Real images split into hospitals; each gets its site's acquisition and confounders."""
    images, labels = load_medmnist_binary(data.medmnist_file or "")
    index = _assign_patients(labels, data, seed=seed)[site_index]
    site = data.sites[site_index]
    rng = np.random.default_rng(site_seed(seed, site_index))
    site_labels = labels[index]
    states = {
        name: confounder_states(site_labels, correlation=site.correlation_of(name), rng=rng)
        for name in data.confounders
        if name != "sex"  # a real image's anatomy is what it is
    }
    acquired = acquire(images[index], acquisition=site.acquisition, states=states, rng=rng)
    recorded = {name: states[name] for name in site.records(data.confounders) if name in states}
    full = Split(images=acquired[:, None], labels=site_labels, recorded=recorded, confounders=states)
    parts = split_indices(len(index), val_fraction=data.val_fraction, test_fraction=data.test_fraction, rng=rng)
    return SiteData(name=site.name, role=site.role, **{k: full.subset(v) for k, v in parts.items()})


def input_shape(data: DataConfig) -> tuple[int, ...]:
    """What one case of this data looks like to the model: an image, or a row of features."""
    if data.source == "heart_disease":
        from simulations.heart_disease import feature_names

        return (len(feature_names(data.missing)),)
    return IMAGE_SHAPE


def write_reference_set(scenario: Scenario, path: Path, *, cases: int = 200) -> Path:
    """A public-like labelled set for the server guard: ``cases`` cases of the scenario's
    world with no shortcut (correlation 0.5), taken with a scanner no hospital has (default
    acquisition), half of them positive. Written as the .npz the guard reads."""
    raw = scenario.model_dump(mode="json")
    for simulation_only in ("attack", "behaviour"):
        raw.pop(simulation_only, None)
    template = dict(next(s for s in raw["data"]["sites"] if s["role"] == "train"))
    n = max(40, round(cases / (1 - raw["data"]["val_fraction"] - raw["data"]["test_fraction"])) + 1)
    template |= {"name": "reference-set", "correlation": 0.5, "correlations": {}, "n_samples": n,
                 "prevalence": 0.5, "acquisition": {}, "recorded": None}
    raw["data"]["sites"].append(template)
    world = Scenario.model_validate(raw)
    train = build_site(world, len(raw["data"]["sites"]) - 1).train
    chosen = train.subset(np.arange(min(cases, len(train))))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=chosen.images, labels=chosen.labels)
    return path
