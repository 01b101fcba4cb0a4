"""``causalfed explain``: the printing side (the maths is ``server/explain.py``)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from cli.output import console


def run_explain(run_dir: Path, scenario, site: str) -> None:
    import torch

    from client.models import model_for_state
    from common.files import atomic_write_text
    from server.explain import MECHANISMS, explain_drop
    from simulations.datasets import build_site, input_shape

    model = model_for_state(torch.load(run_dir / "model.pt"), input_shape=input_shape(scenario.data))
    hospitals = [build_site(scenario, i) for i in range(len(scenario.data.sites))]
    sources = [(h.test.images, h.test.labels) for h in hospitals if h.role == "train" and h.name != site]
    target = next(h for h in hospitals if h.name == site)
    results = explain_drop(model, sources, (target.test.images, target.test.labels))
    table = Table(title=f"{site}: change from the training hospitals, by mechanism (Shapley)")
    for column in ("metric", "training sites", site, "explained", *MECHANISMS, "outside source support"):
        table.add_column(column)
    for result in results:
        table.add_row(
            result.metric, f"{result.source_loss:.3f}", f"{result.target_loss:.3f}", f"{result.reweighted_loss:.3f}",
            *(f"{result.shares[m]:+.3f}" for m in MECHANISMS), f"{result.target_loss - result.reweighted_loss:+.3f}",
        )
    console.print(table)
    console.print(f"largest share of the log-loss change: [bold]{results[0].dominant}[/bold]")
    out = run_dir / f"explain-{site}.json"
    atomic_write_text(out, json.dumps([r.as_dict() for r in results], indent=1))
    console.print(f"written: {out}")
