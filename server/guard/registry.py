"""The guard's detectors by name: an explicit registry, one entry per class.

Add a detector by writing its class in ``detectors.py`` and listing it here; the guard
runs every registered detector and ``tests/test_guard_detectors.py`` checks them all.
"""

from __future__ import annotations

from server.guard.detectors import Boosted, Copy, Crafted, Detector, Direction, Idle, Mirror, Reversal, Unlearnt

DETECTORS: dict[str, type[Detector]] = {
    cls.name: cls for cls in (Idle, Boosted, Unlearnt, Copy, Mirror, Crafted, Reversal, Direction)
}


def create_detector(name: str) -> Detector:
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; registered: {sorted(DETECTORS)}")
    return DETECTORS[name]()
