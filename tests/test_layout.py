"""The package graph: common/ is the bottom layer and imports nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ABOVE_COMMON = ("client", "server", "simulations", "cli", "benchmarks")


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_common_imports_nothing_above_it():
    offenders = {}
    for path in sorted((REPO / "common").rglob("*.py")):
        upward = _imported_packages(path) & set(ABOVE_COMMON)
        if upward:
            offenders[str(path.relative_to(REPO))] = sorted(upward)
    assert not offenders, f"common/ must not import from {ABOVE_COMMON}: {offenders}"


def test_client_and_server_do_not_import_simulations_or_the_cli():
    offenders = {}
    for package in ("client", "server"):
        for path in sorted((REPO / package).rglob("*.py")):
            upward = _imported_packages(path) & {"simulations", "cli", "benchmarks"}
            if upward:
                offenders[str(path.relative_to(REPO))] = sorted(upward)
    assert not offenders, offenders


def test_the_loopback_deployment_lives_with_the_tests_that_use_it():
    assert not (REPO / "simulations" / "loopback.py").exists()
    assert (REPO / "tests" / "loopback.py").is_file()
