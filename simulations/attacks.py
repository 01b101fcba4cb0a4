"""Attacks on the federation, registered by name (one small class each).

Model-poisoning attackers are omniscient, as in the papers that define them: each round
they see the honest hospitals' updates before sending their own. ``AttackingGrid``
(in-process) gives them that view. Data poisoning (label flip, backdoor) changes what the
attacker trains on. Attackers never send identical vectors: each adds its own jitter.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
from flwr.app import Message

from common.data import SiteData, Split
from common.protocol import ARRAYS_KEY
from server.guard_round import as_record, flatten
from server.guard_stats import round_rng
from simulations.local_grid import LocalGrid

ATTACKS: dict[str, type[Attack]] = {}
TRIGGER = np.zeros((4, 4), dtype=np.float32)
TRIGGER[::2, ::2] = 1.0  # a checkerboard burned into the bottom-right corner
BACKDOOR_TARGET = 0  # triggered images should read as "no lesion"


def stamp_trigger(images: np.ndarray) -> np.ndarray:
    stamped = images.copy()
    stamped[:, 0, -5:-1, -5:-1] = np.maximum(stamped[:, 0, -5:-1, -5:-1], TRIGGER)
    return stamped


def trigger_flip_rate(*, positives: np.ndarray, stamped: np.ndarray, negatives: np.ndarray) -> float:
    """Backdoor success on a ranking model: of the positive cases it ranks above the
    median negative, the share the trigger pushes to or below it (scores: positives, the
    same positives stamped, and negatives). NaN if no positive ranks above it.

    Rank-based, not at a fixed threshold of 0.5: honest hospitals differ in prevalence, so
    how many positives a model calls negative moves with its bias. Seed 6: two models
    trained on the same honest hospitals, with the same AUROC (0.83), called 4% and 32% of
    the clean positives negative, and 8% and 42% of the stamped ones."""
    cut = float(np.median(negatives))
    above = positives > cut
    return float(np.mean(stamped[above] <= cut)) if above.any() else float("nan")


@dataclass(frozen=True)
class RoundView:
    """What an omniscient attacker knows when it crafts its update."""

    global_vector: np.ndarray
    honest_deltas: np.ndarray  # (n_honest, p)
    own_delta: np.ndarray  # what its own (possibly poisoned) training produced
    attacker_index: int
    num_attackers: int
    num_clients: int
    rng: np.random.Generator


class Attack(ABC):
    name: ClassVar[str]
    poisons_data: ClassVar[bool] = False
    jitter: ClassVar[float] = 0.05  # relative: no two attackers send the same vector

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        ATTACKS[cls.name] = cls

    def poison(self, site: SiteData, rng: np.random.Generator) -> SiteData:
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

    def poison(self, site, rng):
        flipped = Split(images=site.train.images, labels=1 - site.train.labels)
        return replace(site, train=flipped)


class Backdoor(Attack):
    """Trigger + target label on half the cases, then model replacement: the update is
    boosted so that it survives averaging (Bagdasaryan et al.)."""

    name = "backdoor"
    poisons_data = True

    def poison(self, site, rng):
        chosen = rng.random(len(site.train)) < 0.5
        images = site.train.images.copy()
        images[chosen] = stamp_trigger(images[chosen])
        labels = np.where(chosen, BACKDOOR_TARGET, site.train.labels)
        return replace(site, train=Split(images=images, labels=labels))

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
            candidate = mean + gamma * direction
            if np.linalg.norm(honest - candidate, axis=1).max() <= limit:
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


class AttackingGrid(LocalGrid):
    """An in-process grid in which some hospitals are attackers."""

    def __init__(self, client_app, *, num_nodes: int, attack: Attack, malicious: set[int], seed: int = 0) -> None:
        super().__init__(client_app, num_nodes=num_nodes)
        self.attack, self.seed = attack, seed
        node_ids = list(self._contexts)
        self.malicious_nodes = {node_ids[p] for p in malicious}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = super().push_messages(messages)
        trains = [(m, i) for m, i in zip(messages, ids) if m.metadata.message_type == "train"
                  and not self._replies[i].has_error()]
        attackers = [(m, i) for m, i in trains if m.metadata.dst_node_id in self.malicious_nodes]
        honest = [(m, i) for m, i in trains if m.metadata.dst_node_id not in self.malicious_nodes]
        if not attackers or not honest:
            return ids
        sent = messages[0].content.array_records[ARRAYS_KEY]
        start = flatten(sent)
        # Randomness drawn from the round's global model: a resumed run replays the attack.
        rng = round_rng(start, seed=self.seed)
        honest_deltas = np.stack([flatten(self._replies[i].content.array_records[ARRAYS_KEY]) - start for _, i in honest])
        for index, (_, message_id) in enumerate(attackers):
            reply = self._replies[message_id]
            view = RoundView(start, honest_deltas, flatten(reply.content.array_records[ARRAYS_KEY]) - start,
                             index, len(attackers), len(trains), rng)
            reply.content.array_records[ARRAYS_KEY] = as_record(start + self.attack.send(view), sent)
        return ids


@dataclass(frozen=True)
class PoisonedSites:
    """A site source whose attacking hospitals train on poisoned data."""

    sites: Any
    attack: Attack
    malicious: frozenset[int]
    seed: int = 0

    def __call__(self, context) -> SiteData:
        site = self.sites(context)
        partition = int(context.node_config["partition-id"])
        if partition in self.malicious and self.attack.poisons_data:
            return self.attack.poison(site, np.random.default_rng([self.seed, partition]))
        return site

    def epsilon_budget(self, context):
        return self.sites.epsilon_budget(context)
