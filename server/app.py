"""The Flower ServerApp: wiring only (wait for hospitals, learn who they are, run the strategy)."""

from __future__ import annotations

import hashlib
import json
import time
from logging import WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log as flwr_log

from client.task import model_for
from common.calibration import CALIBRATION_FILE, write_calibration
from common.config import ScenarioError
from common.feature_shift import FEATURE_MOMENTS_FILE, standardised_shift
from common.files import atomic_write_text
from common.protocol import PROFILE_KEY, SiteProfile, TrainInstructions, federation_prevalence
from common.provenance.log import PROVENANCE_DIR, ProvenanceLog, load_or_create_key
from server.audit import RoundAuditor, deliver_checkpoint
from server.config import Scenario, load_scenario
from server.guard import Guard
from server.guard.reference import ReferenceSet
from server.history import RunHistory
from server.resume import STATE_FILE, ServerState, load_resume_point
from server.strategy import aggregation_options, strategy_class
from server.training import ServerTrainer


class FederationError(RuntimeError):
    """The federation cannot proceed (missing hospitals, unusable replies)."""


def wait_for_nodes(grid: Grid, *, expected: int, timeout_s: float, poll_s: float = 0.5) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} of {expected} hospitals connected within {timeout_s:.0f}s"
            )
        time.sleep(poll_s)


def query_profiles(grid: Grid, nodes: list[int], *, timeout_s: float) -> dict[int, SiteProfile]:
    """Ask every node which hospital it is and whether it trains or is held out."""
    messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout_s))
    profiles: dict[int, SiteProfile] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise FederationError(f"node {node} failed to describe itself: {reply.error.reason}")
        profiles[node] = SiteProfile.from_record(reply.content.config_records.get(PROFILE_KEY))
    missing = set(nodes) - set(profiles)
    if missing:
        raise FederationError(f"no profile from nodes {sorted(missing)} within {timeout_s:.0f}s")
    names = [p.site for p in profiles.values()]
    if len(set(names)) != len(names):
        raise FederationError(f"two nodes claim the same hospital: {sorted(names)}")
    return profiles


def node_identities(grid: Grid) -> dict[int, str]:
    """Each node's registered identity: its name and authentication public key, if any."""
    identities = {}
    for info in grid.get_nodes():
        key = info.public_key.hex() if info.public_key else ""
        identities[info.node_id] = f"{info.name}:{key}" if (info.name or key) else ""
    return identities


def federation_input_shape(profiles: dict[int, SiteProfile]) -> tuple[int, ...]:
    """The input shape every training hospital reported (they must agree)."""
    shapes = {tuple(p.input_shape) for p in profiles.values() if p.role == "train" and p.input_shape}
    if len(shapes) != 1:
        raise FederationError(f"training hospitals report different or no input shapes: {sorted(shapes)}")
    return shapes.pop()


def load_reference_set(scenario: Scenario, override: Path | None = None) -> ReferenceSet | None:
    """The guard's reference set, if the scenario (or the run config) names one."""
    guard = scenario.federation.guard
    path = override or (guard.reference_set if guard is not None else None)
    if path is None:
        return None
    return ReferenceSet.load(path, max_cases=guard.max_reference_cases if guard is not None else 200)


def guard_plan(scenario: Scenario, reference: ReferenceSet | None) -> dict:
    """What the run-start record says of the guard: on or off, data-free or on which cases."""
    guard = scenario.federation.guard
    if guard is None or not guard.enabled:
        return {"enabled": False}
    plan = {"enabled": True, "mode": "data-free" if reference is None else "reference set",
            "config": guard.model_dump(mode="json")}
    if reference is not None:
        plan["reference_set"] = {"file": reference.path.name, "cases": len(reference.split),
                                 "sha256": reference.sha256}
    return plan


