"""Faults and bad input: malformed updates, a hospital vanishing mid-round, a server crash."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from flwr.app import Array, Message

from client.app import build_client_app
from simulations.sites import ScenarioSites
from common.feature_shift import FEATURE_MOMENTS_FILE
from common.protocol import ARRAYS_KEY, METRICS_KEY
from common.provenance.verify import verify_log
from server.app import run_federation
from server.history import RunHistory
from server.resume import STATE_FILE, ResumeError
from simulations.local_grid import LocalGrid
from simulations.runner import open_provenance, run_scenario


def _npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def _wrong_shape(arrays):
    arrays["head.weight"] = Array(np.zeros((1, 3), np.float32))


def _nan(arrays):
    values = arrays["head.weight"].numpy().copy()
    values[0, 0] = np.nan
    arrays["head.weight"] = Array(values)


def _inf(arrays):
    values = arrays["features.0.bias"].numpy().copy()
    values[1] = -np.inf
    arrays["features.0.bias"] = Array(values)


def _wrong_dtype(arrays):
    arrays["head.bias"] = Array(arrays["head.bias"].numpy().astype(np.float64))


def _oversized(arrays):
    # Declared shape and dtype are right, the payload is padded with 1 MB of junk.
    good = arrays["head.bias"]
    arrays["head.bias"] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data + b"\0" * 2**20)


def _missing(arrays):
    del arrays["head.bias"]


def _garbage(arrays):
    good = arrays["head.bias"]
    arrays["head.bias"] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=b"not an npy file")


TAMPERINGS = {
    "wrong shape": (_wrong_shape, "shape"),
    "NaN": (_nan, "NaN/Inf"),
    "Inf": (_inf, "NaN/Inf"),
    "wrong dtype": (_wrong_dtype, "dtype"),
    "oversized": (_oversized, "bytes"),
    "missing array": (_missing, "missing"),
    "undecodable": (_garbage, "decode"),
}


class Recorder:
    """Wraps the ClientApp: tampers with one hospital's updates and keeps what was sent."""

    def __init__(self, app, sites, *, victim: str, tamper=None, inflate_examples: bool = False):
        self.app, self.sites, self.victim, self.tamper = app, sites, victim, tamper
        self.inflate_examples = inflate_examples
        self.train_replies: dict[str, Message] = {}
        self.evaluated: dict[int, dict[str, np.ndarray]] = {}

    def __call__(self, message, context):
        reply = self.app(message, context)
        site = self.sites(context).name
        if message.metadata.message_type == "evaluate":
            server_round = int(message.content.config_records["config"]["server-round"])
            self.evaluated[server_round] = {k: a.numpy() for k, a in message.content.array_records[ARRAYS_KEY].items()}
        if message.metadata.message_type == "train" and not reply.has_error():
            if site == self.victim and self.tamper is not None:
                self.tamper(reply.content.array_records[ARRAYS_KEY])
            if site == self.victim and self.inflate_examples:
                reply.content.metric_records[METRICS_KEY]["num-examples"] = 10**9
            self.train_replies[site] = reply
        return reply


def _fedavg(replies: list[Message]) -> dict[str, np.ndarray]:
    weights = np.array([r.content.metric_records[METRICS_KEY]["num-examples"] for r in replies], dtype=np.float64)
    records = [r.content.array_records[ARRAYS_KEY] for r in replies]
    return {k: sum(w * rec[k].numpy() for w, rec in zip(weights / weights.sum(), records)) for k in records[0]}


def _federate(scenario, run_dir, recorder_options):
    scenario = scenario.with_overrides(federation={"num_rounds": 1})
    sites = ScenarioSites(scenario.canonical_json())
    recorder = Recorder(build_client_app(sites), sites, **recorder_options)
    history = RunHistory()
    provenance = open_provenance(run_dir)
    run_federation(LocalGrid(recorder, num_nodes=len(scenario.data.sites)), scenario, history, provenance=provenance)
    rounds = [json.loads(line)["body"] for line in (run_dir / "provenance" / "log.jsonl").read_text().splitlines()]
    return recorder, history, rounds[1]


