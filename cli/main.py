"""The ``causalfed`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.config import ScenarioError, builtin_scenarios
from simulations.scenario import load_scenario
from common.feature_shift import SMALL_EFFECT
from common.provenance.log import HOSPITALS_DIR, PROVENANCE_DIR

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
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="continue a crashed run in this run folder from its last completed round"
    ),
) -> None:
    """Run a full local multi-site federation and write metrics.json and report.html."""
    from server.resume import ResumeError
    from simulations.report import write_report
    from simulations.runner import load_run_scenario, new_run_dir, run_scenario

    if resume is not None and (config or rounds):
        console.print("[red]error:[/red] --resume continues the run's own scenario; drop --config/--rounds")
        raise typer.Exit(2)
    try:
        scenario = load_run_scenario(resume) if resume else load_scenario(config)
        if rounds is not None:
            scenario = scenario.with_overrides(federation={"num_rounds": rounds})
        if engine is not None and resume is None:  # a resumed run keeps its scenario (and digest)
            scenario = scenario.with_overrides(federation={"engine": engine})
    except (ScenarioError, ResumeError, ValueError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    run_dir = resume or new_run_dir(out, scenario)
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
            history = run_scenario(
                scenario, run_dir=run_dir, on_round=on_round, resume=resume is not None, engine=engine
            )
        except ResumeError as error:
            console.print(f"[red]cannot resume:[/red] {error}")
            raise typer.Exit(2) from None
        except Exception as error:  # noqa: BLE001 - tell the user plainly, keep what was written
            console.print(
                f"[red]federation failed:[/red] {error}\n(partial results in {run_dir}; "
                f"continue with: causalfed simulate --resume {run_dir})"
            )
            raise typer.Exit(1) from None
    report = write_report(run_dir, history, scenario)
    from common.provenance.verify import verify_log

    log_status = verify_log(run_dir / PROVENANCE_DIR)
    console.print(f"provenance log: {log_status.records} records, "
                  + ("[green]verified[/green]" if log_status.ok else f"[red]{log_status.problems}[/red]"))
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
        table.add_row(label.replace("selected by ", "best "), str(row["round"]), f"{row['iid-auroc']:.3f}", f"{row['ood-auroc']:.3f}",
                      f"{row['worst-train-site-auroc']:.3f}")
    console.print(table)


@cli.command()
def certs(
    out: Path = typer.Argument(..., help="folder receiving the CA, SuperLink and hospital keys"),
    hospital: list[str] = typer.Option(..., "--hospital", "-H", help="a hospital name (repeat for each)"),
    host: list[str] = typer.Option(
        ["localhost", "127.0.0.1"], "--host", help="a name or IP the SuperLink is reached at (repeat)"
    ),
    days: int = typer.Option(365, "--days", min=1, help="certificate validity"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the keys already in OUT"),
) -> None:
    """Generate TLS certificates and SuperNode authentication keys for a deployment."""
    from common.certs import CertificateError, generate_deployment_keys

    try:
        keys = generate_deployment_keys(out, hospitals=hospital, server_hosts=host, days=days, overwrite=overwrite)
    except CertificateError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    console.print(f"CA: {keys.ca_certificate} (keep {out / 'ca.key'} offline)")
    console.print(f"SuperLink TLS: {keys.server_certificate}; provenance signing key: {keys.provenance_key}")
    for name in hospital:
        console.print(f"{name}: give {keys.hospital_dir(name)}/ to the hospital; register its key with\n"
                      f"  flwr supernode register {keys.node_public_key(name)} <superlink> --name {name}")


@cli.command()
def explain(
    run_dir: Path = typer.Argument(..., help="a run folder written by `causalfed simulate`"),
    site: str = typer.Option(..., "--site", "-s", help="the hospital whose performance changed"),
) -> None:
    """Attribute a hospital's performance change to prevalence, acquisition and annotation shifts."""
    import json

    import torch

    from client.models import model_for_state
    from common.files import atomic_write_text
    from server.explain import MECHANISMS, explain_drop
    from server.resume import ResumeError
    from simulations.datasets import build_site, input_shape
    from simulations.runner import load_run_scenario

    try:
        scenario = load_run_scenario(run_dir)
        if not (run_dir / "model.pt").is_file():
            raise ResumeError(f"{run_dir} has no model.pt: the run did not finish")
    except ResumeError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    names = [s.name for s in scenario.data.sites]
    if site not in names:
        console.print(f"[red]error:[/red] no hospital {site!r} in this run; hospitals: {names}")
        raise typer.Exit(2)
    model = model_for_state(torch.load(run_dir / "model.pt"), input_shape=input_shape(scenario.data))
    hospitals = [build_site(scenario, i) for i in range(len(names))]
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


