"""Glue between Flower replies and the guard: flatten updates, leave-one-out on the server's
validation set, per-round anomaly reports (JSON)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, Message

from common.data import Split
from common.files import atomic_write_text
from common.metrics import auroc
from common.protocol import ARRAYS_KEY, METRICS_KEY
from server.guard import CausalGuard, Verdict
from server.guard_evidence import Measurements
from server.guard_stats import without_direction
from server.reference import BALANCED_REFERENCES, EXTREME_REFERENCES, reference_alignments, train_references

ANOMALY_DIR = "anomalies"


def flatten(record: ArrayRecord, names: list[str] | None = None) -> np.ndarray:
    """One float64 vector of the record's arrays, in ``names`` order (default: its own)."""
    return np.concatenate([record[name].numpy().astype(np.float64).ravel() for name in names or list(record)])


def unflatten(vector: np.ndarray, names: list[str], shapes: list[tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The inverse of ``flatten``: named arrays of the given shapes."""
    arrays, offset = {}, 0
    for name, shape in zip(names, shapes):
        size = int(np.prod(shape, dtype=np.int64))
        arrays[name] = vector[offset : offset + size].reshape(shape)
        offset += size
    return arrays


def as_record(vector: np.ndarray, like: ArrayRecord) -> ArrayRecord:
    """A flat vector back into a record shaped (names, shapes, dtypes) like ``like``."""
    names = list(like)
    arrays = unflatten(vector, names, [tuple(like[name].shape) for name in names])
    return ArrayRecord({name: Array(arrays[name].astype(like[name].numpy().dtype)) for name in names})


def bounded_update(vector: np.ndarray, start: np.ndarray, *, max_norm: float) -> np.ndarray:
    """The model ``vector`` with its update (``vector - start``) shrunk to at most ``max_norm``."""
    delta = vector - start
    norm = float(np.linalg.norm(delta))
    return vector if norm <= max_norm else start + delta * (max_norm / norm)


def _flat_gradient(grads: dict[str, torch.Tensor], names: list[str], shapes: list[tuple[int, ...]]) -> np.ndarray:
    """Named gradients as one float64 vector in ``names`` order; zero where a name has none
    (buffers)."""
    return np.concatenate([
        grads[name].numpy().astype(np.float64).ravel() if name in grads else np.zeros(int(np.prod(shape)))
        for name, shape in zip(names, shapes)
    ])


# Trains a model in place on a split as a hospital would: (model, split, seed, server round).
Recipe = Callable[[torch.nn.Module, Split, int, int], None]


@dataclass
class ValidationProbe:
    """The server's small clean validation set, how to score a flat parameter vector and,
    with a ``recipe``, how to train one as a hospital would (``server/reference.py``)."""

    split: Split
    build_model: Callable[[], torch.nn.Module]
    recipe: Recipe | None = None

    def _model(self, flat: np.ndarray, names: list[str], shapes: list[tuple[int, ...]]) -> torch.nn.Module:
        model = self.build_model()
        arrays = unflatten(flat, names, shapes)
        model.load_state_dict({name: torch.as_tensor(value, dtype=torch.float32) for name, value in arrays.items()})
        return model.eval()

    def _images(self) -> torch.Tensor:
        return torch.as_tensor(self.split.images, dtype=torch.float32)

    def _logits(self, flat: np.ndarray, names: list[str], shapes: list[tuple[int, ...]]) -> torch.Tensor:
        with torch.no_grad():
            return self._model(flat, names, shapes)(self._images())

    def loss(self, flat: np.ndarray, names: list[str], shapes: list[tuple[int, ...]]) -> float:
        logits = self._logits(flat, names, shapes)
        return float(F.binary_cross_entropy_with_logits(logits, torch.as_tensor(self.split.labels).float()))

    def auroc(self, flat: np.ndarray, names: list[str], shapes: list[tuple[int, ...]]) -> float:
        return auroc(labels=self.split.labels, scores=self._logits(flat, names, shapes).numpy())

    def trained(
        self, flat: np.ndarray, names: list[str], shapes: list[tuple[int, ...]], split: Split, *, seed: int,
        server_round: int,
    ) -> np.ndarray:
        """The flat vector after a hospital's local training (``recipe``) from ``flat`` on ``split``."""
        if self.recipe is None:
            raise ValueError("this probe has no training recipe")
        model = self._model(flat, names, shapes)
        self.recipe(model, split, seed, server_round)
        state = model.state_dict()
        return np.concatenate([state[name].numpy().astype(np.float64).ravel() for name in names])

    def common_shift(self, flat: np.ndarray, names: list[str], shapes: list[tuple[int, ...]]) -> np.ndarray:
        """The gradient at ``flat`` of the mean score over the validation cases (flat, in
        ``names`` order; zero for buffers): the direction that moves every case's score
        together, which is what a hospital's prevalence pushes along."""
        model = self._model(flat, names, shapes)
        parameters = dict(model.named_parameters())
        grads = torch.autograd.grad(model(self._images()).mean(), list(parameters.values()))
        return _flat_gradient(dict(zip(parameters, grads)), names, shapes)

    def ranking_gradients(
        self, flat: np.ndarray, names: list[str], shapes: list[tuple[int, ...]], *, resamples: int, seed: int = 0
    ) -> Iterator[np.ndarray]:
        """The gradient at ``flat`` of a pairwise ranking loss on the validation cases (flat,
        in ``names`` order; zero for buffers), then its gradient on ``resamples`` bootstrap
        resamples of the cases. Nothing for a one-class set.

        Every positive against every negative (the logistic surrogate of 1 - AUROC): the
        bias cancels, so the direction says what ranks the cases, not their prevalence.
        One forward pass serves every resample; the autograd graph is kept for them all.
        """
        labels = torch.as_tensor(self.split.labels)
        if labels.min() == labels.max():
            return
        model = self._model(flat, names, shapes)
        scores = model(self._images())
        parameters = dict(model.named_parameters())
        rng = np.random.default_rng(seed)
        cases = [np.arange(len(labels))] + [rng.integers(0, len(labels), len(labels)) for _ in range(resamples)]
        for index in cases:
            chosen, chosen_labels = scores[index], labels[index]
            if chosen_labels.min() == chosen_labels.max():
                continue  # a resample with one class ranks nothing
            margins = chosen[chosen_labels == 1][:, None] - chosen[chosen_labels == 0][None, :]
            grads = torch.autograd.grad(F.softplus(-margins).mean(), list(parameters.values()), retain_graph=True)
            yield _flat_gradient(dict(zip(parameters, grads)), names, shapes)


def without_common_shift(vectors: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``vectors`` (one per row) less their component along ``shift``.

    Why: in a network with rectified features, a push of every score down (a hospital with
    few positives, early on) moves the cases with the strongest features, the lesions, down
    the most. That reverses the ranking nearly as much as flipped labels do: on seed 6, two
    honest low-prevalence hospitals' models alone lost 0.13 validation AUROC in round 1,
    the label-flipper's 0.20. Without the shift, theirs lost 0.01 and the flipper's 0.18.
    """
    return without_direction(vectors, shift)


def leave_one_out_effects(
    vectors: np.ndarray, weights: np.ndarray, probe: ValidationProbe, names: list[str], shapes: list[tuple[int, ...]]
) -> tuple[np.ndarray, float]:
    """Validation loss of the aggregate without each client, minus with all of them."""
    total = weights @ vectors
    everyone = probe.loss(total / weights.sum(), names, shapes)
    effects = np.array([
        probe.loss((total - w * v) / (weights.sum() - w), names, shapes) - everyone
        for v, w in zip(vectors, weights)
    ])
    return effects, everyone


def solo_auroc_changes(
    vectors: np.ndarray, start: np.ndarray, probe: ValidationProbe, names: list[str], shapes: list[tuple[int, ...]]
) -> np.ndarray:
    """Validation AUROC of each client's model alone minus that of the model it started from.

    A ranking measure: a hospital whose prevalence differs moves the bias, and with it the
    log-loss, while flipped labels or a flipped update reverse the ranking. (Through the
    features, a prevalence moves the ranking too: ``guard_replies`` passes the models
    without their common shift, ``without_common_shift``.)
    """
    before = probe.auroc(start, names, shapes)
    return np.array([probe.auroc(v, names, shapes) - before for v in vectors])


def ranking_directions(
    start: np.ndarray, probe: ValidationProbe, names: list[str], shapes: list[tuple[int, ...]],
    *, resamples: int = 40, shift: np.ndarray | None = None,
) -> np.ndarray | None:
    """The validation ranking loss's gradients at the round's start (one per row): on every
    case, then on each bootstrap resample (``ValidationProbe.ranking_gradients``). With
    ``shift``, without their common shift (``without_common_shift``). None without a ranking
    (a one-class set, or too few resamples with two classes).

    Memory: one vector per resample (41 of the model's size by default).
    """
    gradients = list(probe.ranking_gradients(start, names, shapes, resamples=resamples))
    if len(gradients) < 3:
        return None
    directions = np.stack(gradients)
    return directions if shift is None else without_common_shift(directions, shift)


def ranking_alignments(deltas: np.ndarray, directions: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of each update with the descent direction of the validation ranking loss
    (``deltas``: one update per row; ``directions``: ``ranking_directions``), and its
    bootstrap standard error (NaN without a ranking). ``guard_replies`` passes both without
    their common shift (``without_common_shift``), so prevalence counts neither for nor
    against.

    The error is what a few hundred validation cases leave unsure: their direction is only
    an estimate of the population's. Linear in the parameters: a dot product per client
    and resample.
    """
    if directions is None:
        return np.full(len(deltas), np.nan), np.full(len(deltas), np.nan)
    lengths = np.linalg.norm(deltas, axis=1) + 1e-12
    cosines = -(deltas @ directions.T) / (lengths[:, None] * (np.linalg.norm(directions, axis=1) + 1e-12))
    return cosines[:, 0], np.std(cosines[:, 1:], axis=1, ddof=1)


def data_span_ratios(deltas: np.ndarray, directions: np.ndarray | None) -> np.ndarray:
    """The share of each update's norm that lies in the span of the validation ranking
    gradients (``ranking_directions``), over the share an isotropic noise vector would have
    there (sqrt(k / d) for k directions in d parameters). NaN without directions.

    Why: an update learnt from cases like the validation cases moves along what their
    gradients move: in the benchmark, 14 to 28 times noise's share, every round. A
    Gaussian-noise or random-direction update has about 1 (0.8 to 1.1), whatever its size,
    and its cosine with the ranking is 0.00 +/- 0.00, which says neither for nor against it.
    Linear in the parameters: a QR factorisation of d x k.
    """
    if directions is None:
        return np.full(len(deltas), np.nan)
    basis, _ = np.linalg.qr(directions.T)  # (d, k), orthonormal columns
    shares = np.linalg.norm(deltas @ basis, axis=1) / (np.linalg.norm(deltas, axis=1) + 1e-300)
    return shares / math.sqrt(basis.shape[1] / basis.shape[0])


def guard_replies(
    guard: CausalGuard,
    replies: list[Message],
    global_arrays: ArrayRecord,
    sites: list[str],
    probe: ValidationProbe | None,
    *,
    server_round: int = 1,
) -> tuple[list[Verdict], dict]:
    names = list(global_arrays.keys())
    shapes = [tuple(global_arrays[name].shape) for name in names]
    start = flatten(global_arrays, names)
    vectors = np.stack([flatten(r.content.array_records[ARRAYS_KEY], names) for r in replies])
    deltas = vectors - start
    sketches = np.stack([guard.sketch(d) for d in deltas])
    samples = np.stack([guard.sample(d) for d in deltas])
    weights = np.array([float(r.content.metric_records[METRICS_KEY]["num-examples"]) for r in replies])
    measured, base = Measurements(samples=samples), None
    if probe is not None:
        measured.loo_effects, base = leave_one_out_effects(vectors, weights, probe, names, shapes)
        # The ranking measures judge updates without their common shift (prevalence, not harm).
        shift = probe.common_shift(start, names, shapes)
        unshifted = without_common_shift(deltas, shift)
        measured.solo_auroc_changes = solo_auroc_changes(start + unshifted, start, probe, names, shapes)
        directions = ranking_directions(start, probe, names, shapes, shift=shift)
        measured.ranking_alignments, measured.ranking_errors = ranking_alignments(unshifted, directions)
        measured.data_span_ratios = data_span_ratios(unshifted, directions)
        cases = int(np.median(weights))
        if probe.recipe is not None and cases >= 2:
            def train(flat: np.ndarray, split: Split, seed: int) -> np.ndarray:
                return probe.trained(flat, names, shapes, split, seed=seed, server_round=server_round)

            references = train_references(start, probe.split, train, cases=cases, balanced=BALANCED_REFERENCES,
                                          extremes=EXTREME_REFERENCES, seed=guard.seed)
            measured.reference_alignments, measured.reference_errors = reference_alignments(deltas, references)
    verdicts, graph = guard.judge(sites, sketches, measured)
    graph["validation_loss"] = base
    graph["update_norms"] = np.linalg.norm(deltas, axis=1)  # the strategy bounds borderline updates by their median
    return verdicts, graph


def write_anomaly_report(folder: Path, server_round: int, verdicts: list[Verdict], graph: dict) -> Path:
    path = folder / ANOMALY_DIR / f"round-{server_round:03d}.json"
    body = {
        "round": server_round,
        "flagged": [v.client for v in verdicts if v.flagged],
        "verdicts": [v.as_dict() for v in verdicts],
        "edges": [{"a": a, "b": b, "partial_correlation": w} for a, b, w in graph.get("edges", [])],
        "set_aside": graph.get("set_aside", []),  # judged first, then left out of the others' yardsticks
        "validation_loss": graph.get("validation_loss"),
    }
    atomic_write_text(path, json.dumps(body, indent=1))
    return path
