"""``causalfed explain``: the printing side (the maths is ``server/explain.py``)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from cli.output import UserError, console
from common.calibration import CALIBRATION_FILE, IDENTITY_CALIBRATION, read_calibration

NAMES = {"auroc": "AUROC", "error": "error rate at its threshold", "log-loss": "log-loss"}


def run_explain(run_dir: Path, scenario, site: str) -> None:
    import torch

    from client.models import model_for_state
    from common.files import atomic_write_text
    from server.explain import MECHANISMS, explain_change
    from simulations.datasets import build_site, input_shape

    model = model_for_state(torch.load(run_dir / "model.pt"), input_shape=input_shape(scenario.data))
    calibration = IDENTITY_CALIBRATION
    saved = run_dir / CALIBRATION_FILE
    if saved.is_file():
        try:
            calibration = read_calibration(saved)[0] or IDENTITY_CALIBRATION
        except ValueError as error:
            raise UserError(str(error)) from None
    hospitals = [build_site(scenario, i) for i in range(len(scenario.data.sites))]
    sources = [(h.test.images, h.test.labels) for h in hospitals if h.role == "train" and h.name != site]
    target = next(h for h in hospitals if h.name == site)
    explanation = explain_change(model, sources, (target.test.images, target.test.labels), calibration=calibration)
    table = Table(title=f"{site}: change from the training hospitals, by mechanism (Shapley, 90% bootstrap intervals)")
    for column in ("measure", "training sites", site, *MECHANISMS, "leads", "outside source support"):
        table.add_column(column)
    for a in explanation.attributions:
        cells = [f"{a.shares[m]:+.3f} [{a.intervals[m][0]:+.3f}, {a.intervals[m][1]:+.3f}]" for m in MECHANISMS]
        table.add_row(NAMES[a.metric], f"{a.source:.3f}", f"{a.target:.3f}", *cells, a.leading, f"{a.outside:+.3f}")
    console.print(table)
    mechanism, measure = explanation.headline
    console.print(f"[bold]leads: {mechanism}[/] (read from the {NAMES[measure]}; the first measure that can tell, "
                  "in the order error rate, AUROC, log-loss)")
    console.print("The shares add up to the change; 'outside source support' is how much of the acquisition's effect "
                  "the training hospitals' cases could not show.")
    check = explanation.prevalence
    console.print(f"prevalence at {site}: {check.known:.3f} by its labels; from its images alone {check.mlls:.3f} (MLLS)"
                  + (f", {check.bbse:.3f} (BBSE)" if check.bbse is not None else ""))
    out = run_dir / f"explain-{site}.json"
    atomic_write_text(out, json.dumps({"leads": explanation.headline[0], "read-from": explanation.headline[1],
                                       "attributions": [a.as_dict() for a in explanation.attributions],
                                       "prevalence": vars(check)}, indent=1))
    console.print(f"written: {out}")
