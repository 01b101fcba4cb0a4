"""The guard's validation-set evidence: the ranking direction and what is judged against it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm

from common.data import Split
from server.detectors import DETECTORS
from server.guard_evidence import ClientMemory, Measurements
from server.guard import CausalGuard
from server.guard_round import (
    ValidationProbe,
    data_span_ratios,
    ranking_alignments,
    ranking_directions,
    solo_auroc_changes,
    without_common_shift,
)
from server.guard_stats import prediction_upper_p, robust_z, upper_p


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images).squeeze(-1)


def _probe(rng: np.random.Generator, n: int = 300) -> ValidationProbe:
    labels = (rng.random(n) < 0.4).astype(np.int64)
    images = rng.normal(size=(n, 3)).astype(np.float32)
    images[:, 0] += 1.5 * labels  # the first feature ranks the cases; the others are noise
    return ValidationProbe(Split(images=images, labels=labels), _Linear)


def test_the_ranking_direction_ignores_the_bias_and_points_at_what_ranks():
    """Pairwise, so a prevalence shift (the bias) is neither for nor against it, and an update
    learning the ranking feature points with it, a flipped one against it."""
    probe = _probe(np.random.default_rng(0))
    names, shapes = ["linear.weight", "linear.bias"], [(1, 3), (1,)]
    start = np.zeros(4)
    gradient = next(probe.ranking_gradients(start, names, shapes, resamples=0))
    assert abs(gradient[3]) < 1e-6 and gradient[0] < 0 < -gradient[0] - 10 * np.abs(gradient[1:3]).max()
    learns, shifts_bias = np.array([0.3, 0.01, -0.02, 0.0]), np.array([0.0, 0.0, 0.0, 0.5])
    directions = ranking_directions(start, probe, names, shapes)
    cosines, errors = ranking_alignments(np.stack([learns, -learns, shifts_bias]), directions)
    assert cosines[0] > 0.9 and cosines[1] < -0.9 and abs(cosines[2]) < 1e-6
    assert 0 < errors[0] < 0.05  # 300 cases pin the direction down


class _Rectified(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = torch.nn.Linear(3, 8)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(images))).squeeze(-1)


def test_a_push_of_every_score_is_prevalence_not_harm():
    """Through rectified features, pushing every score down (a hospital with few positives)
    moves the lesions, whose features are strongest, down the most: the ranking reverses and
    even a hospital that also learns what ranks looks harmful (seed 6's low-prevalence
    hospitals, in the benchmark). Without the common shift, the push is neither for nor
    against the ranking, the learner helps and a flipped update still hurts."""
    probe = _probe(np.random.default_rng(3))
    probe.build_model = _Rectified
    state = _Rectified().state_dict()
    names, shapes = list(state), [tuple(v.shape) for v in state.values()]
    start = np.concatenate([v.numpy().astype(np.float64).ravel() for v in state.values()])
    shift = probe.common_shift(start, names, shapes)
    ranks = -next(probe.ranking_gradients(start, names, shapes, resamples=0))
    push, ranks = -2 * shift / np.linalg.norm(shift), 0.5 * ranks / np.linalg.norm(ranks)
    deltas = np.stack([push, push + ranks, push - ranks])
    raw = solo_auroc_changes(start + deltas, start, probe, names, shapes)
    assert raw.max() < -0.2  # all three look harmful
    changes = solo_auroc_changes(start + without_common_shift(deltas, shift), start, probe, names, shapes)
    assert changes[0] == 0.0 and changes[1] > 0.05 and changes[2] < -0.2
    directions = ranking_directions(start, probe, names, shapes, resamples=5, shift=shift)
    cosines, _ = ranking_alignments(without_common_shift(deltas, shift), directions)
    assert abs(cosines[0]) < 1e-4 and cosines[1] > 0.9 and cosines[2] < -0.9


def test_a_one_class_validation_set_gives_no_direction():
    probe = _probe(np.random.default_rng(1))
    probe.split.labels[:] = 0
    names, shapes = ["linear.weight", "linear.bias"], [(1, 3), (1,)]
    directions = ranking_directions(np.zeros(4), probe, names, shapes)
    cosines, errors = ranking_alignments(np.ones((3, 4)), directions)
    assert directions is None and np.isnan(cosines).all() and np.isnan(errors).all()
    assert np.isnan(data_span_ratios(np.ones((3, 4)), directions)).all()
    verdicts, _ = CausalGuard(detectors=("validation-direction",)).judge(
        ["a", "b", "c"], np.ones((3, 8)), Measurements(ranking_alignments=cosines, ranking_errors=errors))
    assert all(v.p_values["validation-direction"] == 1.0 for v in verdicts)


def test_an_update_against_the_validation_ranking_is_harm_however_long_it_has_been():
    """A client reversing the ranking from its first round on (a sign-flipper, flipped labels)
    is caught as evidence adds up over rounds, though it never changes its habit; an honest
    hospital that is merely the least helpful (seed 1's hospital-02 in the benchmark) is not,
    nor is the judgement of one swayed by how many others point against the ranking."""
    rng = np.random.default_rng(2)
    guard = CausalGuard(detectors=("validation-direction",))
    clients = [f"h{i}" for i in range(10)]
    flagged = []
    errors = np.full(10, 0.07)  # bootstrap errors of 200 cases
    for _ in range(5):
        cosines = rng.normal(0.2, 0.1, 10)
        cosines[4] = rng.normal(-0.07, 0.1)  # the least helpful, now and then a little against it
        cosines[7] = -0.18  # against it, every round, too little to be caught in one
        verdicts, _ = guard.judge(clients, rng.normal(size=(10, 64)), Measurements(ranking_alignments=cosines,
                                                                                    ranking_errors=errors))
        flagged.append([v.client for v in verdicts if v.flagged])
    assert flagged[0] == [] and flagged[-1] == ["h7"] and all(f in ([], ["h7"]) for f in flagged), flagged
    assert "against the validation ranking" in " ".join(verdicts[7].reasons)
    crowded = np.array([0.2, 0.3, -0.4, -0.4, 0.25, 0.1, 0.3, -0.25, 0.2, 0.15])  # two more against it

    def p_of_h7(cosines: np.ndarray) -> float:
        found = CausalGuard(detectors=("validation-direction",)).assess(
            clients, np.ones((10, 8)), Measurements(ranking_alignments=cosines, ranking_errors=errors))
        return float(found.p_values["validation-direction"][7])

    assert p_of_h7(crowded) == p_of_h7(np.where(crowded < -0.3, 0.2, crowded))


def test_a_precise_cosine_a_little_against_the_ranking_weighs_less_than_a_flippers():
    """The bootstrap error is the validation sample's alone; an honest update also wobbles
    round to round, by an amount that does not shrink with the sample. Seed 6's honest
    hospital 03 once read -0.115 +/- 0.008, a sign-flipper -0.25 +/- 0.04. On the error
    doubled the honest one scored 7.2 and the flipper 3.1; with the wobble in quadrature the
    flipper scores more, and the honest one stays under what flags a lone client (3.86)."""
    direction = DETECTORS["validation-direction"]
    honest, flipper = direction.round_z(np.array([-0.115, -0.25]), np.array([0.008, 0.04]),
                                        wobble=direction.direction_wobble)
    assert honest < 3.86 < flipper
    assert direction.round_z(np.array([-0.115]), np.array([0.008]), wobble=0.0)[0] > 14  # the error alone


def test_a_direction_too_small_to_matter_is_neither_harm_nor_help():
    """A Gaussian-noise update's cosine with the ranking direction is 0.00 +/- 0.00 every
    round (seed 8 in the benchmark). Divided by its tiny error it read as z -3 (helpful,
    so its change of habit was excused) or, with the other sign, z +6 (harm)."""
    guard, clients = CausalGuard(detectors=("validation-direction",)), [f"h{i}" for i in range(6)]
    cosines = np.array([0.003, -0.004, 0.2, 0.25, 0.15, -0.3])
    errors = np.array([0.0002, 0.0002, 0.05, 0.05, 0.05, 0.05])
    for _ in range(4):
        verdicts, _ = guard.judge(clients, np.ones((6, 8)), Measurements(ranking_alignments=cosines,
                                                                         ranking_errors=errors))
    assert [v.client for v in verdicts if v.flagged] == ["h5"]
    assert [list(guard.memories[c].z_history("validation-direction")) for c in ("h0", "h1")] == [[], []]
    assert max(guard.memories["h2"].z_history("validation-direction")) < -1


def test_rounds_without_direction_do_not_dilute_rounds_with_one():
    """A flipped update is only as directed as the hospital's honest one: seed 11's
    sign-flipper had cosines -0.03, -0.26, -0.04, -0.23 with the ranking. Its rounds without
    direction are no measurement; counted as z 0 they halved its evidence."""
    clients = [f"h{i}" for i in range(6)]
    errors = np.full(6, 0.04)

    def pooled_z_of_h5(rounds: list[float]) -> float:
        guard = CausalGuard(detectors=("validation-direction",))
        for cosine in rounds:
            cosines = np.array([0.2, 0.25, 0.15, 0.3, 0.2, cosine])
            found = guard.assess(clients, np.ones((6, 8)), Measurements(ranking_alignments=cosines,
                                                                        ranking_errors=errors))
            guard.judge(clients, np.ones((6, 8)), Measurements(ranking_alignments=cosines, ranking_errors=errors))
        return float(norm.isf(found.p_values["validation-direction"][5]))

    assert pooled_z_of_h5([-0.03, -0.26, -0.04, -0.23]) == pytest.approx(pooled_z_of_h5([-0.26, -0.23]))
    assert pooled_z_of_h5([-0.03, -0.26, -0.04, -0.23]) > 4.0


def test_accumulated_evidence_survives_a_saved_state():
    memory = ClientMemory()
    memory.z_history("validation-direction").extend([2.0, 2.5])
    restored = ClientMemory.from_dict(memory.as_dict())
    assert list(restored.z_history("validation-direction")) == [2.0, 2.5]
    older = memory.as_dict() | {"ranking_z": [1.5]}  # saved before several detectors accumulated
    del older["past_z"]
    assert list(ClientMemory.from_dict(older).z_history("solo-ranking")) == [1.5]


def _steady_then_sudden(cosine_now: float, past_cosine: float = 0.3) -> tuple[CausalGuard, list]:
    """Eight hospitals for five rounds, then hospital h3 changes its habit suddenly (same
    size, another direction); its updates had ``past_cosine`` with the validation ranking,
    this one ``cosine_now``."""
    rng = np.random.default_rng(3)
    guard, clients = CausalGuard(), [f"h{i}" for i in range(8)]
    scales, errors = np.linspace(0.7, 1.4, 8)[:, None], np.full(8, 0.05)
    habit, cosines = 2 * rng.normal(size=512), np.full(8, 0.1)
    for _ in range(5):
        sketches = rng.normal(size=(8, 512)) * scales
        sketches[3] += habit
        cosines[3] = past_cosine
        guard.judge(clients, sketches, Measurements(ranking_alignments=cosines.copy(), ranking_errors=errors))
    sketches = rng.normal(size=(8, 512)) * scales
    sketches[3] += 2 * rng.normal(size=512)
    cosines[3] = cosine_now
    verdicts, _ = guard.judge(clients, sketches, Measurements(ranking_alignments=cosines, ranking_errors=errors))
    return guard, verdicts


def test_a_change_of_habit_that_helps_the_validation_ranking_is_excused():
    """A sudden change is evidence (the forecast) unless the client's updates, this one too,
    point with what ranks the clean validation cases: then it is learning, and must not be
    flagged, or its history would stop learning and the flag would feed itself."""
    _, unhelpful = _steady_then_sudden(cosine_now=0.0, past_cosine=0.1)
    assert unhelpful[3].flagged and unhelpful[3].p_values["forecast"] < 1e-3
    guard, helpful = _steady_then_sudden(cosine_now=0.3)
    assert not helpful[3].flagged and helpful[3].p_values["forecast"] == 1.0
    assert any(r.startswith("excused forecast") for r in helpful[3].reasons), helpful[3].reasons
    _, turned = _steady_then_sudden(cosine_now=-0.05)  # a helpful past does not cover a turn
    assert turned[3].flagged


def test_only_habit_detectors_are_excused():
    habits = {name for name, d in DETECTORS.items() if d.habit_only}
    assert habits == {"forecast", "alignment", "shrinkage", "solo-ranking"}


def test_a_shrinking_update_that_helps_is_convergence_and_a_free_rider_is_not():
    """Both updates shrink to well under their usual size. One still points with the
    validation ranking, as it always did: a hospital converging (seed 10's honest hospital,
    flagged at 0.52x its usual norm). The other points nowhere: a free-rider."""
    rng = np.random.default_rng(5)
    guard = CausalGuard(detectors=("magnitude", "shrinkage", "validation-direction"))
    clients, sizes = [f"h{i}" for i in range(10)], np.exp(rng.normal(0, 0.1, 10))[:, None]
    cosines, errors = np.full(10, 0.25), np.full(10, 0.05)
    for round_ in range(4):
        sketches = rng.normal(size=(10, 256)) * sizes * np.exp(rng.normal(0, 0.03, 10))[:, None]
        if round_ == 3:
            sketches[3] *= 0.3
            sketches[6] *= 0.3
            cosines[6] = 0.0
        verdicts, _ = guard.judge(clients, sketches, Measurements(ranking_alignments=cosines.copy(),
                                                                 ranking_errors=errors))
    assert [v.client for v in verdicts if v.flagged] == ["h6"]
    assert any(r.startswith("excused shrinkage") for r in verdicts[3].reasons), verdicts[3].reasons


def test_solo_ranking_does_not_blame_a_client_for_the_rounds_common_drift():
    """As the model converges every client's model alone gains less (here, 0.04 AUROC less
    each round); a hospital always a little worse than the others is no more suspect for
    it, while one that suddenly falls far below them is."""
    rng = np.random.default_rng(4)
    guard, clients = CausalGuard(detectors=("solo-ranking",)), [f"h{i}" for i in range(8)]
    for round_ in range(6):
        changes = 0.06 - 0.04 * round_ + rng.normal(0, 0.01, 8)
        changes[0] -= 0.04  # always a little worse
        verdicts, _ = guard.judge(clients, rng.normal(size=(8, 64)), Measurements(solo_auroc_changes=changes))
        assert not any(v.flagged for v in verdicts), (round_, [v.reasons for v in verdicts if v.flagged])
    for round_ in range(6, 8):
        changes = 0.06 - 0.04 * round_ + rng.normal(0, 0.01, 8)
        changes[5] -= 0.15  # suddenly far below the others, from now on
        verdicts, _ = guard.judge(clients, rng.normal(size=(8, 64)), Measurements(solo_auroc_changes=changes))
    assert [v.client for v in verdicts if v.flagged] == ["h5"]


class _Wide(torch.nn.Module):
    """Enough parameters (about 1,400) that a handful of gradient directions span little."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = torch.nn.Linear(3, 64)
        self.mid = torch.nn.Linear(64, 16)
        self.out = torch.nn.Linear(16, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(torch.relu(self.hidden(images))))).squeeze(-1)


