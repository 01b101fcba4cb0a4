"""Attacks on the federation, registered by name (one small class each).

Model-poisoning attackers are omniscient, as in the papers that define them: each round
they see the honest hospitals' updates (this round's and last round's) before sending
their own. ``AttackingGrid`` (in-process) gives them that view. Data poisoning (label flip,
backdoor) changes what the attacker trains on. Attackers never send identical vectors:
each adds its own jitter.

The classic attacks (sign-flip, Gaussian, label-flip, boosted backdoor, ALIE, IPM, Min-Max,
free-rider, colluding pair) come from their papers. The white-box ones are written against
causalfed's own guard (``server/guard/``): they match its yardsticks of length, direction
and continuity, replay or mimic honest hospitals, drift slowly, point with the consensus
while pushing elsewhere, or split a backdoor across colluders.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
from flwr.app import Message

from common.data import SiteData, Split
from common.protocol import ARRAYS_KEY
from server.arrays import as_record, flatten
from simulations.local_grid import LocalGrid

ATTACKS: dict[str, type[Attack]] = {}
TRIGGER = np.zeros((4, 4), dtype=np.float32)
TRIGGER[::2, ::2] = 1.0  # a checkerboard burned into the bottom-right corner
BACKDOOR_TARGET = 0  # triggered images should read as "no lesion"


def stamp_trigger(images: np.ndarray, pattern: np.ndarray = TRIGGER) -> np.ndarray:
    stamped = images.copy()
    stamped[:, 0, -5:-1, -5:-1] = np.maximum(stamped[:, 0, -5:-1, -5:-1], pattern)
    return stamped


def trigger_part(index: int, parts: int) -> np.ndarray:
    """The ``index``-th of ``parts`` disjoint pieces of the trigger (a distributed backdoor)."""
    cells = np.argwhere(TRIGGER > 0)
    piece = np.zeros_like(TRIGGER)
    for row, col in cells[index % parts :: parts]:
        piece[row, col] = 1.0
    return piece


def trigger_flip_rate(*, positives: np.ndarray, stamped: np.ndarray, negatives: np.ndarray) -> float:
    """Backdoor success on a ranking model: of the positive cases it ranks above the
    median negative, the share the trigger pushes to or below it (scores: positives, the
    same positives stamped, and negatives). NaN if no positive ranks above it.

    Rank-based, not at a fixed threshold of 0.5: honest hospitals differ in prevalence, so
    how many positives a model calls negative moves with its bias."""
    cut = float(np.median(negatives))
    above = positives > cut
    return float(np.mean(stamped[above] <= cut)) if above.any() else float("nan")


def round_rng(start: np.ndarray, *, seed: int) -> np.random.Generator:
    """Randomness drawn from the round's global model (flat): a resumed run draws the same."""
    digest = hashlib.sha256(np.ascontiguousarray(start).tobytes()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


@dataclass(frozen=True)
class RoundView:
    """What an omniscient attacker knows when it crafts its update."""

    server_round: int
    global_vector: np.ndarray
    honest_deltas: np.ndarray  # (n_honest, p), this round
    previous_honest: np.ndarray | None  # (m, p), last round's honest updates (None in round 1)
    own_delta: np.ndarray  # what its own (possibly poisoned) training produced
    attacker_index: int
    num_attackers: int
    num_clients: int
    rng: np.random.Generator

    @property
    def median_norm(self) -> float:
        return float(np.median(np.linalg.norm(self.honest_deltas, axis=1)))


def _with_length(vector: np.ndarray, length: float) -> np.ndarray:
    return vector * (length / (np.linalg.norm(vector) + 1e-300))


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / (np.linalg.norm(vector) + 1e-300)


class Attack(ABC):
    name: ClassVar[str]
    poisons_data: ClassVar[bool] = False
    jitter: ClassVar[float] = 0.05  # relative: no two attackers send the same vector
    white_box: ClassVar[bool] = False  # written against causalfed's own guard

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        ATTACKS[cls.name] = cls

    def poison(self, site: SiteData, rng: np.random.Generator, *, index: int, count: int) -> SiteData:
        """The attacker's training data (``index`` of ``count`` attackers)."""
        return site

    def craft(self, view: RoundView) -> np.ndarray:
        """The delta to send (added to the global model)."""
        return view.own_delta

    def send(self, view: RoundView) -> np.ndarray:
        delta = self.craft(view)
        scale = np.linalg.norm(delta) / np.sqrt(len(delta)) + 1e-12
        return delta + view.rng.normal(0, self.jitter * scale, delta.shape)


def _honest_stats(view: RoundView) -> tuple[np.ndarray, np.ndarray]:
    return view.honest_deltas.mean(axis=0), view.honest_deltas.std(axis=0)


def _backdoored(site: SiteData, rng: np.random.Generator, pattern: np.ndarray = TRIGGER) -> SiteData:
    """Half the training cases stamped with the trigger and labelled with the target."""
    chosen = rng.random(len(site.train)) < 0.5
    images = site.train.images.copy()
    images[chosen] = stamp_trigger(images[chosen], pattern)
    labels = np.where(chosen, BACKDOOR_TARGET, site.train.labels)
    return replace(site, train=Split(images=images, labels=labels, recorded=site.train.recorded))


class SignFlip(Attack):
    name = "sign-flip"

    def craft(self, view):
        return -view.own_delta


class GaussianNoise(Attack):
    name = "gaussian"

    def craft(self, view):
        scale = 3 * np.linalg.norm(view.honest_deltas, axis=1).mean() / np.sqrt(view.own_delta.size)
        return view.rng.normal(0, scale, view.own_delta.shape)


class LabelFlip(Attack):
    name = "label-flip"
    poisons_data = True

    def poison(self, site, rng, *, index, count):
        return replace(site, train=Split(images=site.train.images, labels=1 - site.train.labels,
                                         recorded=site.train.recorded))


class Backdoor(Attack):
    """Trigger + target label on half the cases, then model replacement: the update is
    boosted so that it survives averaging (Bagdasaryan et al.)."""

    name = "backdoor"
    poisons_data = True

    def poison(self, site, rng, *, index, count):
        return _backdoored(site, rng)

    def craft(self, view):
        return view.own_delta * view.num_clients / view.num_attackers


class ALIE(Attack):
    """A little is enough (Baruch et al. 2019): mean minus z standard deviations."""

    name = "alie"
    z: ClassVar[float] = 1.0

    def craft(self, view):
        mean, std = _honest_stats(view)
        return mean - self.z * std


class IPM(Attack):
    """Inner-product manipulation (Xie et al. 2020): the negated, scaled honest mean."""

    name = "ipm"
    epsilon: ClassVar[float] = 0.5

    def craft(self, view):
        return -self.epsilon * view.honest_deltas.mean(axis=0)


class MinMax(Attack):
    """Min-Max (Shejwalkar & Houmansadr 2021): as far as possible along -std while no
    farther from any honest update than the honest updates are from each other."""

    name = "min-max"

    def craft(self, view):
        mean, std = _honest_stats(view)
        direction = -std / (np.linalg.norm(std) + 1e-12)
        honest = view.honest_deltas
        limit = max(np.linalg.norm(a - b) for a in honest for b in honest)
        low, high = 0.0, 10 * limit
        for _ in range(30):
            gamma = (low + high) / 2
            if np.linalg.norm(honest - (mean + gamma * direction), axis=1).max() <= limit:
                low = gamma
            else:
                high = gamma
        return mean + low * direction


class FreeRider(Attack):
    """Sends back (almost) the global model and claims its examples."""

    name = "free-rider"
    jitter = 0.0

    def craft(self, view):
        return view.rng.normal(0, 1e-6, view.own_delta.shape)


class Collusion(Attack):
    """Two or more attackers push one shared harmful direction, each with its own jitter."""

    name = "colluding-pair"

    def craft(self, view):
        shared = np.random.default_rng(int(abs(view.global_vector[:8].sum()) * 1e6) % 2**32)
        direction = shared.normal(0, 1, view.own_delta.shape)
        norm = np.linalg.norm(view.honest_deltas, axis=1).mean()
        return 2 * norm * direction / np.linalg.norm(direction)


# White-box attacks, written against the guard's own yardsticks.

class NormMatchedBackdoor(Backdoor):
    """A backdoor whose update is rescaled to the honest median length every round: nothing
    for a length test to see."""

    name = "norm-matched-backdoor"
    white_box = True

    def craft(self, view):
        return _with_length(view.own_delta, view.median_norm)


class DirectionMatchedBackdoor(Backdoor):
    """A backdoor at the honest median length whose cosine with the honest mean equals the
    honest hospitals' median cosine with it: its length and direction are typical, the
    rest of it is the backdoor."""

    name = "direction-matched-backdoor"
    white_box = True

    def craft(self, view):
        mean = _unit(view.honest_deltas.mean(axis=0))
        typical = float(np.median(view.honest_deltas @ mean / np.linalg.norm(view.honest_deltas, axis=1)))
        rest = _unit(view.own_delta - (view.own_delta @ mean) * mean)
        return view.median_norm * (typical * mean + math.sqrt(max(0.0, 1 - typical**2)) * rest)


class SplitBackdoor(NormMatchedBackdoor):
    """A distributed backdoor (Xie et al. 2020, DBA): each colluder learns its own piece of
    the trigger, at the honest median length; the full trigger is what is tested."""

    name = "split-backdoor"

    def poison(self, site, rng, *, index, count):
        return _backdoored(site, rng, trigger_part(index, max(count, 1)))


class Sleeper(Attack):
    """Honest until its strike (``AttackConfig.start_round``), then its own update reversed
    at the honest median length."""

    name = "sleeper"
    white_box = True

    def craft(self, view):
        return _with_length(-view.own_delta, view.median_norm)


class Replay(Attack):
    """Another hospital's update of the previous round, plus 1% noise (its own training in
    round 1, when there is nothing to replay)."""

    name = "replay"
    white_box = True
    jitter = 0.01

    def craft(self, view):
        if view.previous_honest is None or len(view.previous_honest) == 0:
            return view.own_delta
        return view.previous_honest[view.attacker_index % len(view.previous_honest)]


class Mimic(Attack):
    """Another hospital's update of this round, plus 1% noise (double counting it)."""

    name = "mimic"
    white_box = True
    jitter = 0.01

    def craft(self, view):
        return view.honest_deltas[view.attacker_index % len(view.honest_deltas)]


class SlowDrift(Attack):
    """Turns from its own update towards the honest consensus reversed, 10 degrees more each
    round since the start, at the honest median length: each round is close to the last."""

    name = "slow-drift"
    white_box = True
    degrees_per_round: ClassVar[float] = 10.0

    def craft(self, view):
        own, target = _unit(view.own_delta), -_unit(view.honest_deltas.mean(axis=0))
        target_rest = _unit(target - (target @ own) * own)
        angle = math.radians(min(180.0, self.degrees_per_round * view.server_round))
        total = math.acos(float(np.clip(own @ target, -1.0, 1.0)))
        step = min(angle, total)
        return view.median_norm * (math.cos(step) * own + math.sin(step) * target_rest)


class CraftedOrthogonal(Attack):
    """Points a little with the honest consensus (cosine +0.1, where a direction test looks)
    while the rest of it is its own update reversed, at the honest median length."""

    name = "crafted-orthogonal"
    white_box = True
    cosine: ClassVar[float] = 0.1

    def craft(self, view):
        mean = _unit(view.honest_deltas.mean(axis=0))
        harm = -view.own_delta
        rest = _unit(harm - (harm @ mean) * mean)
        return view.median_norm * (self.cosine * mean + math.sqrt(1 - self.cosine**2) * rest)


class AttackingGrid(LocalGrid):
    """An in-process grid in which some hospitals are attackers, from ``start_round`` on."""

    def __init__(self, client_app, *, num_nodes: int, attack: Attack, malicious: set[int], seed: int = 0,
                 start_round: int = 1, **options) -> None:
        super().__init__(client_app, num_nodes=num_nodes, **options)
        self.attack, self.seed, self.start_round = attack, seed, start_round
        node_ids = list(self._contexts)
        self.malicious_nodes = {node_ids[p] for p in malicious}
        self._previous_honest: np.ndarray | None = None

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = super().push_messages(messages)
        trains = [(m, i) for m, i in zip(messages, ids) if m.metadata.message_type == "train"
                  and not self._replies[i].has_error()]
        attackers = [(m, i) for m, i in trains if m.metadata.dst_node_id in self.malicious_nodes]
        honest = [(m, i) for m, i in trains if m.metadata.dst_node_id not in self.malicious_nodes]
        if not honest:
            return ids
        sent = messages[0].content.array_records[ARRAYS_KEY]
        start = flatten(sent)
        honest_deltas = np.stack([flatten(self._replies[i].content.array_records[ARRAYS_KEY]) - start for _, i in honest])
        server_round = round_of(messages[0])
        previous, self._previous_honest = self._previous_honest, honest_deltas
        if not attackers or server_round < self.start_round:
            return ids
        # Randomness drawn from the round's global model: a resumed run replays the attack.
        rng = round_rng(start, seed=self.seed)
        for index, (_, message_id) in enumerate(attackers):
            reply = self._replies[message_id]
            view = RoundView(server_round - self.start_round + 1, start, honest_deltas, previous,
                             flatten(reply.content.array_records[ARRAYS_KEY]) - start, index, len(attackers),
                             len(trains), rng)
            reply.content.array_records[ARRAYS_KEY] = as_record(start + self.attack.send(view), sent)
        return ids


def round_of(message: Message) -> int:
    from common.protocol import CONFIG_KEY

    config = message.content.config_records.get(CONFIG_KEY)
    return int(config["server-round"]) if config is not None and "server-round" in config else 1


@dataclass(frozen=True)
class PoisonedSites:
    """A site source whose attacking hospitals train on poisoned data from ``start_round``."""

    sites: Any
    attack: Attack
    malicious: tuple[int, ...]
    seed: int = 0
    start_round: int = 1

    def __call__(self, context, server_round: int | None = None) -> SiteData:
        site = self.sites(context, server_round)
        partition = int(context.node_config["partition-id"])
        striking = server_round is not None and server_round >= self.start_round
        if partition in self.malicious and self.attack.poisons_data and striking:
            return self.attack.poison(site, np.random.default_rng([self.seed, partition]),
                                      index=self.malicious.index(partition), count=len(self.malicious))
        return site

    def epsilon_budget(self, context):
        return self.sites.epsilon_budget(context)
