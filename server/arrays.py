"""Model arrays as flat vectors and back: what the strategy, the guard and the robust rules
compute on. Pure numpy over Flower's ArrayRecord."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def flatten(record: ArrayRecord, names: list[str] | None = None) -> np.ndarray:
    """One float64 vector of the record's arrays, in ``names`` order (default: its own)."""
    return np.concatenate([record[name].numpy().astype(np.float64).ravel() for name in names or list(record)])


def as_record(vector: np.ndarray, like: ArrayRecord) -> ArrayRecord:
    """A flat vector back into a record shaped (names, shapes, dtypes) like ``like``."""
    arrays, offset = {}, 0
    for name in like:
        reference = like[name].numpy()
        arrays[name] = Array(vector[offset : offset + reference.size].reshape(reference.shape).astype(reference.dtype))
        offset += reference.size
    return ArrayRecord(arrays)


def scaled_update(record: ArrayRecord, start: ArrayRecord, scale: float) -> ArrayRecord:
    """``start + scale * (record - start)``, array by array (no full-length copy of the model)."""
    arrays = {}
    for name in start:
        origin = start[name].numpy()
        moved = origin.astype(np.float64) + scale * (record[name].numpy().astype(np.float64) - origin)
        if np.issubdtype(origin.dtype, np.integer):
            moved = np.rint(moved)
        arrays[name] = Array(np.asarray(moved.astype(origin.dtype)))
    return ArrayRecord(arrays)
