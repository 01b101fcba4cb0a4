"""``causalfed explain`` and ``causalfed adapt``: what changed at a hospital, and onboarding one."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.output import UserError
from common.feature_shift import SMALL_EFFECT


def register(cli: typer.Typer) -> None:
    cli.command()(explain)
    cli.command()(adapt)


def _run_scenario(run_dir: Path):
    from server.resume import ResumeError
    from simulations.runner import load_run_scenario

    try:
        scenario = load_run_scenario(run_dir)
    except ResumeError as error:
        raise UserError(str(error)) from None
    if not (run_dir / "model.pt").is_file():
        raise UserError(f"{run_dir} has no model.pt: the run did not finish")
    return scenario


def explain(
    run_dir: Path = typer.Argument(..., help="a run folder written by `causalfed simulate`"),
    site: str = typer.Option(..., "--site", "-s", help="the hospital whose performance changed"),
) -> None:
    """Attribute a hospital's performance change to prevalence, acquisition and annotation shifts."""
    from cli.explaining import run_explain

    scenario = _run_scenario(run_dir)
    names = [s.name for s in scenario.data.sites]
    if site not in names:
        raise UserError(f"--site {site!r}: no such hospital in this run; hospitals: {names}")
    run_explain(run_dir, scenario, site)


def adapt(
    model_path: Path = typer.Argument(..., help="the global model (model.pt of a run)"),
    site_file: Path = typer.Argument(..., help="the new hospital's .npz (only its images are used; docs/site-data.md)"),
    out: Path = typer.Option(..., "--out", "-o", help="where to write the adapted model"),
    source_prevalence: Optional[float] = typer.Option(
        None, "--source-prevalence", min=0.01, max=0.99,
        help="the federation's prevalence the model is calibrated to [default: the run's, from metrics.json; else 0.5]"),
    epochs: int = typer.Option(10, "--epochs", min=1, help="passes over the new hospital's images"),
    reference: Optional[Path] = typer.Option(
        None, "--reference", help="the federation's feature moments [default: feature-moments.json beside the model]"),
    min_shift: float = typer.Option(SMALL_EFFECT, "--min-shift", min=0.0,
                                    help="adapt only if the features moved at least this far (mean standardised difference)"),
    always: bool = typer.Option(False, "--always", help="adapt without checking the shift"),
) -> None:
    """Adapt the global model to a new hospital's unlabeled images (head frozen)."""
    from cli.adapting import run_adapt

    run_adapt(model_path, site_file, out=out, source_prevalence=source_prevalence, epochs=epochs, reference=reference,
              min_shift=min_shift, always=always)
