"""Probe: why the guard flags whom it flags, round by round, in chosen rows of the guard benchmark.

Runs the guard federation of ``guard_benchmark.py`` (same scenario, seed, false discovery
rate and attackers, ``attackers_of``; 6 rounds by default, as in ``RESULTS.md``) for each
``attack:count`` given, and prints every round: whom it flagged, and for each attacker and
each honest hospital flagged or down-weighted, the detectors whose p-value is under
``--show-p``. TPR and FPR are the benchmark's. ``--out`` keeps every round's anomaly report
(JSON lines) for a closer look.

    python benchmarks/guard_probe.py --seed 7 alie:3 min-max:3 [--rounds 6] [--fdr 0.01] [--out reports.jsonl]
    python benchmarks/guard_probe.py --seed 2 none:0        # the attack-free run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # guard_benchmark, a sibling script

from guard_benchmark import attackers_of, configure, detection, guard_base  # noqa: E402

from common.config import Scenario  # noqa: E402
from simulations.attacks import ATTACKS  # noqa: E402
from simulations.runner import run_scenario  # noqa: E402


def parse_row(text: str) -> tuple[str | None, int]:
    """``attack:count`` -> (attack, count); ``none:0`` is the attack-free run."""
    attack, _, count = text.partition(":")
    if not count.isdigit() or (attack == "none") != (int(count) == 0):
        raise argparse.ArgumentTypeError(f"expected ATTACK:COUNT (or none:0), got {text!r}")
    if attack != "none" and attack not in ATTACKS:
        raise argparse.ArgumentTypeError(f"unknown attack {attack!r}; registered: {', '.join(sorted(ATTACKS))}")
    return (None if attack == "none" else attack), int(count)


def client_line(verdict: dict, *, attacker: bool, show_p: float) -> str:
    """One client's verdict: its weight, combined p and the detectors under ``show_p``."""
    small = sorted(((p, name) for name, p in verdict["p_values"].items() if p < show_p))
    evidence = " ".join(f"{name}={p:.2g}" for p, name in small)
    mark = "attacker" if attacker else ("FALSE +" if verdict["flagged"] else "honest")
    return f"  {mark:<9}{verdict['client']:<14}weight {verdict['weight']:.1f}  p {1 - verdict['confidence']:.2g}  {evidence}"


def round_lines(report: dict, attackers: list[str], *, show_p: float) -> list[str]:
    """A round's report as text: attackers always, honest hospitals if flagged or down-weighted."""
    lines = [f"round {report['round']}: flagged {', '.join(report['flagged']) or 'nobody'}"]
    for verdict in report["verdicts"]:
        attacker = verdict["client"] in attackers
        if attacker or verdict["weight"] < 1.0:
            lines.append(client_line(verdict, attacker=attacker, show_p=show_p))
    return lines


def probe(base: Scenario, attack: str | None, count: int, *, show_p: float, out: Path | None) -> None:
    names = [s.name for s in base.data.sites if s.role == "train"]
    if count >= len(names):
        raise SystemExit(f"{count} attackers leave no honest hospital (of {len(names)})")
    attackers = attackers_of(names, count)
    scenario = configure(base, "guard", attack, attackers)
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder)
        run_scenario(scenario, run_dir=run_dir)
        reports = [json.loads(p.read_text()) for p in sorted((run_dir / "anomalies").glob("round-*.json"))]
        rates = detection(run_dir, attackers)
    print(f"== {attack or 'no attack'} with {count} attackers ({', '.join(attackers) or '-'}): "
          f"TPR {rates['tpr']:.3f}  FPR {rates['fpr']:.3f}", flush=True)
    for report in reports:
        print("\n".join(round_lines(report, attackers, show_p=show_p)), flush=True)
    if out is not None:
        with out.open("a") as sink:
            for report in reports:
                sink.write(json.dumps({"attack": attack, "count": count, "attackers": attackers,
                                       "report": report}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="+", type=parse_row, metavar="ATTACK:COUNT")
    parser.add_argument("--seed", type=int, default=None, help="the scenario's seed (default: the scenario's)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--fdr", type=float, default=None, help="the guard's false-discovery rate (default: the scenario's)")
    parser.add_argument("--show-p", type=float, default=0.05, help="print detectors with a p-value under this")
    parser.add_argument("--out", type=Path, default=None, help="append every round's anomaly report here (JSON lines)")
    args = parser.parse_args()
    base = guard_base(rounds=args.rounds, seed=args.seed, fdr=args.fdr)
    for attack, count in args.rows:
        probe(base, attack, count, show_p=args.show_p, out=args.out)


if __name__ == "__main__":
    main()