def run_federation(
    grid: Grid,
    scenario: Scenario,
    history: RunHistory,
    *,
    model_path: Path | None = None,
    provenance: ProvenanceLog | None = None,
    state_path: Path | None = None,
    resume_from: ServerState | None = None,
    report_dir: Path | None = None,
    reference: ReferenceSet | None = None,
) -> ArrayRecord:
    """Train the scenario's federation to the end; returns the final global model.

    ``state_path`` receives the server state after every round; ``resume_from`` continues
    a run from such a state (same scenario, same hospitals). With the scenario's guard on,
    ``report_dir`` receives its per-round reports and ``reference`` is its reference set
    (None: the guard runs data-free).
    """
    federation = scenario.federation
    nodes = wait_for_nodes(grid, expected=len(scenario.data.sites), timeout_s=federation.round_timeout_s)
    profiles = query_profiles(grid, nodes, timeout_s=federation.round_timeout_s)
    history.meta.setdefault("sites", {p.site: {"role": p.role, "num-train": p.num_train} for p in profiles.values()})
    input_shape = federation_input_shape(profiles)
    guard_config = federation.guard if federation.guard is not None and federation.guard.enabled else None
    if guard_config is None and federation.aggregation != "fltrust":
        reference = None
    auditor = RoundAuditor(provenance, profiles) if provenance is not None else None
    if auditor is not None:
        start = auditor.start_run(
            config_sha256=scenario.digest(),
            fab_hash=grid.run.fab_hash,
            identities=node_identities(grid),
            resumed_after=resume_from.completed_round if resume_from else None,
            guard=guard_plan(scenario, reference),
        )
        deliver_checkpoint(grid, nodes, start, timeout_s=federation.round_timeout_s)
    # Evaluation gets the training recipe too: hospitals report the objective's value on
    # their validation split, which is what model selection minimises.
    instructions = TrainInstructions.for_training(scenario.training, seed=scenario.seed,
                                                  num_rounds=federation.num_rounds)
    prevalence = federation_prevalence(list(profiles.values()))
    instructions = instructions.model_copy(update={"federation_prevalence": prevalence})
    strategy = strategy_class(federation.aggregation)(
        guard=Guard(guard_config, seed=scenario.seed) if guard_config is not None else None,
        reference=reference,
        trainer=ServerTrainer(instructions, input_shape) if reference is not None else None,
        private=scenario.training.privacy is not None,
        evaluate_every=federation.evaluate_every,
        num_rounds=federation.num_rounds,
        objective=scenario.training.objective,
        report_dir=report_dir,
        **aggregation_options(federation.aggregation, assumed_malicious=federation.assumed_malicious),
        profiles=profiles,
        history=history,
        fraction_train=federation.fraction_train,
        seed=scenario.seed,
        auditor=auditor,
        timeout_s=federation.round_timeout_s,
        state_path=state_path,
        resume_from=resume_from,
    )
    done = resume_from.completed_round if resume_from else 0
    if done > federation.num_rounds:
        raise FederationError(f"the saved state is at round {done}, past the scenario's {federation.num_rounds}")
    initial = resume_from.to_arrayrecord() if resume_from else ArrayRecord(
        model_for(scenario.training.objective, input_shape=input_shape, seed=scenario.seed).state_dict())
    record = instructions.to_record()
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=federation.num_rounds - done,
        timeout=federation.round_timeout_s,
        train_config=record,
        evaluate_config=ConfigRecord(dict(record)),
    )
    moments_sha256 = None
    if model_path is not None:
        torch.save(result.arrays.to_torch_state_dict(), model_path)
        moments_sha256 = _save_feature_moments(strategy, model_path.with_name(FEATURE_MOMENTS_FILE))
        write_calibration(model_path.with_name(CALIBRATION_FILE), strategy.calibration, prevalence)
    history.meta["federation-prevalence"] = prevalence
    if auditor is not None:
        end = auditor.end_run(rounds=len(history.rounds), final_arrays=result.arrays,
                              feature_moments_sha256=moments_sha256)
        deliver_checkpoint(grid, nodes, end, timeout_s=federation.round_timeout_s)
    return result.arrays


def _save_feature_moments(strategy, path: Path) -> str | None:
    """The reference `causalfed adapt` checks a new hospital against, next to the model;
    returns the file's SHA-256 for the provenance log.

    Each hospital's own shift from the pool is kept too: how far apart the federation's
    hospitals already were."""
    if strategy.feature_moments is None:
        return None
    shifts = {site: standardised_shift(part, strategy.feature_moments)
              for site, part in sorted(strategy.feature_moments_sites.items())}
    strategy.feature_moments.save(path, sites=shifts)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_server_app(scenario: Scenario, history: RunHistory, **options) -> ServerApp:
    """A ServerApp running ``run_federation(grid, scenario, history, **options)``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, scenario, history, **options)

    return app


# Deployed SuperLinks run this object (pyproject: [tool.flwr.app.components]); the scenario
# and output folder come from the run config ([tool.flwr.app.config]).
app = ServerApp()


def _deployed_scenario(run_config) -> Scenario:
    scenario = load_scenario(str(run_config.get("scenario", "default")))
    rounds = int(run_config.get("num-server-rounds", 0) or 0)
    return scenario.with_overrides(federation={"num_rounds": rounds}) if rounds > 0 else scenario


@app.main()
def _deployed_main(grid: Grid, context: Context) -> None:
    config = context.run_config
    try:
        scenario = _deployed_scenario(config)
        override = str(config.get("guard-reference", "") or "")
        reference = load_reference_set(scenario, Path(override) if override else None)
    except (ScenarioError, ValueError) as error:
        raise FederationError(str(error)) from None
    run_dir = Path(str(config.get("run-dir", "runs/deployed")))
    resume_from, rounds = None, []
    if bool(config.get("resume", False)):
        resume_from, rounds = load_resume_point(run_dir)
    history = RunHistory(meta={"scenario": scenario.name, "config-sha256": scenario.digest()}, path=run_dir / "metrics.json")
    history.rounds = {r["round"]: r["sites"] for r in rounds}
    atomic_write_text(run_dir / "scenario.json", json.dumps(scenario.model_dump(mode="json"), indent=1))
    key = load_or_create_key(Path(str(config.get("signing-key", "keys/server_ed25519.pem"))))
    provenance = ProvenanceLog.open(run_dir / PROVENANCE_DIR, signing_key=key, log_id=f"run-{grid.run.run_id}")
    for message in provenance.recovery_messages:
        flwr_log(WARNING, "provenance: %s", message)
    run_federation(
        grid,
        scenario,
        history,
        model_path=run_dir / "model.pt",
        provenance=provenance,
        state_path=run_dir / STATE_FILE,
        resume_from=resume_from,
        report_dir=run_dir,
        reference=reference,
    )
