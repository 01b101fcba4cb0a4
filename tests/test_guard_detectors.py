"""The guard's detectors on small synthetic update matrices: honest heterogeneity passes,
each attack is caught by the detector that asks about it, and nothing turns off silently."""

from __future__ import annotations

import numpy as np
import pytest

from server.guard import Guard, GuardConfig
from server.guard.evidence import DirectionEvidence, GuardMemory
from server.guard.maths import coordinate_sample, count_sketch, jackknife_cosines, spread_regularity
from server.guard.registry import DETECTORS, create_detector

D = 6000  # parameters
N = 10  # hospitals


class World:
    """Honest updates: a common learning direction, a prevalence direction scaled by each
    hospital's (centred) logit prevalence, its own scanner direction, and SGD noise. One
    hospital un-learns the others' shortcut (anti-aligned with their mean), one trains 10x
    the steps (longer update), one a tenth."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.learning = rng.normal(0, 1, D)
        self.shortcut = rng.normal(0, 1, D)
        self.prevalence_direction = rng.normal(0, 1, D)
        self.scanners = rng.normal(0, 1, (N, D))
        self.prevalence = np.array([0.05, 0.95, 0.3, 0.7, 0.5, 0.4, 0.6, 0.45, 0.55, 0.5])
        self.steps = np.full(N, 10.0)
        self.steps[8], self.steps[9] = 100.0, 1.0

    def honest(self, server_round: int) -> np.ndarray:
        logits = np.log(self.prevalence / (1 - self.prevalence))
        updates = []
        for i in range(N):
            shortcut = -1.5 if i == 3 else 1.0  # hospital 3's cases do not carry the shortcut
            update = (0.7 * self.learning + shortcut * self.shortcut + 0.5 * logits[i] * self.prevalence_direction
                      + 0.6 * self.scanners[i] + 0.8 * self.rng.normal(0, 1, D))
            scale = {8: 3.0, 9: 0.3}.get(i, 1.0) / (1 + 0.1 * server_round)
            updates.append(scale * update / np.sqrt(D))
        return np.stack(updates)


def judge(guard: Guard, updates: np.ndarray, server_round: int, steps: np.ndarray, **options):
    sketches = np.stack([guard.sketch(u) for u in updates])
    samples = np.stack([guard.sample(u) for u in updates])
    clients = [f"hospital-{i}" for i in range(len(updates))]
    return guard.judge(server_round, clients, sketches, samples, np.linalg.norm(updates, axis=1), steps, **options)


def honest_direction(updates: np.ndarray, world: World, guard: Guard) -> DirectionEvidence:
    """What honest training on clean reference cases would point along: the learning."""
    references = np.stack([guard.sketch(world.learning + world.rng.normal(0, 1.5, D)) for _ in range(4)])
    cosines, errors = jackknife_cosines(np.stack([guard.sketch(u) for u in updates]), references)
    return DirectionEvidence(cosines, errors, cases=200)


def test_honest_heterogeneity_is_never_excluded_over_rounds():
    world, guard = World(), Guard(GuardConfig(), seed=0)
    for server_round in range(1, 9):
        updates = world.honest(server_round)
        judgement = judge(guard, updates, server_round, world.steps,
                          direction=honest_direction(updates, world, guard))
        assert judgement.excluded == [], [v.reasons for v in judgement.verdicts if v.excluded]
    consensus = updates[np.arange(N) != 3].mean(axis=0)
    assert updates[3] @ consensus / (np.linalg.norm(updates[3]) * np.linalg.norm(consensus)) < -0.3


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_every_registered_detector_answers_for_every_client(name):
    world, guard = World(1), Guard(GuardConfig(), seed=0)
    updates = world.honest(1)
    view_judgement = judge(guard, updates, 1, world.steps, direction=honest_direction(updates, world, guard))
    assert name in view_judgement.detectors and view_judgement.detectors[name].startswith("ran")
    for verdict in view_judgement.verdicts:
        findings = [f for f in verdict.findings if f.detector == name]
        assert len(findings) == 1 and not findings[0].flagged and findings[0].reason
    detector = create_detector(name)
    assert detector.name == name and detector.question.endswith("?")


def _attack(kind: str, world: World, rounds: list[np.ndarray]) -> np.ndarray:
    """This round's updates with hospitals 1 and 2 attacking."""
    updates, previous = rounds[-1].copy(), rounds[-2] if len(rounds) > 1 else None
    honest = updates[3:]
    jitter = world.rng.normal(0, 1, updates[1:3].shape) * 0.01 * np.linalg.norm(honest, axis=1).mean() / np.sqrt(D)
    if kind == "noise":
        updates[1:3] = world.rng.normal(0, 1, updates[1:3].shape) * np.linalg.norm(honest, axis=1).mean() / np.sqrt(D)
    elif kind == "idle":
        updates[1:3] *= 1e-4
    elif kind == "boosted":
        updates[1:3] *= 10.0
    elif kind == "replay":
        updates[1:3] = previous[[5, 6]] + jitter
    elif kind == "crafted":
        updates[1:3] = honest.mean(axis=0) - honest.std(axis=0) + jitter
    elif kind == "mirror":
        updates[1:3] = -0.5 * honest.mean(axis=0) + jitter
    elif kind == "reversal":
        updates[1:3] = -updates[1:3]
    elif kind == "direction":
        updates[1:3] = -updates[1:3]
    return updates


