from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.config import Scenario, load_scenario

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The verified real data beside the checkout (CI clones put shared/ next to the repo)."""
    return Path(os.environ.get("CAUSALFED_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "medmnist").is_dir():
        pytest.skip(f"real data not found at {path} (set CAUSALFED_SHARED_DATA)")
    return path


@pytest.fixture
def small_scenario() -> Scenario:
    """The default world, shrunk so a federation round takes well under a second."""
    scenario = load_scenario()
    raw = scenario.model_dump(mode="json")
    for site in raw["data"]["sites"]:
        site["n_samples"] = 200
    raw["federation"]["num_rounds"] = 2
    raw["federation"]["engine"] = "inprocess"
    raw["training"]["batch_size"] = 32
    raw["training"]["local_epochs"] = 1
    return Scenario.model_validate(raw)
