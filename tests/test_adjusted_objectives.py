"""Backdoor adjustment (known strata, learned style prototypes), FedBN, pooled ERM and
leave-one-site-out selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.app import LOCAL_STATE, _global_model, _keep_local_state
from client.models import (
    NUM_STRATA,
    architecture_of,
    mixture_logit,
    model_for_state,
    new_model,
    strata_index,
)
from client.objectives import build_objective
from client.task import evaluate, train_locally
from common.config import ScenarioError
from simulations.scenario import load_scenario, parse_scenario
from common.protocol import ARRAYS_KEY
from simulations.scm import make_site
from simulations.selection import best_scored_round, leave_one_site_out, loso_scores, summarise_run


def test_strata_number_the_recorded_states_alike_everywhere():
    recorded = {"tag": np.array([0, 1, 1, 0]), "noise": np.array([0, 0, 1, 1]), "lesion": np.array([1, 1, 1, 1])}
    # tag is bit 0, noise bit 2; the lesion (the cause, never recorded) is ignored.
    assert strata_index(recorded, num_cases=4).tolist() == [0, 1, 5, 4]
    assert strata_index({}, num_cases=3).tolist() == [0, 0, 0]


def test_mixture_logit_is_the_logit_of_the_prior_weighted_probability():
    logits = torch.tensor([[-2.0, 0.5, 3.0], [1.0, 1.0, 1.0]])
    prior = torch.tensor([0.2, 0.3, 0.5])
    expected = torch.logit((torch.sigmoid(logits) * prior).sum(dim=1))
    assert torch.allclose(mixture_logit(logits, prior), expected, atol=1e-5)


def test_strata_model_predicts_the_backdoor_adjusted_probability():
    model = new_model(seed=0, architecture="strata-adjusted").eval()
    strata = torch.tensor([0, 0, 0, 1, 1, 3])
    labels = torch.tensor([1, 1, 0, 0, 0, 1])
    model.fit_strata(strata, labels)
    prior = torch.zeros(NUM_STRATA)
    prior[[0, 1, 3]] = torch.tensor([3, 2, 1]) / 6
    assert torch.allclose(model.stratum_prior, prior)
    assert model.stratum_logit[0].item() == pytest.approx(np.log(3 / 2))  # (2 + 1) / (1 + 1)
    images = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        adjusted = sum(
            prior[z] * torch.sigmoid(model.conditional(images, torch.full((5,), z))) for z in range(NUM_STRATA)
        )
        assert torch.allclose(torch.sigmoid(model(images)), adjusted, atol=1e-5)


def _heldout_auroc(objective_name: str) -> float:
    data = load_scenario("confounded").data
    train, heldout = make_site(data, 0, seed=0), make_site(data, 4, seed=0)
    objective = build_objective(objective_name, {}, server_round=1)
    model = new_model(seed=0, architecture=objective.architecture)
    train_locally(model, train.train, objective, epochs=12, batch_size=64, learning_rate=1e-3, weight_decay=0.0, seed=0)
    return evaluate(model, heldout.test)["auroc"]


def test_backdoor_adjustment_over_recorded_strata_removes_the_shortcut():
    """One hospital whose tag, denoising and noise track the label at 90%; scored at the
    hospital where they are reversed. ERM reads the shortcuts, the adjusted model the lesion."""
    erm, adjusted = _heldout_auroc("erm"), _heldout_auroc("backdoor-strata")
    assert erm < 0.6, erm
    assert adjusted > erm + 0.2, (erm, adjusted)


def test_style_dictionary_learns_from_style_alone():
    site = make_site(load_scenario("confounded").data, 0, seed=0)
    objective = build_objective("backdoor-style", {}, server_round=1)
    model = new_model(seed=0, architecture="style-adjusted")
    first = train_locally(model, site.train, objective, epochs=1, batch_size=64, learning_rate=1e-3, weight_decay=0.0, seed=0)
    later = train_locally(model, site.train, objective, epochs=8, batch_size=64, learning_rate=1e-3, weight_decay=0.0, seed=1)
    assert later["style-risk"] < first["style-risk"] - 0.02
    assert model.prototype_prior.sum().item() == pytest.approx(1.0)


def _message(model) -> Message:
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    # A message stamps its sender from this process-wide identity (set by a Grid normally).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    content = RecordDict({ARRAYS_KEY: ArrayRecord(model.state_dict()), "config": ConfigRecord({})})
    return Message(content, dst_node_id=1, message_type="train")


def test_fedbn_hospital_keeps_its_own_normalisation():
    site = make_site(load_scenario().data, 0, seed=0)
    objective = build_objective("fedbn", {}, server_round=1)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    global_model = new_model(seed=0, architecture="batchnorm")
    local = _global_model(_message(global_model), site, objective, context)
    train_locally(local, site.train, objective, epochs=1, batch_size=64, learning_rate=1e-3, weight_decay=0.0, seed=0)
    _keep_local_state(local, objective, context)
    kept = set(context.state.array_records[LOCAL_STATE])
    assert kept == objective.local_state_keys(local) and "features.1.running_mean" in kept
    again = _global_model(_message(global_model), site, objective, context)
    for key, value in again.state_dict().items():
        if "running" in key or "num_batches" in key:
            continue  # recomputed from the hospital's images for the weights just received
        expected = local if key in kept else global_model
        assert torch.equal(value, expected.state_dict()[key]), key
    images = torch.as_tensor(site.train.images)
    assert torch.allclose(again.features[1].running_mean, again.features[0](images).mean(dim=(0, 2, 3)), atol=2e-3)


def test_saved_weights_find_their_architecture():
    for architecture in ("plain", "batchnorm", "strata-adjusted", "style-adjusted"):
        state = new_model(seed=1, architecture=architecture).state_dict()
        assert architecture_of(set(state)) == architecture
        assert isinstance(model_for_state(state), type(new_model(seed=0, architecture=architecture)))
    with pytest.raises(ValueError, match="no registered image architecture"):
        architecture_of({"nope"})
    with pytest.raises(ValueError, match="unknown architecture"):
        new_model(seed=0, architecture="resnet")


def test_objectives_that_cannot_run_on_the_data_are_refused():
    raw = load_scenario("heart_disease").model_dump(mode="json")
    raw["training"] |= {"objective": "backdoor-strata", "objective_params": {}}
    with pytest.raises(ScenarioError, match="feature rows only"):
        parse_scenario(raw)
    raw = load_scenario("confounded").model_dump(mode="json")
    raw["training"]["privacy"] = {"target_epsilon": 3.0}
    with pytest.raises(ScenarioError, match="strata"):
        parse_scenario(raw)
    raw = load_scenario("confounded").model_dump(mode="json")
    raw["training"] |= {"objective": "backdoor-style", "privacy": {"target_epsilon": 3.0}}
    with pytest.raises(ScenarioError, match="Opacus"):
        parse_scenario(raw)


def test_adjusted_objectives_run_in_a_federation(small_scenario):
    from simulations.runner import run_scenario

    for objective in ("backdoor-strata", "backdoor-style", "fedbn"):
        scenario = small_scenario.with_overrides(
            training={"objective": objective, "objective_params": {}}, federation={"num_rounds": 3}
        )
        history = run_scenario(scenario)
        assert len(history["rounds"]) == 3
        assert all(np.isfinite(m["test-auroc"]) for m in history["rounds"][-1]["sites"].values())
        # Every round aggregates every hospital: after averaging, batch norm's integer
        # counters once came back as floats and every later update was rejected.
        rejected = [(r["round"], s) for r in history["rounds"] for s, m in r["sites"].items() if "update-rejected" in m]
        assert rejected == [], f"{objective}: updates rejected in (round, site) {rejected}"


def test_pooled_erm_history_works_with_model_selection(small_scenario, tmp_path):
    from simulations.pooled import run_pooled

    history = run_pooled(small_scenario, model_path=tmp_path / "model.pt")
    summary = summarise_run(history)
    assert set(summary["final"]) >= {"ood-auroc", "iid-auroc"}
    assert (tmp_path / "model.pt").is_file()


def test_leave_one_site_out_folds_and_round_choice(small_scenario):
    fold = leave_one_site_out(small_scenario, "hospital-B")
    roles = {s.name: s.role for s in fold.data.sites}
    assert roles == {"hospital-A": "train", "hospital-B": "heldout", "hospital-C": "train", "hospital-D": "train"}

    def history(scores: list[float], site: str) -> dict:
        return {"rounds": [{"round": r + 1, "sites": {site: {"val-auroc": s}}} for r, s in enumerate(scores)]}

    folds = {"A": history([0.9, 0.6, 0.7], "A"), "B": history([0.9, 0.8, 0.75], "B")}
    assert best_scored_round(loso_scores(folds)) == 1
    assert best_scored_round(loso_scores(folds, warmup_rounds=1)) == 3  # round 1 is inside the warm-up
    with pytest.raises(ValueError, match="at least one fold"):
        loso_scores({})


def test_a_new_hospital_normalises_with_its_own_images():
    site = make_site(load_scenario().data, 4, seed=0)
    objective = build_objective("fedbn", {}, server_round=1)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    model = _global_model(_message(new_model(seed=0, architecture="batchnorm")), site, objective, context)
    first = model.features[0](torch.as_tensor(site.train.images))
    assert torch.allclose(model.features[1].running_mean, first.mean(dim=(0, 2, 3)), atol=2e-3)  # a mean of batch means
    # Plain models have nothing to derive.
    plain = build_objective("erm", {}, server_round=1)
    before = new_model(seed=0).state_dict()
    after = _global_model(_message(new_model(seed=0)), site, plain, context).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
