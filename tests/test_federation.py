"""The Flower apps end to end: in process (fast) and through Flower's Ray simulation engine."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord

from client.app import build_client_app
from simulations.sites import ScenarioSites
from client.task import new_model
from common.protocol import ProtocolError, TrainInstructions
from simulations.local_grid import LocalGrid
from simulations.runner import run_scenario
from simulations.selection import select_round, summarise_run

REPO = Path(__file__).resolve().parents[1]


def test_inprocess_federation_records_every_hospital_every_round(small_scenario, tmp_path):
    history = run_scenario(small_scenario, run_dir=tmp_path)
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    names = {s.name for s in small_scenario.data.sites}
    for entry in history["rounds"]:
        assert set(entry["sites"]) == names
        for name, metrics in entry["sites"].items():
            assert 0.0 <= metrics["test-auroc"] <= 1.0
            trained = any(k.startswith("train-") for k in metrics)
            # Held-out hospitals evaluate but never train.
            assert trained == (metrics["role"] == "train"), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["meta"]["config-sha256"] == small_scenario.digest()
    assert (tmp_path / "model.pt").is_file()


def test_runs_are_reproducible(small_scenario):
    first = run_scenario(small_scenario)
    second = run_scenario(small_scenario)
    assert first["rounds"] == second["rounds"]


def test_training_moves_the_model(small_scenario):
    """After 2 rounds the i.i.d. AUROC of the richest-shortcut hospital is far above chance."""
    history = run_scenario(small_scenario.with_overrides(training={"objective": "erm", "objective_params": {}}))
    assert history["rounds"][-1]["sites"]["hospital-A"]["test-auroc"] > 0.7


def test_failing_hospital_does_not_stop_the_round(small_scenario):
    """A ClientApp that raises gives an error reply; the others are still aggregated."""
    sites = ScenarioSites(small_scenario.canonical_json())
    calls = {"n": 0}

    def flaky(context, server_round=None):
        site = sites(context)
        if site.name == "hospital-B" and calls["n"] > 5:
            raise RuntimeError("disk unplugged")
        calls["n"] += 1
        return site

    from server.app import run_federation
    from server.history import RunHistory

    history = RunHistory()
    grid = LocalGrid(build_client_app(flaky), num_nodes=len(small_scenario.data.sites))
    run_federation(grid, small_scenario, history)
    last = history.rounds[2]
    assert "hospital-B" not in last and "hospital-A" in last


def test_malformed_instructions_are_rejected():
    with pytest.raises(ProtocolError, match="TrainInstructions"):
        TrainInstructions.from_record(ConfigRecord({"server-round": 1}))
    with pytest.raises(ProtocolError, match="no TrainInstructions"):
        TrainInstructions.from_record(None)


def test_wrong_model_shapes_are_rejected():
    from client.task import load_numpy_state

    model = new_model(seed=0)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    first = next(iter(state))
    with pytest.raises(ValueError, match="has shape"):
        load_numpy_state(model, dict(state, **{first: np.zeros((2, 2), np.float32)}))
    with pytest.raises(ValueError, match="missing"):
        load_numpy_state(model, {k: v for k, v in state.items() if k != first})


def test_selection_never_uses_the_heldout_site():
    rounds = []
    for r, (val, ood) in enumerate([(0.9, 0.1), (0.7, 0.9), (0.8, 0.5)], start=1):
        rounds.append({"round": r, "sites": {
            "a": {"role": "train", "val-auroc": val, "test-auroc": val, "val-objective": 1 - val},
            "x": {"role": "heldout", "val-auroc": ood, "test-auroc": ood, "val-objective": 0.0},
        }})
    history = {"meta": {}, "rounds": rounds}
    assert select_round(history) == 1
    assert select_round(history, criterion="val-auroc") == 1
    assert select_round(history, warmup_rounds=1) == 3
    summary = summarise_run(history)
    assert summary["final"]["ood-auroc"] == 0.5
    assert math.isclose(summary["selected by val-objective"]["ood-auroc"], 0.1)


def test_simulate_command_with_flower_simulation_engine(tmp_path):
    """The README's user command, shortened: Flower's Ray engine, 2 rounds, report written."""
    result = subprocess.run(
        [sys.executable, "-m", "cli", "simulate", "--rounds", "2", "--engine", "ray", "--no-baseline",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (run_dir,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["meta"]["engine"] == "ray"
    assert len(metrics["rounds"]) == 2 and len(metrics["rounds"][-1]["sites"]) == 5
    report = (run_dir / "report.html").read_text()
    assert "hospital-X" in report and "Verdict" in report and "data:image/png;base64" in report
    assert (run_dir / "feature-moments.json").is_file() and "shift from the pool" in report
    assert "held-out AUROC" in result.stdout and "run_simulation` function is deprecated" not in \
        (run_dir / "flower.log").read_text()
    assert "provenance log: 4 records, verified" in result.stdout
    verify = [sys.executable, "-m", "cli", "log", "verify", str(run_dir)]
    assert subprocess.run(verify, cwd=REPO, capture_output=True, timeout=120).returncode == 0
    log_file = run_dir / "provenance" / "log.jsonl"
    log_file.write_text(log_file.read_text().replace('"round":1', '"round":7', 1))
    tampered = subprocess.run(verify, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert tampered.returncode == 1 and "TAMPERED: record 1 modified" in tampered.stdout


def test_simulate_reports_bad_config_plainly(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[data]\nsites = []\n')
    result = subprocess.run(
        [sys.executable, "-m", "cli", "simulate", "--config", str(bad), "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "invalid scenario" in result.stderr and "data.sites" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # refused before any run folder


def test_every_round_lands_in_the_signed_log_and_at_every_hospital(small_scenario, tmp_path):
    from flwr.app import ArrayRecord

    from common.provenance.log import LOG_FILE
    from common.provenance.verify import read_kept_checkpoints, verify_log

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_scenario(small_scenario, run_dir=run_dir)
    kept = read_kept_checkpoints(run_dir / "hospitals")
    assert set(kept) == {s.name for s in small_scenario.data.sites}
    assert all(len(cps) == 4 for cps in kept.values())  # run start, 2 rounds, run end
    report = verify_log(run_dir / "provenance", hospital_checkpoints=kept)
    assert report.ok and report.records == 4, report.problems
    records = [json.loads(line) for line in (run_dir / "provenance" / LOG_FILE).read_text().splitlines()]
    assert [r["kind"] for r in records] == ["run-start", "round", "round", "run-end"]
    assert records[0]["body"]["config_sha256"] == small_scenario.digest()
    assert len(records[0]["body"]["code_sha256"]) == 64
    last_round = records[2]["body"]
    assert last_round["run_id"] == "run" and last_round["config_sha256"] == small_scenario.digest()
    assert sorted(last_round["update_sha256"]) == ["hospital-A", "hospital-B", "hospital-C", "hospital-D"]
    assert last_round["verdicts"] == {s: "accepted" for s in last_round["update_sha256"]}
    import torch

    final = ArrayRecord(torch.load(run_dir / "model.pt"))
    assert last_round["aggregate_sha256"] == records[3]["body"]["final_model_sha256"] == final.object_id


def test_hospital_refuses_checkpoints_from_another_key(small_scenario, tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from common.provenance.log import ProvenanceLog
    from common.provenance.records import public_pem
    from server.audit import deliver_checkpoint

    pinned = public_pem(Ed25519PrivateKey.generate().public_key())
    app = build_client_app(ScenarioSites(small_scenario.canonical_json()), server_key=pinned, checkpoint_dir=tmp_path / "h")
    grid = LocalGrid(app, num_nodes=len(small_scenario.data.sites))
    impostor = ProvenanceLog.open(tmp_path / "log", signing_key=Ed25519PrivateKey.generate(), log_id="x")
    checkpoint = impostor.append("round", {"round": 1})
    nodes = sorted(grid.get_node_ids())
    assert deliver_checkpoint(grid, nodes, checkpoint, timeout_s=10) == nodes
    assert not (tmp_path / "h").exists()
