"""First gate for every training reply: is it a well-formed update for this model?

Each check returns the reason a reply is unusable, or None. A rejected reply is left out
of aggregation, logged and recorded; the round goes on with the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from common.protocol import ARRAYS_KEY, METRICS_KEY

# The .npy header Flower serialises each array with: a few hundred bytes at most.
NPY_HEADER_SLACK = 4096


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def model_spec(arrays: ArrayRecord) -> dict[str, ArraySpec]:
    """What every update must look like: the global model's names, shapes and dtypes."""
    return {name: ArraySpec(tuple(array.shape), str(array.dtype)) for name, array in arrays.items()}


def restore_dtypes(aggregate: ArrayRecord, spec: dict[str, ArraySpec]) -> ArrayRecord:
    """The aggregate with every array back in the global model's dtype.

    A weighted mean turns integer arrays (batch norm's ``num_batches_tracked``) into
    float64; left so, the next round's global model would declare float64 and every
    hospital's int64 update would be rejected as malformed. Integers are rounded.
    Arrays already in their dtype are kept as they are (no re-encoding).
    """
    restored = {}
    for name, array in aggregate.items():
        wanted = np.dtype(spec[name].dtype)
        if str(array.dtype) == spec[name].dtype:
            restored[name] = array
            continue
        values = array.numpy()
        values = np.rint(values) if np.issubdtype(wanted, np.integer) else values
        restored[name] = Array(np.asarray(values.astype(wanted)))
    return ArrayRecord(restored)


def array_problem(name: str, array: Array, spec: ArraySpec) -> str | None:
    if tuple(array.shape) != spec.shape:
        return f"array {name!r} has shape {tuple(array.shape)}, expected {spec.shape}"
    if str(array.dtype) != spec.dtype:
        return f"array {name!r} has dtype {array.dtype}, expected {spec.dtype}"
    if len(array.data) > spec.nbytes + NPY_HEADER_SLACK:
        return f"array {name!r} carries {len(array.data)} bytes, at most {spec.nbytes + NPY_HEADER_SLACK} expected"
    try:
        values = array.numpy()
    except (TypeError, ValueError, OSError) as error:
        return f"array {name!r} does not decode: {error}"
    if values.shape != spec.shape or values.dtype != np.dtype(spec.dtype):
        return f"array {name!r} does not decode to its declared shape and dtype"
    if not np.isfinite(values).all():
        return f"array {name!r} holds {int((~np.isfinite(values)).sum())} NaN/Inf values"
    return None


def update_problem(content: RecordDict, spec: dict[str, ArraySpec], *, max_examples: int) -> str | None:
    """Why this train reply cannot be aggregated, or None if it is well-formed."""
    if list(content.array_records) != [ARRAYS_KEY]:
        return f"expected one ArrayRecord '{ARRAYS_KEY}', got {sorted(content.array_records)}"
    record = content.array_records[ARRAYS_KEY]
    if set(record) != set(spec):
        missing, extra = sorted(set(spec) - set(record)), sorted(set(record) - set(spec))
        return f"arrays do not match the model: missing {missing}, unexpected {extra}"
    for name, array in record.items():
        problem = array_problem(name, array, spec[name])
        if problem:
            return problem
    metrics = content.metric_records.get(METRICS_KEY)
    if metrics is None or "num-examples" not in metrics:
        return "no 'num-examples' in the reply's metrics"
    count = metrics["num-examples"]
    if not isinstance(count, int) or not 0 < count <= max_examples:
        return f"num-examples {count!r} is not in 1..{max_examples} (the hospital declared {max_examples})"
    return None