def test_a_learnt_update_moves_along_the_validation_gradients_and_noise_does_not():
    """A hospital's update, learnt from other cases of the same kind, has far more of its
    norm in the span of the validation ranking gradients than noise of any size; a
    Gaussian-noise update has about what chance gives it (ratio 1)."""
    probe = _probe(np.random.default_rng(5))
    probe.build_model = _Wide
    model = _Wide()
    names = list(model.state_dict())
    shapes = [tuple(v.shape) for v in model.state_dict().values()]
    start = np.concatenate([v.numpy().astype(np.float64).ravel() for v in model.state_dict().values()])
    hospital = _probe(np.random.default_rng(6)).split  # its own cases, not the server's
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(20):
        optimiser.zero_grad()
        logits = model(torch.as_tensor(hospital.images))
        torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.as_tensor(hospital.labels).float()).backward()
        optimiser.step()
    learnt = np.concatenate([v.detach().numpy().astype(np.float64).ravel() for v in model.state_dict().values()]) - start
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 3 * np.abs(learnt).mean(), (3, len(start)))
    directions = ranking_directions(start, probe, names, shapes, resamples=10)
    ratios = data_span_ratios(np.vstack([learnt, -learnt, noise]), directions)
    assert ratios[0] == pytest.approx(ratios[1])  # the span has no sign: a flipped update was learnt too
    assert ratios[0] > DETECTORS["data-span"].max_ratio  # 5.5 here: 20 steps on 300 cases, 11 directions
    assert np.all((ratios[2:] > 0.4) & (ratios[2:] < 1.8)), ratios


