"""Run one scenario as a federation on this machine and keep everything in a run folder."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from flwr.app import Context, RecordDict

from client.app import build_client_app
from client.objectives import planned_warmup_rounds
from common.files import atomic_write_text
from common.provenance.log import HOSPITALS_DIR, PROVENANCE_DIR, ProvenanceLog, load_or_create_key
from common.provenance.records import public_pem
from server.app import build_server_app, load_reference_set
from server.history import RunHistory, load_history
from server.resume import STATE_FILE, ResumeError, ServerState, load_resume_point
from simulations.attacks import ATTACKS, Attack, AttackingGrid, PoisonedSites
from simulations.local_grid import LocalGrid
from simulations.scenario import SimulationScenario as Scenario
from simulations.sites import ScenarioSites

RoundCallback = Callable[[int, dict], None]
KEYS_DIR = ".keys"


def new_run_dir(root: Path, scenario: Scenario) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = root / f"{scenario.name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = root / f"{scenario.name}-{stamp}-{suffix}"
    run_dir.mkdir(parents=True)
    return run_dir


class _KnownDeprecation(logging.Filter):
    """Drops Flower's notice that ``run_simulation`` is deprecated: its successor, ``flwr
    run``, has no in-process engine and cannot take the simulation's own apps, so causalfed
    keeps it on purpose (docs/simulation.md) and the notice would only alarm."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation` function is deprecated" not in record.getMessage()


@contextmanager
def flower_logs_to(path: Path | None) -> Iterator[None]:
    """Send Flower's chatty INFO log to a file instead of the terminal."""
    logger = logging.getLogger("flwr")
    saved_handlers, saved_level, saved_propagate = logger.handlers[:], logger.level, logger.propagate
    handler = logging.FileHandler(path) if path else logging.NullHandler()
    handler.addFilter(_KnownDeprecation())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        handler.close()
        logger.handlers, logger.propagate = saved_handlers, saved_propagate
        logger.setLevel(saved_level)


def open_provenance(run_dir: Path) -> ProvenanceLog:
    """The run's provenance log, signed with the key kept beside (not inside) run folders."""
    key = load_or_create_key(run_dir.parent / KEYS_DIR / "server_ed25519.pem")
    return ProvenanceLog.open(run_dir / PROVENANCE_DIR, signing_key=key, log_id=run_dir.name)


def run_scenario(
    scenario: Scenario,
    *,
    run_dir: Path | None = None,
    on_round: RoundCallback | None = None,
    engine: str | None = None,
    resume: bool = False,
) -> dict:
    """Run the federation; returns the metrics history (also written to ``run_dir``).

    ``resume``: continue the run in ``run_dir`` from its last completed round (after a
    crash); its scenario must be this one.
    """
    engine = engine or scenario.federation.engine
    state, earlier = (_saved_run(run_dir, scenario) if resume else (None, {}))
    meta = {
        "scenario": scenario.name,
        "config-sha256": scenario.digest(),
        "engine": engine,
        "objective": scenario.training.objective,
        "warmup-rounds": planned_warmup_rounds(scenario.training, num_rounds=scenario.federation.num_rounds),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    history = RunHistory(
        meta=earlier.get("meta", meta), path=run_dir / "metrics.json" if run_dir else None, on_round=on_round
    )
    history.rounds = {r["round"]: r["sites"] for r in earlier.get("rounds", [])}
    if run_dir is not None and state is None:
        atomic_write_text(run_dir / "scenario.json", json.dumps(scenario.model_dump(mode="json"), indent=1))
    model_path = run_dir / "model.pt" if run_dir else None
    provenance = open_provenance(run_dir) if run_dir else None
    server_app = build_server_app(
        scenario,
        history,
        model_path=model_path,
        provenance=provenance,
        state_path=run_dir / STATE_FILE if run_dir else None,
        resume_from=state,
        report_dir=run_dir,
        reference=load_reference_set(scenario),
    )
    scenario_sites = ScenarioSites(scenario.canonical_json())
    sites = scenario_sites
    attack = _attack(scenario, sites)
    if attack is not None:
        sites = attack[1]
    client_options: dict = {"budget_source": sites.epsilon_budget}
    if provenance is not None:
        # Each simulated hospital keeps the checkpoints in its own folder and pins the key.
        client_options |= {
            "checkpoint_dir": run_dir / HOSPITALS_DIR,
            "server_key": public_pem(provenance.signing_key.public_key()),
        }
    started = time.monotonic()
    with flower_logs_to(run_dir / "flower.log" if run_dir else None):
        if engine == "inprocess":
            client_app = build_client_app(sites, **client_options)
            options = {"num_nodes": len(scenario.data.sites)}
            if scenario.behaviour:
                options["availability"] = scenario_sites.available
            if attack is not None:
                grid = AttackingGrid(client_app, attack=attack[0], malicious=set(sites.malicious), seed=scenario.seed,
                                     start_round=scenario.attack.start_round, **options)
            else:
                grid = LocalGrid(client_app, **options)
            server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
        else:
            client_app = build_client_app(sites, torch_threads=1, **client_options)
            _run_with_ray(server_app, client_app, len(scenario.data.sites))
    if len(history.rounds) < scenario.federation.num_rounds:
        raise RuntimeError(
            f"federation stopped after {len(history.rounds)} of {scenario.federation.num_rounds} rounds"
            + (f"; see {run_dir / 'flower.log'}" if run_dir else "")
        )
    history.meta["seconds"] = round(time.monotonic() - started, 1)
    history.save()
    return history.as_dict()


def _attack(scenario: Scenario, sites: ScenarioSites) -> tuple[Attack, PoisonedSites] | None:
    if scenario.attack is None:
        return None
    attack = ATTACKS[scenario.attack.name]()
    names = [s.name for s in scenario.data.sites]
    malicious = tuple(names.index(name) for name in scenario.attack.malicious)
    return attack, PoisonedSites(sites, attack, malicious, seed=scenario.seed, start_round=scenario.attack.start_round)


def _saved_run(run_dir: Path | None, scenario: Scenario) -> tuple[ServerState, dict]:
    """The last completed round's server state and the metrics up to it."""
    if run_dir is None:
        raise ResumeError("resuming needs the run folder")
    if load_run_scenario(run_dir).digest() != scenario.digest():
        raise ResumeError(f"{run_dir} was started with a different scenario; resume it with its own scenario.json")
    state, rounds = load_resume_point(run_dir)
    history = load_history(run_dir / "metrics.json")
    return state, history | {"rounds": rounds}


def load_run_scenario(run_dir: Path) -> Scenario:
    path = run_dir / "scenario.json"
    if not path.is_file():
        raise ResumeError(f"{run_dir} has no scenario.json: not a run folder")
    return Scenario.model_validate_json(path.read_text())


def _run_with_ray(server_app, client_app, num_nodes: int) -> None:
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # CPU-only simulation: keep Ray from printing its accelerator-variable tip at every start.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_nodes,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "log_to_driver": False},
        },
    )
