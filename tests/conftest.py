from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from simulations.scenario import SimulationScenario as Scenario, load_scenario

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The verified real data beside the checkout (CI clones put shared/ next to the repo)."""
    return Path(os.environ.get("CAUSALFED_SHARED_DATA", REPO.parent / "shared" / "data"))


def load_benchmark(name: str) -> ModuleType:
    """A script under benchmarks/ (not a package) as a module, so tests can call its parts."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "medmnist").is_dir():
        pytest.skip(f"real data not found at {path} (set CAUSALFED_SHARED_DATA)")
    return path


def shrunk_default() -> Scenario:
    """The default world, shrunk so a federation round takes well under a second."""
    raw = load_scenario().model_dump(mode="json")
    for site in raw["data"]["sites"]:
        site["n_samples"] = 200
    raw["federation"]["num_rounds"] = 2
    raw["federation"]["engine"] = "inprocess"
    raw["training"]["batch_size"] = 32
    raw["training"]["local_epochs"] = 1
    return Scenario.model_validate(raw)


@pytest.fixture
def small_scenario() -> Scenario:
    return shrunk_default()


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    """One finished run of the shrunk default world, shared by the tests that only read it."""
    from simulations.runner import run_scenario

    run_dir = tmp_path_factory.mktemp("small-run")
    run_scenario(shrunk_default(), run_dir=run_dir)
    return run_dir