@pytest.mark.parametrize(("kind", "detector"), [
    ("noise", "unlearnt"), ("idle", "idle"), ("boosted", "boosted"), ("replay", "copy"), ("crafted", "crafted"),
    ("mirror", "mirror"), ("reversal", "reversal"), ("direction", "direction"),
])
def test_each_attack_is_caught_by_the_detector_that_asks_about_it(kind, detector):
    world, guard = World(2), Guard(GuardConfig(), seed=0)
    rounds = []
    # Two honest rounds first: the reversal has a history to compare with, the replay a past to copy.
    for server_round in (1, 2):
        rounds.append(world.honest(server_round))
        judge(guard, rounds[-1], server_round, world.steps, direction=honest_direction(rounds[-1], world, guard))
    rounds.append(world.honest(3))
    updates = _attack(kind, world, rounds)
    for server_round in range(3, 9):  # the direction sums its evidence over rounds
        judgement = judge(guard, updates, server_round, world.steps, direction=honest_direction(updates, world, guard))
        if kind != "direction":
            break
        rounds.append(world.honest(server_round + 1))
        updates = _attack(kind, world, rounds)
    flagged = {v.client: [f.detector for f in v.findings if f.flagged] for v in judgement.verdicts}
    assert detector in flagged["hospital-1"] and detector in flagged["hospital-2"], flagged
    assert all(not flagged[f"hospital-{i}"] for i in range(3, N)), flagged
    verdicts = {v.client: v for v in judgement.verdicts}
    if create_detector(detector).excludes:
        assert verdicts["hospital-1"].excluded and verdicts["hospital-2"].excluded
    else:  # evidence honest heterogeneity also produced: down-weighted, never excluded
        alone = all(not create_detector(name).excludes for name in flagged["hospital-1"])
        assert alone and not verdicts["hospital-1"].excluded
        assert 0 < verdicts["hospital-1"].clip_scale <= GuardConfig().suspect_weight


def test_a_copy_that_cannot_be_told_apart_counts_once_and_a_later_copier_is_excluded():
    world, guard = World(3), Guard(GuardConfig(), seed=0)
    updates = world.honest(1)
    updates[1] = updates[0] * (1 + 1e-3)  # a mimic from the first round: who copied whom?
    judgement = judge(guard, updates, 1, world.steps)
    verdicts = {v.client: v for v in judgement.verdicts}
    assert not verdicts["hospital-0"].excluded and not verdicts["hospital-1"].excluded
    assert verdicts["hospital-0"].clip_scale == pytest.approx(0.5) and verdicts["hospital-1"].clip_scale == pytest.approx(0.5)
    updates = world.honest(2)
    updates[2] = updates[0] * (1 + 1e-3)  # hospital 2 had its own past: it copied
    verdicts = {v.client: v for v in judge(guard, updates, 2, world.steps).verdicts}
    assert verdicts["hospital-2"].excluded and not verdicts["hospital-0"].excluded


def test_accepted_updates_are_bounded_by_the_round_and_by_their_own_steps():
    world, guard = World(4), Guard(GuardConfig(clip_ratio=1.5), seed=0)
    updates = world.honest(1)
    updates[4] *= 3.0  # longer than its steps explain, under the boost test's ratio
    judgement = judge(guard, updates, 1, world.steps)
    lengths = np.linalg.norm(updates, axis=1)
    median = np.median(lengths)
    for i, verdict in enumerate(judgement.verdicts):
        allowance = np.sqrt(max(1.0, world.steps[i] / np.median(world.steps)))
        assert lengths[i] * verdict.clip_scale <= 1.5 * median * allowance * (1 + 1e-9)
    assert judgement.verdicts[4].clip_scale < 1 and not judgement.verdicts[4].excluded
    assert judgement.verdicts[8].clip_scale == 1.0  # 10x the steps: a longer update is expected


def test_detectors_that_cannot_judge_say_why():
    world, guard = World(5), Guard(GuardConfig(), seed=0)
    judgement = judge(guard, world.honest(1), 1, world.steps, private=True)
    assert judgement.detectors["unlearnt"].startswith("off: hospitals train with DP-SGD")
    assert judgement.detectors["direction"] == "off: no reference set (data-free mode)"
    few = judge(Guard(GuardConfig(), seed=0), world.honest(1)[:2], 1, world.steps[:2])
    assert all(text.startswith("off") for text in few.detectors.values()) and few.excluded == []


def test_the_memory_survives_a_round_trip_and_judges_alike():
    world = World(6)
    first, second = Guard(GuardConfig(), seed=0), Guard(GuardConfig(), seed=0)
    for server_round in (1, 2):
        updates = world.honest(server_round)
        judge(first, updates, server_round, world.steps)
        judge(second, updates, server_round, world.steps)
    second.memory = GuardMemory.from_dict(second.memory.as_dict())
    updates = world.honest(3)
    updates[1] = -updates[1]
    a, b = judge(first, updates, 3, world.steps), judge(second, updates, 3, world.steps)
    assert a.as_dict() == b.as_dict() and "hospital-1" in a.excluded


def test_sketches_keep_lengths_and_samples_keep_coordinates():
    rng = np.random.default_rng(0)
    vector = rng.normal(0, 1, 50_000)
    sketch = count_sketch(vector, size=1024, seed=3)
    assert np.linalg.norm(sketch) == pytest.approx(np.linalg.norm(vector), rel=0.1)
    assert np.allclose(count_sketch(2 * vector, size=1024, seed=3), 2 * sketch)
    sample = coordinate_sample(vector, size=100, seed=3)
    assert sample.shape == (100,) and np.isin(sample, vector).all()


def test_regularity_separates_crafted_from_learnt_departures():
    rng = np.random.default_rng(1)
    honest = rng.normal(0, 1, (8, 2000)) + rng.normal(0, 1, 2000)
    crafted = honest.mean(axis=0) - 1.0 * honest.std(axis=0)
    samples = np.vstack([honest, crafted])
    assert spread_regularity(samples, 8) > 8 > 2 > max(spread_regularity(samples, i) for i in range(8))