@pytest.mark.parametrize("kind", sorted(TAMPERINGS))
def test_a_malformed_update_is_rejected_with_its_reason_and_nothing_else_is_lost(small_scenario, tmp_path, kind):
    tamper, reason = TAMPERINGS[kind]
    recorder, history, record = _federate(small_scenario, tmp_path / "run", {"victim": "hospital-B", "tamper": tamper})
    assert reason in history.rounds[1]["hospital-B"]["update-rejected"]
    assert record["verdicts"]["hospital-B"].startswith("rejected:") and reason in record["verdicts"]["hospital-B"]
    others = [s for s in recorder.train_replies if s != "hospital-B"]
    assert all(record["verdicts"][s] == "accepted" for s in others) and len(others) == 3
    # The new global model is exactly FedAvg over the three well-formed updates.
    expected = _fedavg([recorder.train_replies[s] for s in others])
    for key, value in expected.items():
        np.testing.assert_allclose(recorder.evaluated[1][key], value, rtol=1e-5, atol=1e-7)
    assert verify_log(tmp_path / "run" / "provenance").ok


def test_an_inflated_example_count_is_rejected(small_scenario, tmp_path):
    # A hospital cannot buy weight in the average by claiming more examples than it declared.
    _, history, record = _federate(small_scenario, tmp_path / "run", {"victim": "hospital-C", "inflate_examples": True})
    assert "num-examples" in history.rounds[1]["hospital-C"]["update-rejected"]
    assert record["verdicts"]["hospital-C"].startswith("rejected:")


class VanishingGrid(LocalGrid):
    """A hospital whose train reply never arrives in one round (the node went away)."""

    def __init__(self, app, *, num_nodes, sites, victim, in_round):
        super().__init__(app, num_nodes=num_nodes)
        self.sites, self.victim, self.in_round = sites, victim, in_round

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        for message, message_id in zip(messages, ids):
            config = message.content.config_records.get("config")
            site = self.sites(self._contexts[message.metadata.dst_node_id]).name
            if message.metadata.message_type == "train" and site == self.victim and config["server-round"] == self.in_round:
                del self._replies[message_id]
        return ids


def test_a_hospital_dropping_mid_round_leaves_the_round_to_the_others(small_scenario, tmp_path):
    scenario = small_scenario.with_overrides(federation={"num_rounds": 3})
    sites = ScenarioSites(scenario.canonical_json())
    grid = VanishingGrid(build_client_app(sites), num_nodes=len(scenario.data.sites), sites=sites,
                         victim="hospital-B", in_round=2)
    history = RunHistory()
    run_federation(grid, scenario, history, provenance=open_provenance(tmp_path / "run"))
    records = [json.loads(line)["body"] for line in (tmp_path / "run" / "provenance" / "log.jsonl").read_text().splitlines()]
    by_round = {r["round"]: r for r in records if "round" in r}
    assert "hospital-B" not in by_round[2]["participants"] and "hospital-A" in by_round[2]["participants"]
    assert by_round[2]["aggregate_sha256"] is not None
    assert "hospital-B" in by_round[3]["verdicts"]  # back the next round
    assert "train-risk" not in history.rounds[2]["hospital-B"] and "train-risk" in history.rounds[3]["hospital-B"]


class Crash(RuntimeError):
    pass


def _crash_in_round(server_round: int):
    def on_round(done: int, _sites) -> None:
        if done == server_round:
            raise Crash(f"server killed during round {done}")

    return on_round


