"""Where a deployed ClientApp finds its hospital's data and its own privacy budget.

A SuperNode is started with ``--node-config 'data-path="/data/site.npz"'`` and reads that
file (``docs/site-data.md``). Simulations give each virtual node its hospital instead
(``simulations/sites.py``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Protocol

from flwr.app import Context

from common.data import SiteData


class SiteSource(Protocol):
    """A hospital's data for a message of round ``server_round`` (None: not a round's message)."""

    def __call__(self, context: Context, server_round: int | None = None) -> SiteData: ...


class BudgetSource(Protocol):
    def __call__(self, context: Context) -> float | None: ...


@lru_cache(maxsize=8)
def _load_file(path: str) -> SiteData:
    return SiteData.load(Path(path))


def site_from_node_config(context: Context, server_round: int | None = None) -> SiteData:
    path = context.node_config.get("data-path")
    if not path:
        raise ValueError(
            "this SuperNode has no data: start it with --node-config 'data-path=\"/path/site.npz\"'"
        )
    return _load_file(str(path))


def budget_from_node_config(context: Context) -> float | None:
    """The hospital's own DP budget: ``--node-config 'epsilon-budget=3.0'`` (unset: the federation's)."""
    value = context.node_config.get("epsilon-budget")
    if value is None or value == "":
        return None
    budget = float(value)
    if not budget > 0:
        raise ValueError(f"epsilon-budget must be positive, got {value!r}")
    return budget
