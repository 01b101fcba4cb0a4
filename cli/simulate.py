"""``causalfed simulate``: preflight, the federation(s), the verdict, the report."""

from __future__ import annotations

import shutil
import traceback
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.output import INTERRUPTED, UserError, console, errors
from common.config import ScenarioError


def _load(config: str | None, rounds: int | None, engine: str | None, resume: Path | None):
    from server.resume import ResumeError
    from simulations.runner import load_run_scenario
    from simulations.scenario import load_scenario

    if resume is not None and (config or rounds):
        raise UserError("--resume continues the run's own scenario; drop --config and --rounds")
    try:
        scenario = load_run_scenario(resume) if resume else load_scenario(config)
    except ResumeError as error:
        raise UserError(f"--resume {resume}: {error}") from None
    if rounds is not None:
        scenario = scenario.with_overrides(federation={"num_rounds": rounds})
    if engine is not None and resume is None:  # a resumed run keeps its scenario (and digest)
        scenario = scenario.with_overrides(federation={"engine": engine})
    return scenario


def run_simulate(*, config: str | None, out: Path, rounds: int | None, engine: str | None, baseline: bool | None,
                 resume: Path | None) -> None:
    from simulations.runner import new_run_dir
    from simulations.study import has_saved_round, preflight, run_study, wants_baseline

    scenario = _load(config, rounds, engine, resume)
    preflight(scenario)  # before any folder exists: a bad hospital stops here
    with_baseline = wants_baseline(scenario) if baseline is None else baseline
    run_dir = resume or new_run_dir(out, scenario)
    console.print(f"scenario [bold]{scenario.name}[/bold]: {len(scenario.data.sites)} hospitals, objective "
                  f"{scenario.training.objective}{' and FedAvg-ERM' if with_baseline else ''}, "
                  f"{scenario.federation.num_rounds} rounds, engine {scenario.federation.engine} -> {run_dir}")
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            result = run_study(scenario, run_dir, baseline=with_baseline, resume=resume is not None,
                               on_round=_progress(progress, scenario.federation.num_rounds))
    except KeyboardInterrupt:
        if has_saved_round(run_dir):
            errors.print(f"interrupted; rounds done so far are kept in {run_dir}; continue with: "
                         f"causalfed simulate --resume {run_dir}", markup=False)
        else:
            if resume is None:
                shutil.rmtree(run_dir, ignore_errors=True)
            errors.print("interrupted before any round finished; nothing was kept", markup=False)
        raise SystemExit(INTERRUPTED) from None
    except ScenarioError:
        raise
    except Exception as error:  # noqa: BLE001 - a failed federation: what happened, where the log is
        log = run_dir / "error.log"
        log.write_text("".join(traceback.format_exception(type(error), error, error.__traceback__)))
        hint = (f"; continue with: causalfed simulate --resume {run_dir}" if has_saved_round(run_dir)
                else "; no round finished, so there is nothing to resume")
        errors.print(f"federation failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}; full log: {log}"
                     f"{hint}", markup=False)
        raise SystemExit(1) from None
    _finish(run_dir, scenario, result)


def _progress(progress: Progress, total: int):
    def for_run(label: str):
        task = progress.add_task(f"{label}: starting", total=total)

        def on_round(server_round: int, sites: dict) -> None:
            heldout = [m["test-auroc"] for m in sites.values() if m.get("role") == "heldout" and "test-auroc" in m]
            text = f"{label}: round {server_round}"
            if heldout:
                text += f", held-out AUROC {sum(heldout) / len(heldout):.3f}"
            progress.update(task, completed=server_round, description=text)

        return on_round

    return for_run


def _finish(run_dir: Path, scenario, result) -> None:
    from common.provenance.log import PROVENANCE_DIR
    from common.provenance.verify import verify_log
    from simulations.report import write_report
    from simulations.selection import summarise_run
    from simulations.verdict import method_result, reverses_a_shortcut, verdict_lines

    results = [method_result(scenario.training.objective, result.history)]
    if result.baseline is not None:
        results.append(method_result("FedAvg-ERM", result.baseline))
    console.print("[bold]verdict[/bold]")
    for line in verdict_lines(results, reversed_shortcut=reverses_a_shortcut(scenario)):
        console.print(f"  {line}")
    report = write_report(run_dir, result.history, scenario, result.baseline)
    status = verify_log(run_dir / PROVENANCE_DIR)
    console.print(f"provenance log: {status.records} records, "
                  + ("[green]verified[/green]" if status.ok else "[red]" + "; ".join(status.summary()) + "[/red]"))
    summary = summarise_run(result.history, warmup_rounds=int(result.history["meta"].get("warmup-rounds", 0)))
    table = Table(title=f"{scenario.training.objective}: AUROC by round choice")
    for column in ("model", "round", "i.i.d.", "held-out", "worst training site"):
        table.add_column(column)
    for label, row in summary.items():
        table.add_row(label, str(row["round"]), f"{row['iid-auroc']:.3f}", f"{row['ood-auroc']:.3f}",
                      f"{row['worst-train-site-auroc']:.3f}")
    console.print(table)
    console.print(f"report: {report}")