def test_a_crashed_server_resumes_from_its_last_round_with_the_log_intact(small_scenario, tmp_path):
    scenario = small_scenario.with_overrides(federation={"num_rounds": 3})
    straight = run_scenario(scenario, run_dir=tmp_path / "straight")

    run_dir = tmp_path / "crashed"
    with pytest.raises(Crash):
        run_scenario(scenario, run_dir=run_dir, on_round=_crash_in_round(2))
    with open(run_dir / "provenance" / "log.jsonl", "ab") as log:
        log.write(b'{"seq":3,"prev":"half a rec')  # and the process died mid-append
    resumed = run_scenario(scenario, run_dir=run_dir, resume=True)

    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    assert resumed["rounds"] == straight["rounds"]  # same models, same numbers
    import torch
    a, b = torch.load(tmp_path / "straight" / "model.pt"), torch.load(run_dir / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    status = verify_log(run_dir / "provenance")
    assert status.ok, status.problems
    kinds = [json.loads(line)["kind"] for line in (run_dir / "provenance" / "log.jsonl").read_text().splitlines()]
    assert kinds == ["run-start", "round", "run-resume", "round", "round", "run-end"]


def test_resume_refuses_another_scenario_or_an_empty_run(small_scenario, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        run_scenario(small_scenario, run_dir=run_dir, on_round=_crash_in_round(1))
    with pytest.raises(ResumeError, match="no server state"):
        run_scenario(small_scenario, run_dir=run_dir, resume=True)
    (run_dir / STATE_FILE).write_bytes(b"")
    with pytest.raises(ResumeError, match="different scenario"):
        run_scenario(small_scenario.with_overrides(seed=7), run_dir=run_dir, resume=True)


def test_privacy_spent_before_a_crash_is_not_forgotten(small_scenario, tmp_path):
    raw = {"objective": "erm", "objective_params": {}, "privacy": {"target_epsilon": 3.0}}
    scenario = small_scenario.with_overrides(training=raw, federation={"num_rounds": 3})
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        run_scenario(scenario, run_dir=run_dir, on_round=_crash_in_round(2))
    resumed = run_scenario(scenario, run_dir=run_dir, resume=True)
    ledger = json.loads((run_dir / "hospitals" / "hospital-A" / "privacy-ledger.json").read_text())
    # Round 2 was trained twice (before and after the crash): both releases count, so
    # the budget planned for 3 rounds is spent before round 3 and the hospital stops.
    assert len(ledger) == 3
    assert not (run_dir / FEATURE_MOMENTS_FILE).exists()  # released without noise, so never under DP-SGD
    assert "privacy budget spent" in resumed["rounds"][-1]["sites"]["hospital-A"]["training-stopped"]


def test_cli_resumes_a_crashed_run_and_explains_bad_folders(small_scenario, tmp_path):
    from typer.testing import CliRunner

    from cli.main import cli

    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        run_scenario(small_scenario, run_dir=run_dir, on_round=_crash_in_round(2))
    result = CliRunner().invoke(cli, ["simulate", "--resume", str(run_dir), "--engine", "inprocess"])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output and (run_dir / "report.html").is_file()
    missing = CliRunner().invoke(cli, ["simulate", "--resume", str(tmp_path / "nowhere")])
    assert "not a run folder" in str(missing.exception)  # main() turns it into one line and exit 2


def test_the_aggregate_keeps_the_global_models_dtypes():
    from flwr.app import ArrayRecord

    from server.screening import model_spec, restore_dtypes

    sent = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32)), "count": Array(np.array(4, dtype=np.int64))})
    averaged = ArrayRecord({"w": Array(np.ones(3, dtype=np.float64)), "count": Array(np.array(5.6))})
    restored = restore_dtypes(averaged, model_spec(sent))
    assert restored["w"].numpy().dtype == np.float32 and restored["count"].numpy().dtype == np.int64
    assert int(restored["count"].numpy()) == 6
    assert model_spec(restored) == model_spec(sent)


def test_a_rejected_hospital_does_not_describe_the_federations_images(small_scenario, tmp_path):
    scenario = small_scenario.with_overrides(federation={"num_rounds": 1})
    sites = ScenarioSites(scenario.canonical_json())
    recorder = Recorder(build_client_app(sites), sites, victim="hospital-B", tamper=_nan)
    grid = LocalGrid(recorder, num_nodes=len(scenario.data.sites))
    run_federation(grid, scenario, RunHistory(), model_path=tmp_path / "model.pt")
    saved = json.loads((tmp_path / FEATURE_MOMENTS_FILE).read_text())
    training = {site.name for site in scenario.data.sites if site.role == "train"}
    assert set(saved["sites"]) == training - {"hospital-B"}
