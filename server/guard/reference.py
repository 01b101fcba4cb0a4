"""The optional reference set: a few labelled cases the server holds (a public set, say),
and what honest local training on them does to the round's model.

Each round the server trains copies of the global model as a hospital would (the
federation's objective and recipe, a typical hospital's number of cases, drawn with
replacement from the reference cases): two at 25% and two at 75% positives, whose
difference is the direction a prevalence moves an update through the optimiser's steps,
and ``reference_trainings`` at 50%. Each client's update, less that direction, is then
compared with the balanced trainings' mean (FLTrust's server update, made blind to
prevalence). Everything is computed on sketches, so memory stays the sketch's size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data import IMAGE_SHAPE, Split
from server.guard.evidence import DirectionEvidence
from server.guard.maths import jackknife_cosines, without_direction

LOW_PREVALENCE, HIGH_PREVALENCE, BALANCED = 0.25, 0.75, 0.5
EXTREME_TRAININGS = 2


class ReferenceSetError(ValueError):
    """A reference set file that cannot be used; the message names the file and array."""


@dataclass(frozen=True)
class ReferenceSet:
    split: Split
    path: Path
    sha256: str

    @classmethod
    def load(cls, path: Path, *, max_cases: int) -> ReferenceSet:
        """Read ``images`` (n, 1, 28, 28) or feature rows (n, d) and binary ``labels`` (n,)."""
        import hashlib

        path = Path(path)
        if not path.is_file():
            raise ReferenceSetError(f"reference set not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [key for key in ("images", "labels") if key not in npz.files]
                if missing:
                    raise ReferenceSetError(f"{path}: missing arrays {missing} (expected 'images' and 'labels')")
                images, labels = np.asarray(npz["images"]), np.asarray(npz["labels"])
        except (OSError, ValueError, EOFError) as error:
            if isinstance(error, ReferenceSetError):
                raise
            raise ReferenceSetError(f"{path}: not a readable .npz ({type(error).__name__})") from None
        if images.ndim not in (2, 4) or (images.ndim == 4 and images.shape[1:] != IMAGE_SHAPE):
            raise ReferenceSetError(f"{path}: 'images' has shape {images.shape}, expected (n, 1, 28, 28) or (n, d)")
        if not np.issubdtype(images.dtype, np.number) or not np.all(np.isfinite(images)):
            raise ReferenceSetError(f"{path}: 'images' must be finite numbers")
        if labels.shape != (len(images),) or not np.isin(labels, (0, 1)).all():
            raise ReferenceSetError(f"{path}: 'labels' must be {len(images)} values in {{0, 1}}")
        if not 2 <= len(labels) <= max_cases or labels.min() == labels.max():
            raise ReferenceSetError(f"{path}: needs 2 to {max_cases} cases of both labels, has {len(labels)} "
                                    f"({int(labels.sum())} positive)")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return cls(Split(images=images.astype(np.float32), labels=labels.astype(np.int64)), path, digest)


def prevalence_sample(split: Split, *, prevalence: float, size: int, rng: np.random.Generator) -> Split:
    """``size`` cases drawn with replacement, a share ``prevalence`` of them positive."""
    positives, negatives = np.flatnonzero(split.labels == 1), np.flatnonzero(split.labels == 0)
    count = int(round(prevalence * size))
    chosen = np.concatenate([rng.choice(positives, count), rng.choice(negatives, size - count)])
    return split.subset(rng.permutation(chosen))


# Trains the round's model on a split as a hospital would; returns the update's sketch.
SketchedTraining = Callable[[Split, int], np.ndarray]


def direction_evidence(
    sketches: np.ndarray, train: SketchedTraining, split: Split, *, cases: int, trainings: int,
    rng: np.random.Generator, source: str = "the reference set",
) -> DirectionEvidence:
    """Each client's cosine with the balanced reference trainings, less the prevalence
    direction, and its jackknife error over the trainings."""

    def updates(prevalence: float, count: int) -> np.ndarray:
        return np.stack([train(prevalence_sample(split, prevalence=prevalence, size=cases, rng=rng),
                               int(rng.integers(2**31))) for _ in range(count)])

    prevalence_direction = (updates(HIGH_PREVALENCE, EXTREME_TRAININGS).mean(axis=0)
                            - updates(LOW_PREVALENCE, EXTREME_TRAININGS).mean(axis=0))
    balanced = without_direction(updates(BALANCED, trainings), prevalence_direction)
    cosines, errors = jackknife_cosines(without_direction(sketches, prevalence_direction), balanced)
    return DirectionEvidence(cosines, errors, len(split), source)
