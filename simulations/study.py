"""What ``causalfed simulate`` runs: the scenario's method and, on the same hospitals,
FedAvg-ERM, so that the first thing a run says is whether the method avoided the shortcut
that plain federated training learns.

Before anything runs, every hospital's data is built and checked (``preflight``): a bad
file or setting stops the command before a run folder exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.config import ScenarioError
from common.data import SiteDataError, check_site
from simulations.datasets import build_site
from simulations.runner import RoundCallback, run_scenario
from simulations.scenario import SimulationScenario
from server.resume import STATE_FILE

BASELINE_DIR = "baseline-erm"
BASELINE_LABEL = "FedAvg-ERM"


def preflight(scenario: SimulationScenario) -> None:
    """Build and check every hospital's data; ScenarioError names the hospital and problem."""
    for index, site in enumerate(scenario.data.sites):
        try:
            check_site(build_site(scenario, index), origin=f"hospital {site.name!r}")
        except (SiteDataError, ValueError, OSError) as error:
            raise ScenarioError(f"hospital {site.name!r}: {error}") from None


def wants_baseline(scenario: SimulationScenario) -> bool:
    return scenario.training.objective != "erm"


def baseline_of(scenario: SimulationScenario) -> SimulationScenario:
    """The same hospitals, rounds and engine, trained with plain FedAvg-ERM."""
    return scenario.with_overrides(training={"objective": "erm", "objective_params": {}})


@dataclass
class StudyResult:
    history: dict
    baseline: dict | None


def has_saved_round(run_dir: Path) -> bool:
    return (run_dir / STATE_FILE).is_file()


def run_study(
    scenario: SimulationScenario,
    run_dir: Path,
    *,
    baseline: bool,
    on_round: Callable[[str], RoundCallback] | None = None,
    resume: bool = False,
    engine: str | None = None,
) -> StudyResult:
    """The scenario's federation in ``run_dir`` and, with ``baseline``, FedAvg-ERM in
    ``run_dir/baseline-erm``. ``on_round(label)`` gives each run's progress callback."""
    main = run_scenario(scenario, run_dir=run_dir, engine=engine, resume=resume and has_saved_round(run_dir),
                        on_round=on_round(scenario.training.objective) if on_round else None)
    if not baseline:
        return StudyResult(main, None)
    folder = run_dir / BASELINE_DIR
    folder.mkdir(exist_ok=True)
    plain = baseline_of(scenario)
    reference = run_scenario(plain, run_dir=folder, engine=engine, resume=resume and has_saved_round(folder),
                             on_round=on_round(BASELINE_LABEL) if on_round else None)
    return StudyResult(main, reference)