def test_an_update_with_no_data_in_it_is_flagged_and_a_less_typical_learner_is_not():
    """Two Gaussian-noise updates (ratio about 1) among hospitals at 14-28 times noise's share
    (the benchmark's range) are flagged in the first round, with the reason; a hospital at
    5 times is learning too (under the round, but above ``max_ratio``)."""
    clients = [f"h{i}" for i in range(10)]
    ratios = np.array([0.95, 1.08, 18.0, 22.0, 14.5, 27.0, 20.0, 16.0, 5.0, 24.0])
    verdicts, _ = CausalGuard(detectors=("data-span", "magnitude")).judge(
        clients, np.random.default_rng(8).normal(size=(10, 64)), Measurements(data_span_ratios=ratios))
    assert [v.client for v in verdicts if v.flagged] == ["h0", "h1"]
    assert "noise would have" in " ".join(verdicts[0].reasons)
    assert verdicts[8].p_values["data-span"] == 1.0


def test_three_noise_updates_do_not_widen_their_own_yardstick():
    """Several noise updates are judged against the learners: with three among ten, each
    is as suspect as with two (seed 10, round 1: against all ten clients the three stood
    at z -7.8, against the seven learners at -15). A lone one is judged against all."""
    learners = [18.0, 22.0, 14.5, 27.0, 20.0, 16.0, 24.0]
    guard = CausalGuard(detectors=("data-span",))
    sketches = np.random.default_rng(8).normal(size=(10, 64))

    def data_span_p(ratios: list[float]) -> np.ndarray:
        found = guard.assess([f"h{i}" for i in range(len(ratios))], sketches[:len(ratios)],
                             Measurements(data_span_ratios=np.array(ratios)))
        return found.p_values["data-span"]

    three, two = data_span_p([1.0, 1.05, 0.95, *learners]), data_span_p([1.0, 1.05, *learners])
    against_learners = prediction_upper_p(-np.log([1.0]), -np.log(learners))[0]
    assert three[0] == pytest.approx(two[0]) == pytest.approx(against_learners)
    assert three[0] < 1e-4 and np.all(three[3:] == 1.0), three
    assert data_span_p([1.0, *learners])[0] == pytest.approx(upper_p(-robust_z(np.log([1.0, *learners])))[0])
    too_few = data_span_p([1.0, 1.05, 0.95, 1.1, 20.0, 24.0])  # two learners: no yardstick of their own
    assert np.all(np.isfinite(too_few)) and too_few[4] == 1.0


