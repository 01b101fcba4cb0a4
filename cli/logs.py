"""``causalfed log``: check a run's tamper-evident provenance log, and inclusion proofs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cli.output import UserError, console
from common.provenance.log import HOSPITALS_DIR, PROVENANCE_DIR

log_cli = typer.Typer(no_args_is_help=True, help="Check a run's tamper-evident provenance log.")


def _provenance_folder(run: Path) -> Path:
    folder = run / PROVENANCE_DIR if (run / PROVENANCE_DIR).is_dir() else run
    if not (folder / "log.jsonl").exists():
        raise UserError(f"no provenance log in {run} (expected {run / PROVENANCE_DIR / 'log.jsonl'})")
    return folder


def _public_key(path: Path, option: str):
    """An Ed25519 public key from a PEM file; a private key, or anything else, is refused
    without echoing a byte of it."""
    from common.provenance.records import load_public_key

    if not path.is_file():
        raise UserError(f"{option} {path}: file not found")
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        raise UserError(f"{option} {path}: this is a private key; give the public key (PEM) and keep this one secret")
    try:
        return load_public_key(data)
    except (ValueError, TypeError):
        raise UserError(f"{option} {path}: not an Ed25519 public key in PEM form") from None


@log_cli.command("verify")
def log_verify(
    run: Path = typer.Argument(..., help="run folder (or its provenance/ folder)"),
    public_key: Optional[Path] = typer.Option(
        None, "--public-key", help="the server's public key (PEM) to pin [default: the log's own]"),
    hospitals: Optional[Path] = typer.Option(
        None, "--hospitals", help="folder of <hospital>/checkpoints.jsonl kept by hospitals [default: RUN/hospitals]"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also print every line that fails, and why"),
) -> None:
    """Check hash chain, canonical form, signatures, and the checkpoints hospitals kept."""
    from common.provenance.verify import read_kept_checkpoints, verify_log

    folder = _provenance_folder(run)
    key = _public_key(public_key, "--public-key") if public_key else None
    kept = read_kept_checkpoints(hospitals or run / HOSPITALS_DIR)
    report = verify_log(folder, public_key=key, hospital_checkpoints=kept)
    for finding in report.summary():
        console.print(f"[red]TAMPERED:[/red] {finding}")
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    console.print(f"{report.records} records, {report.checkpoints} signed checkpoints, "
                  f"{sum(len(v) for v in kept.values())} checkpoints kept by {len(kept)} hospitals")
    if verbose:
        for problem in report.problems:
            console.print(f"  {problem}", markup=False)
    if not report.ok:
        if not verbose:
            console.print(f"({len(report.problems)} failing checks; --verbose lists them)")
        raise typer.Exit(1)
    console.print("[green]log verified[/green]")


@log_cli.command("prove")
def log_prove(
    run: Path = typer.Argument(..., help="run folder"),
    server_round: int = typer.Option(..., "--round", min=1, help="the round whose record to prove"),
    tree_size: Optional[int] = typer.Option(None, "--tree-size", help="prove against this checkpoint size [default: the latest]"),
) -> None:
    """Print an inclusion proof (JSON) of one round's record, for a hospital to check."""
    from common.provenance.verify import prove_round

    try:
        proof = prove_round(_provenance_folder(run), server_round=server_round, tree_size=tree_size)
    except ValueError as error:
        raise UserError(str(error)) from None
    print(json.dumps(proof, indent=1))


@log_cli.command("check-proof")
def log_check_proof(
    proof_file: Path = typer.Argument(..., help="JSON printed by `causalfed log prove`"),
    checkpoints: Path = typer.Option(..., "--checkpoints", help="the hospital's own checkpoints.jsonl"),
    public_key: Path = typer.Option(..., "--public-key", help="the server's public key the hospital pinned (PEM)"),
) -> None:
    """What a hospital runs: does its own checkpoint vouch for the proven record?"""
    from common.provenance.merkle import ProofError
    from common.provenance.verify import check_proof, read_checkpoints

    key = _public_key(public_key, "--public-key")
    try:
        proof = json.loads(proof_file.read_text())
        kept = {cp.tree_size: cp for cp in read_checkpoints(checkpoints)}
        size = proof["tree_size"]
    except FileNotFoundError as error:
        raise UserError(f"{error.filename}: file not found") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{proof_file}: not a proof printed by `causalfed log prove`") from None
    checkpoint = kept.get(size)
    if checkpoint is None:
        console.print(f"[red]no kept checkpoint of size {size}[/red]; kept sizes: {sorted(kept)}")
        raise typer.Exit(1)
    try:
        check_proof(proof, checkpoint, key)
    except (ProofError, KeyError, ValueError) as error:
        console.print(f"[red]proof rejected:[/red] {error}")
        raise typer.Exit(1) from None
    console.print(f"[green]record {proof['leaf_index']} is in the log the hospital's checkpoint "
                  f"(size {checkpoint.tree_size}) commits to[/green]")