@cli.command()
def adapt(
    model_path: Path = typer.Argument(..., help="the global model (model.pt of a run)"),
    site_file: Path = typer.Argument(..., help="the new hospital's .npz (only its images are used)"),
    out: Path = typer.Option(..., "--out", "-o", help="where to write the adapted model"),
    source_prevalence: float = typer.Option(0.5, "--source-prevalence", min=0.01, max=0.99,
                                            help="the federation's prevalence the model is calibrated to"),
    epochs: int = typer.Option(10, "--epochs", min=1),
    reference: Optional[Path] = typer.Option(
        None, "--reference", help="the federation's feature moments [default: feature-moments.json beside the model]"),
    min_shift: float = typer.Option(SMALL_EFFECT, "--min-shift", min=0.0,
                                    help="adapt only if the features moved at least this far (mean standardised difference)"),
    always: bool = typer.Option(False, "--always", help="adapt without checking the shift"),
) -> None:
    """Adapt the global model to a new hospital's unlabeled images (head frozen)."""
    import numpy as np
    import torch

    from client.adapt import onboard
    from client.models import model_for_state
    from client.task import evaluate
    from common.data import SiteData

    try:
        site = SiteData.load(site_file)
        state = torch.load(model_path)
        moments = None if always else _adapt_reference(model_path, reference)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    model = model_for_state(state, input_shape=site.train.input_shape)
    images = np.concatenate([site.train.images, site.val.images, site.test.images])
    before = evaluate(model, site.test)["auroc"] if len(set(site.test.labels)) == 2 else None
    if moments is None and not always:
        console.print("[yellow]no federation feature moments beside the model: adapting without the shift check[/yellow]")
    try:
        result = onboard(model, images, reference=moments, min_shift=min_shift,
                         source_prevalence=source_prevalence, epochs=epochs)
    except ValueError as error:  # e.g. moments of another model
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    torch.save(model.state_dict(), out)
    if result.shift is not None:
        console.print(f"feature shift from the federation: {result.shift:.3f} (adapt at >= {min_shift:g})")
    if not result.adapted:
        console.print(f"left unchanged: the model sees these images as it saw the federation's; model copied to {out}")
    else:
        console.print(f"estimated prevalence {result.prevalence_estimate:.3f}; mean prediction entropy "
                      f"{result.mean_entropy_before:.3f} -> {result.mean_entropy_after:.3f}; adapted model: {out}")
    if before is not None:  # labels, if the file has them, only score the result
        console.print(f"test AUROC (labels used for scoring only): {before:.3f} -> {evaluate(model, site.test)['auroc']:.3f}")


def _adapt_reference(model_path: Path, explicit: Path | None):
    """The federation's feature moments: the given file (which must exist) or the run's own."""
    from common.feature_shift import FEATURE_MOMENTS_FILE, FeatureMoments

    if explicit is not None:
        if not explicit.is_file():
            raise FileNotFoundError(f"feature moments not found: {explicit}")
        return FeatureMoments.load(explicit)
    beside = model_path.with_name(FEATURE_MOMENTS_FILE)
    return FeatureMoments.load(beside) if beside.is_file() else None


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