def test_a_helpful_client_whose_model_alone_ranks_a_little_worse_is_learning():
    """Solo ranking asks whether a client's model alone ranks the validation cases worse
    than it used to, a habit: seed 2 with 500 validation cases flagged an honest hospital
    in round 6, its update's cosine with the ranking +0.17 (z -2 every round), because its
    model alone ranked 0.02 below its first round's record. The same fall in a client
    whose update points nowhere is still evidence."""
    clients = [f"h{i}" for i in range(10)]
    rng = np.random.default_rng(3)

    def flagged_in_last_round(cosine_of_h9: float) -> bool:
        guard = CausalGuard(detectors=("solo-ranking", "validation-direction"))
        for round_ in range(4):
            changes = rng.normal(0.0, 0.01, 10)
            changes[9] = 0.10 if round_ == 0 else -0.10  # a fine first round, then a fall
            cosines = np.full(10, 0.2)
            cosines[9] = cosine_of_h9
            verdicts, _ = guard.judge(clients, np.ones((10, 8)), Measurements(
                solo_auroc_changes=changes, ranking_alignments=cosines, ranking_errors=np.full(10, 0.04)))
        return verdicts[9].flagged

    assert not flagged_in_last_round(0.2)
    assert flagged_in_last_round(0.0)


def test_one_round_against_the_ranking_does_not_outweigh_the_sum_over_rounds():
    """Seed 12 with 500 validation cases: an honest hospital's cosine with the ranking read
    +0.17, +0.15, +0.12 and then once -0.12 +/- 0.01 (z 5). Its sum over rounds said -1.9,
    helpful; fed to the guard's Fisher combination over rounds as well, that one round
    kept it out for three rounds."""
    guard, clients = CausalGuard(detectors=("validation-direction",)), [f"h{i}" for i in range(10)]
    flagged = []
    for cosine in (0.17, 0.15, 0.12, -0.12, 0.07, 0.13):
        cosines = np.full(10, 0.2)
        cosines[3] = cosine
        verdicts, _ = guard.judge(clients, np.ones((10, 8)), Measurements(ranking_alignments=cosines,
                                                                         ranking_errors=np.full(10, 0.01)))
        flagged.append(verdicts[3].flagged)
    assert not any(flagged), flagged
