"""Two published robust aggregation rules, as the papers define them, for comparison with the
guard: FLTrust (Cao et al., NDSS 2021) and FLAME (Nguyen et al., USENIX Security 2022).

Each is a Flower FedAvg subclass overriding ``aggregate_train``; ``server/strategy.py``
mixes it under the causalfed strategy like Flower's own Krum or FedMedian. They read the
round's global model from ``self._sent`` and (FLTrust) the server's own update on its root
dataset from ``self.root_update()``, both provided by the causalfed strategy.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from sklearn.cluster import HDBSCAN

from common.protocol import ARRAYS_KEY
from server.arrays import as_record, flatten


def _deltas(replies: list[Message], sent: ArrayRecord) -> tuple[np.ndarray, np.ndarray]:
    names = list(sent)
    start = flatten(sent, names)
    return start, np.stack([flatten(r.content.array_records[ARRAYS_KEY], names) - start for r in replies])


def fltrust_update(deltas: np.ndarray, server_update: np.ndarray) -> np.ndarray:
    """FLTrust's global update: each client update rescaled to the server update's length,
    weighted by its trust score ReLU(cosine with the server update); zero if no client
    is trusted."""
    server_norm = float(np.linalg.norm(server_update))
    norms = np.linalg.norm(deltas, axis=1)
    trust = np.maximum(0.0, deltas @ server_update / (norms * server_norm + 1e-300))
    if trust.sum() <= 0:
        return np.zeros_like(server_update)
    normalised = deltas * (server_norm / np.maximum(norms, 1e-300))[:, None]
    return trust @ normalised / trust.sum()


def flame_update(deltas: np.ndarray, *, noise_factor: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """FLAME's global update and which clients it admitted: HDBSCAN over pairwise cosine
    distances (smallest cluster a majority, n/2 + 1; min_samples 1), the admitted updates
    clipped to the median update length S (of all clients), averaged, plus Gaussian noise
    of standard deviation ``noise_factor`` * S (the paper's lambda, 0.001 for image
    classification). Cosines are between updates, since every local model starts from the
    same global model."""
    n = len(deltas)
    units = deltas / np.maximum(np.linalg.norm(deltas, axis=1, keepdims=True), 1e-300)
    distances = np.clip(1.0 - units @ units.T, 0.0, 2.0)
    labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed",
                     allow_single_cluster=True, copy=True).fit(distances).labels_
    admitted = labels == np.bincount(labels[labels >= 0]).argmax() if (labels >= 0).any() else np.ones(n, dtype=bool)
    norms = np.linalg.norm(deltas, axis=1)
    bound = float(np.median(norms))
    clipped = deltas[admitted] * np.minimum(1.0, bound / np.maximum(norms[admitted], 1e-300))[:, None]
    update = clipped.mean(axis=0)
    return update + rng.normal(0.0, noise_factor * bound, update.shape), admitted


class FLTrust(FedAvg):
    """Needs the server's root dataset (the guard's reference set, ``reference_set``)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error()]
        if not replies:
            return None, None
        start, deltas = _deltas(replies, self._sent)
        update = fltrust_update(deltas, self.root_update())
        return as_record(start + update, self._sent), None


class FLAME(FedAvg):
    noise_factor: float = 0.001

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error()]
        if len(replies) < 2:
            return super().aggregate_train(server_round, replies)
        start, deltas = _deltas(replies, self._sent)
        rng = np.random.default_rng([self.seed, server_round])
        update, _ = flame_update(deltas, noise_factor=self.noise_factor, rng=rng)
        return as_record(start + update, self._sent), None
