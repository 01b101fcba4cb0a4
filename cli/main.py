"""The ``causalfed`` command line.

Every user error is one line (a bad scenario: one line per problem) naming the file or
option, with exit code 2; an interrupted run says how to continue it; an unexpected error
says where its full log is. No traceback is ever printed, so no secret (a key file's
contents, say) can reach the terminal through one.
"""

from __future__ import annotations

import sys
import traceback
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Optional

import click
import typer

from cli import analysis, logs
from cli.output import INTERRUPTED, USER_ERROR, UserError, console, errors
from common.config import ScenarioError, builtin_description, builtin_scenarios

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated causal learning for hospitals.")
LOG_FOLDER = Path("runs") / ".logs"


class Engine(str, Enum):
    ray = "ray"
    inprocess = "inprocess"


def fail(message: str) -> None:
    raise UserError(message)


@cli.command()
def simulate(
    config: Optional[str] = typer.Option(
        None, "--config", "-c", help="scenario: a TOML file, or a built-in name (`causalfed scenarios`) [default: default]"),
    out: Path = typer.Option(Path("runs"), "--out", help="folder that receives the run folder"),
    rounds: Optional[int] = typer.Option(None, "--rounds", min=1, help="override the scenario's number of rounds"),
    engine: Optional[Engine] = typer.Option(
        None, "--engine", help="'ray': Flower's simulation engine; 'inprocess': the same apps without Ray "
        "[default: the scenario's]"),
    baseline: Optional[bool] = typer.Option(
        None, "--baseline/--no-baseline", help="also run FedAvg-ERM on the same hospitals, for the verdict "
        "[default: on unless the scenario's objective is ERM]"),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="continue an interrupted run in this run folder from its last completed round"),
) -> None:
    """Run a multi-hospital federation; print and write the verdict, metrics and report."""
    from cli.simulate import run_simulate

    run_simulate(config=config, out=out, rounds=rounds, engine=engine.value if engine else None, baseline=baseline,
                 resume=resume)


@cli.command()
def scenarios() -> None:
    """List the built-in scenarios and what each shows."""
    from rich.markup import escape

    for name in builtin_scenarios():
        console.print(f"[bold]{name}[/bold]: {escape(builtin_description(name))}")


@cli.command("check-data")
def check_data(
    site_file: Path = typer.Argument(..., help="a hospital's .npz (docs/site-data.md)"),
) -> None:
    """Check a hospital's data file as the federation will before it starts."""
    from common.data import SiteData, SiteDataError

    try:
        site = SiteData.load(site_file)
    except SiteDataError as error:
        fail(str(error))
    parts = ", ".join(f"{name} {len(site.split(name))} ({int(site.split(name).labels.sum())} positive)"
                      for name in ("train", "val", "test"))
    recorded = sorted(site.train.recorded) or "none"
    console.print(f"{site_file}: hospital {site.name!r} ({site.role}), inputs {site.train.input_shape}; {parts}; "
                  f"recorded per case: {recorded}")


@cli.command("export-sites")
def export_sites(
    out: Path = typer.Argument(..., help="folder receiving one <site>.npz per hospital"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="scenario file or built-in name [default: default]"),
) -> None:
    """Write each simulated hospital's data to its own file, as a deployed SuperNode mounts it."""
    from simulations.datasets import build_site
    from simulations.scenario import load_scenario

    scenario = load_scenario(config)
    for index, site in enumerate(scenario.data.sites):
        path = out / f"{site.name}.npz"
        build_site(scenario, index).save(path)
        console.print(f"{site.name} ({site.role}) -> {path}")


@cli.command()
def certs(
    out: Path = typer.Argument(..., help="folder receiving the CA, SuperLink and hospital keys"),
    hospital: list[str] = typer.Option(..., "--hospital", "-H", help="a hospital name (repeat for each)"),
    host: list[str] = typer.Option(
        ["localhost", "127.0.0.1"], "--host", help="a name or IP the SuperLink is reached at (repeat)"),
    days: int = typer.Option(365, "--days", min=1, help="certificate validity in days"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the keys already in OUT"),
) -> None:
    """Generate TLS certificates and SuperNode authentication keys for a deployment."""
    from common.certs import CertificateError, generate_deployment_keys

    try:
        keys = generate_deployment_keys(out, hospitals=hospital, server_hosts=host, days=days, overwrite=overwrite)
    except CertificateError as error:
        fail(str(error))
    console.print(f"CA: {keys.ca_certificate} (keep {out / 'ca.key'} offline)")
    console.print(f"SuperLink TLS: {keys.server_certificate}; provenance signing key: {keys.provenance_key}")
    for name in hospital:
        console.print(f"{name}: give {keys.hospital_dir(name)}/ to the hospital; register its key with\n"
                      f"  flwr supernode register {keys.node_public_key(name)} <superlink> --name {name}")


cli.add_typer(logs.log_cli, name="log")
analysis.register(cli)


def _write_crash_log(error: BaseException) -> Path:
    """The full traceback (no local variables) in a log file; returns its path."""
    LOG_FOLDER.mkdir(parents=True, exist_ok=True)
    path = LOG_FOLDER / f"causalfed-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}.log"
    path.write_text("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    return path


def _command(argv: list[str] | None) -> str:
    words = [w for w in (argv if argv is not None else sys.argv[1:]) if not w.startswith("-")]
    return " ".join(words[:2]) if words[:1] == ["log"] else (words[0] if words else "")


def main(argv: list[str] | None = None) -> None:
    command = typer.main.get_command(cli)
    try:
        code = command.main(args=argv, prog_name="causalfed", standalone_mode=False)
    except click.exceptions.MissingParameter as error:
        errors.print(f"error: {error.format_message()} (see: causalfed {_command(argv)} --help)", markup=False)
        sys.exit(USER_ERROR)
    except click.exceptions.BadParameter as error:
        hint = error.param_hint or (error.param.opts[0] if error.param is not None and error.param.opts else "")
        hint = hint if isinstance(hint, str) else " / ".join(hint)
        errors.print(f"error: invalid option {hint.strip(chr(39))}: {error.message}", markup=False)
        sys.exit(USER_ERROR)
    except click.exceptions.UsageError as error:
        errors.print(f"error: {error.format_message()} (see: causalfed {_command(argv)} --help)", markup=False)
        sys.exit(USER_ERROR)
    except click.exceptions.Abort:
        errors.print("interrupted", markup=False)
        sys.exit(INTERRUPTED)
    except (UserError, ScenarioError) as error:
        errors.print(f"error: {error}", markup=False)
        sys.exit(USER_ERROR)
    except KeyboardInterrupt:
        errors.print("interrupted", markup=False)
        sys.exit(INTERRUPTED)
    except Exception as error:  # noqa: BLE001 - the one place that turns a bug into a message and a log
        errors.print(f"unexpected error: {type(error).__name__}; full log: {_write_crash_log(error)}", markup=False)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