log_cli = typer.Typer(no_args_is_help=True, help="Check a run's tamper-evident provenance log.")
cli.add_typer(log_cli, name="log")


def _provenance_folder(run: Path) -> Path:
    folder = run / PROVENANCE_DIR if (run / PROVENANCE_DIR).is_dir() else run
    if not (folder / "log.jsonl").exists():
        console.print(f"[red]error:[/red] no provenance log in {run}")
        raise typer.Exit(2)
    return folder


@log_cli.command("verify")
def log_verify(
    run: Path = typer.Argument(..., help="run folder (or its provenance/ folder)"),
    public_key: Optional[Path] = typer.Option(None, "--public-key", help="pinned server key (PEM); default: the log's own"),
    hospitals: Optional[Path] = typer.Option(
        None, "--hospitals", help="folder of <hospital>/checkpoints.jsonl kept by hospitals (default: RUN/hospitals)"
    ),
) -> None:
    """Check hash chain, canonical form, signatures, and the checkpoints hospitals kept."""
    from common.provenance.records import load_public_key
    from common.provenance.verify import read_kept_checkpoints, verify_log

    folder = _provenance_folder(run)
    kept = read_kept_checkpoints(hospitals or run / HOSPITALS_DIR)
    key = load_public_key(public_key.read_bytes()) if public_key else None
    report = verify_log(folder, public_key=key, hospital_checkpoints=kept)
    console.print(f"{report.records} records, {report.checkpoints} signed checkpoints, "
                  f"{sum(len(v) for v in kept.values())} checkpoints kept by {len(kept)} hospitals")
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    for problem in report.problems:
        console.print(f"[red]TAMPERED:[/red] {problem}")
    if not report.ok:
        raise typer.Exit(1)
    console.print("[green]log verified[/green]")


@log_cli.command("prove")
def log_prove(
    run: Path = typer.Argument(..., help="run folder"),
    server_round: int = typer.Option(..., "--round", min=1, help="the round whose record to prove"),
    tree_size: Optional[int] = typer.Option(None, "--tree-size", help="prove against this checkpoint size"),
) -> None:
    """Print an inclusion proof (JSON) of one round's record, for a hospital to check."""
    import json

    from common.provenance.verify import prove_round

    try:
        proof = prove_round(_provenance_folder(run), server_round=server_round, tree_size=tree_size)
    except ValueError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    print(json.dumps(proof, indent=1))


@log_cli.command("check-proof")
def log_check_proof(
    proof_file: Path = typer.Argument(..., help="JSON printed by `causalfed log prove`"),
    checkpoints: Path = typer.Option(..., "--checkpoints", help="the hospital's own checkpoints.jsonl"),
    public_key: Path = typer.Option(..., "--public-key", help="the server key the hospital pinned (PEM)"),
) -> None:
    """What a hospital runs: does its own checkpoint vouch for the proven record?"""
    import json

    from common.provenance.merkle import ProofError
    from common.provenance.records import load_public_key
    from common.provenance.verify import check_proof, read_checkpoints

    proof = json.loads(proof_file.read_text())
    kept = {cp.tree_size: cp for cp in read_checkpoints(checkpoints)}
    checkpoint = kept.get(proof["tree_size"])
    if checkpoint is None:
        console.print(f"[red]no kept checkpoint of size {proof['tree_size']}[/red]; kept sizes: {sorted(kept)}")
        raise typer.Exit(1)
    try:
        check_proof(proof, checkpoint, load_public_key(public_key.read_bytes()))
    except ProofError as error:
        console.print(f"[red]proof rejected:[/red] {error}")
        raise typer.Exit(1) from None
    console.print(f"[green]record {proof['leaf_index']} is in the log the hospital's checkpoint "
                  f"(size {checkpoint.tree_size}) commits to[/green]")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
