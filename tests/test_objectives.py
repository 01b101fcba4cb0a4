"""Every registered objective trains; IRMv1's penalty and warm-up behave as specified."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.objectives import OBJECTIVES, build_objective, irm_penalty, validate_objective
from client.task import new_model, split_strata, train_locally
from simulations.scenario import load_scenario
from simulations.scm import make_site


@pytest.fixture(scope="module")
def site():
    return make_site(load_scenario().data, 0, seed=0)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_registered_objective_trains(name, site):
    """One test over the whole registry: a few epochs lower the risk, stats stay finite.

    With federation statistics as the server would broadcast them (another hospital's, at
    the same global model); the penalties after warm-up are checked separately below.
    """
    model = new_model(seed=0, architecture=OBJECTIVES[name].architecture)
    images = torch.as_tensor(site.train.images)
    labels = torch.as_tensor(site.train.labels).float()
    strata = split_strata(site.train)
    other = make_site(load_scenario().data, 3, seed=0).train
    federation = build_objective(name, {}, server_round=1).statistics(
        model, torch.as_tensor(other.images), torch.as_tensor(other.labels).float(), split_strata(other)
    )
    objective = build_objective(name, {}, server_round=1, federation=federation)

    def risk() -> float:  # of what the objective trains (P(Y | X, z) for the backdoor adjustments)
        model.eval()
        with torch.no_grad():
            return F.binary_cross_entropy_with_logits(objective.logits(model, images, strata), labels).item()

    before = risk()
    stats = train_locally(model, site.train, objective, epochs=3, batch_size=64, learning_rate=3e-3, weight_decay=0.0, seed=0)
    after = risk()
    assert all(np.isfinite(v) for v in stats.values())
    assert stats["steps"] > 0
    assert after < before - 0.05, (before, after)
    assert np.isfinite(objective.validation_loss(model, images[:100], labels[:100], strata[:100]))


def test_irm_penalty_vanishes_at_the_optimal_scale_only():
    torch.manual_seed(0)
    logits = torch.randn(4000)
    labels = torch.bernoulli(torch.sigmoid(logits))  # calibrated: scale 1 is optimal
    assert abs(irm_penalty(logits, labels).item()) < 2e-3
    assert irm_penalty(logits * 3, labels).item() > 10 * abs(irm_penalty(logits, labels).item())
    assert irm_penalty(logits * 0.3, labels).item() > 10 * abs(irm_penalty(logits, labels).item())


def test_irm_warmup_then_full_penalty():
    params = {"penalty_weight": 5000.0, "warmup_rounds": 3}
    assert build_objective("irm", params, server_round=3).penalty_weight() == 1.0
    assert build_objective("irm", params, server_round=4).penalty_weight() == 5000.0
    assert build_objective("irm", params, server_round=1).warmup_rounds == 3
    assert build_objective("erm", {}, server_round=1).warmup_rounds == 0


def test_irm_loss_is_rescaled_after_warmup():
    model = new_model(seed=0)
    images, labels = torch.rand(32, 1, 28, 28), torch.randint(0, 2, (32,)).float()
    loss, stats = build_objective("irm", {"penalty_weight": 100.0, "warmup_rounds": 0}, server_round=1).loss(model, images, labels)
    expected = (stats["risk"] + 100.0 * stats["penalty"]) / 100.0
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_irm_judges_each_hospital_with_the_federation_classifier_shifted_to_its_prior():
    # A hospital with prevalence 0.8, against a federation at 0.5: the classifier that is
    # optimal there is the federation's plus logit(0.8) - logit(0.5) (Bayes' rule), so a
    # calibrated federation model must not be penalised for this hospital's prior.
    torch.manual_seed(0)
    federation_logits = torch.randn(20000) * 2
    shift = float(np.log(0.8 / 0.2))
    local = torch.bernoulli(torch.sigmoid(federation_logits + shift))
    positives = int(local.sum())
    labels = local

    class Fixed(torch.nn.Module):
        def forward(self, _images):
            return federation_logits

    objective = build_objective("irm", {}, server_round=1, federation={"prevalence": np.array([0.5])})
    objective.prepare(Fixed(), None, labels, None)
    expected = np.log((positives + 1) / (len(labels) - positives + 1))
    assert objective.prior_offset == pytest.approx(expected)
    shifted = abs(irm_penalty(objective.logits(Fixed(), None, None), labels).item())
    assert irm_penalty(federation_logits, labels).item() > 10 * shifted  # unshifted, the prior looks like a flaw
    unbroadcast = build_objective("irm", {}, server_round=1)
    assert unbroadcast.prior_offset is None  # not prepared yet
    unbroadcast.prepare(Fixed(), None, labels, None)
    assert unbroadcast.prior_offset == 0.0  # no federation prevalence yet: no shift
    stats = objective.statistics(Fixed(), None, labels)
    assert stats["prevalence"] == pytest.approx([positives / len(labels)])


def test_objective_validation_messages():
    with pytest.raises(ValueError, match="unknown objective 'nope'; registered"):
        validate_objective("nope", {})
    with pytest.raises(ValueError, match="bad parameters for objective 'irm'"):
        validate_objective("irm", {"warmup_rounds": -1})
    with pytest.raises(ValueError, match="penalty"):
        validate_objective("erm", {"penalty": 1.0})


@pytest.mark.parametrize("name", ["vrex", "fishr", "prototype"])
def test_federated_penalties_switch_on_after_warmup_and_train(name, site):
    model = new_model(seed=0)
    other = make_site(load_scenario().data, 3, seed=0).train
    federation = build_objective(name, {}, server_round=1).statistics(
        model, torch.as_tensor(other.images), torch.as_tensor(other.labels).float()
    )
    images, labels = torch.as_tensor(site.train.images), torch.as_tensor(site.train.labels).float()
    before = F.binary_cross_entropy_with_logits(model(images), labels).item()
    objective = build_objective(name, {"penalty_weight": 1.0, "warmup_rounds": 2}, server_round=3, federation=federation)
    assert objective.weight() == 1.0
    _, stats = objective.loss(model, images[:64], labels[:64])
    assert stats["penalty"] >= 0.0
    train_locally(model, site.train, objective, epochs=3, batch_size=64, learning_rate=3e-3, weight_decay=0.0, seed=0)
    assert F.binary_cross_entropy_with_logits(model(images), labels).item() < before - 0.05
    # Without the statistic (round 1 of a federation) the penalty stays off.
    assert "penalty" not in build_objective(name, {}, server_round=9).loss(model, images[:64], labels[:64])[1]


def test_federation_statistics_travel_and_switch_penalties_on(small_scenario):
    from simulations.runner import run_scenario

    scenario = small_scenario.with_overrides(
        training={"objective": "vrex", "objective_params": {"penalty_weight": 5.0, "warmup_rounds": 1}},
        federation={"num_rounds": 3},
    )
    rounds = run_scenario(scenario)["rounds"]
    trained = [m for m in rounds[0]["sites"].values() if m["role"] == "train"]
    assert all("train-penalty" not in m for m in trained)  # round 1: no mean risk yet
    later = [m for m in rounds[2]["sites"].values() if m["role"] == "train"]
    assert all(m["train-penalty"] >= 0 for m in later)


def test_server_averages_statistics_by_examples():
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from client.objectives import OBJECTIVES
    from server.strategy import hospital_statistics

    def reply(n, values):
        content = RecordDict({"metrics": MetricRecord({"num-examples": n}), "statistics": ConfigRecord({"risk": values})})
        return Message(content, dst_node_id=1, message_type="train")

    stats = OBJECTIVES["vrex"].combine(hospital_statistics([reply(100, [1.0, float("nan")]), reply(300, [3.0, 2.0])]))
    assert stats["risk"].tolist() == [2.5, 2.0]
