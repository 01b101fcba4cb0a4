"""The ``causalfed`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.config import ScenarioError, builtin_scenarios, load_scenario

cli = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated causal learning for hospitals.")
console = Console()


@cli.command()
def simulate(
    config: Optional[str] = typer.Option(
        None, "--config", "-c", help="scenario TOML file or built-in name (default: the embedded 'default')"
    ),
    out: Path = typer.Option(Path("runs"), "--out", help="folder that receives the run folder"),
    rounds: Optional[int] = typer.Option(None, "--rounds", min=1, help="override the number of rounds"),
    engine: Optional[str] = typer.Option(
        None, "--engine", help="'ray' (Flower's simulation engine) or 'inprocess' (no Ray, for quick runs)"
    ),
) -> None:
    """Run a full local multi-site federation and write metrics.json and report.html."""
    from simulations.report import write_report
    from simulations.runner import new_run_dir, run_scenario

    try:
        scenario = load_scenario(config)
        if rounds is not None:
            scenario = scenario.with_overrides(federation={"num_rounds": rounds})
        if engine is not None:
            scenario = scenario.with_overrides(federation={"engine": engine})
    except (ScenarioError, ValueError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    run_dir = new_run_dir(out, scenario)
    console.print(
        f"scenario [bold]{scenario.name}[/bold]: {len(scenario.data.sites)} hospitals, "
        f"objective {scenario.training.objective}, {scenario.federation.num_rounds} rounds, "
        f"engine {scenario.federation.engine} -> {run_dir}"
    )
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("starting federation", total=scenario.federation.num_rounds)

        def on_round(server_round: int, sites: dict) -> None:
            heldout = [m.get("test-auroc") for m in sites.values() if m.get("role") == "heldout"]
            train = [m.get("test-auroc") for m in sites.values() if m.get("role") == "train"]
            text = f"round {server_round}: i.i.d. AUROC {_mean(train):.3f}"
            if heldout:
                text += f", o.o.d. {_mean(heldout):.3f}"
            progress.update(task, completed=server_round, description=text)

        try:
            history = run_scenario(scenario, run_dir=run_dir, on_round=on_round)
        except Exception as error:  # noqa: BLE001 - tell the user plainly, keep what was written
            console.print(f"[red]federation failed:[/red] {error}\n(partial results in {run_dir})")
            raise typer.Exit(1) from None
    report = write_report(run_dir, history, scenario)
    _print_summary(history)
    console.print(f"report: {report}")


def _mean(values: list) -> float:
    finite = [v for v in values if v is not None]
    return sum(finite) / len(finite) if finite else float("nan")


def _print_summary(history: dict) -> None:
    from simulations.selection import summarise_run

    summary = summarise_run(history, warmup_rounds=int(history["meta"].get("warmup-rounds", 0)))
    table = Table(title="AUROC")
    for column in ("model", "round", "i.i.d.", "o.o.d. (held-out)", "worst training site"):
        table.add_column(column)
    for label, row in summary.items():
        table.add_row(label, str(row["round"]), f"{row['iid-auroc']:.3f}", f"{row['ood-auroc']:.3f}",
                      f"{row['worst-train-site-auroc']:.3f}")
    console.print(table)


@cli.command()
def scenarios() -> None:
    """List the built-in scenarios."""
    for name in builtin_scenarios():
        console.print(name)


@cli.command("export-sites")
def export_sites(
    out: Path = typer.Argument(..., help="folder receiving one <site>.npz per hospital"),
    config: Optional[str] = typer.Option(None, "--config", "-c"),
) -> None:
    """Write each simulated hospital's data to its own file, as a deployed SuperNode mounts it."""
    from simulations.datasets import build_site

    try:
        scenario = load_scenario(config)
    except ScenarioError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    for index, site in enumerate(scenario.data.sites):
        path = out / f"{site.name}.npz"
        build_site(scenario, index).save(path)
        console.print(f"{site.name} ({site.role}) -> {path}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
