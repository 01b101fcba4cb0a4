"""Benchmark: held-out reversed-site AUROC of FedAvg-ERM, FedAvg-IRM and an oracle.

The oracle trains the same federation on hospitals whose confounders are independent of
the label (no shortcut to learn). Every method is selected on the training hospitals'
validation data only; the held-out hospital is never consulted before it is scored.

    python benchmarks/shortcut_benchmark.py [--seeds 0 1 2] [--config FILE] [--engine ray]

Prints one row per (method, seed) and a summary with the issue's targets.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from simulations.scenario import SimulationScenario as Scenario, load_scenario
from simulations.runner import run_scenario
from simulations.selection import summarise_run

DEFAULT_CRITERION = "selected by val-objective"


def methods(scenario: Scenario) -> dict[str, Scenario]:
    """The three contestants, all with the scenario's data, rounds and local recipe."""
    irm = scenario if scenario.training.objective == "irm" else scenario.with_overrides(training={"objective": "irm"})
    erm = scenario.with_overrides(training={"objective": "erm", "objective_params": {}})
    return {"FedAvg-ERM": erm, "FedAvg-IRM": irm, "oracle (no shortcut)": erm.without_shortcuts()}


def _fmt(values: list[float]) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "n/a"
    return f"{np.mean(finite):.3f} ± {np.std(finite):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="scenario TOML or built-in name (default: default)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--engine", choices=["inprocess", "ray"], default="inprocess")
    args = parser.parse_args()

    base = load_scenario(args.config)
    if args.rounds:
        base = base.with_overrides(federation={"num_rounds": args.rounds})
    results: dict[str, dict[str, list[float]]] = {}
    header = f"{'method':<22}{'seed':>5}{'round':>7}{'iid':>8}{'ood sel':>9}{'ood by-auroc':>13}{'ood final':>11}{'secs':>7}"
    print(header)
    print("-" * len(header))
    for seed in args.seeds:
        for name, scenario in methods(base.with_overrides(seed=seed)).items():
            started = time.monotonic()
            history = run_scenario(scenario, engine=args.engine)
            summary = summarise_run(history, warmup_rounds=history["meta"]["warmup-rounds"])
            chosen, by_auroc, final = summary[DEFAULT_CRITERION], summary["selected by val-auroc"], summary["final"]
            row = results.setdefault(name, {"iid": [], "ood": [], "ood-auroc-sel": [], "ood-final": []})
            row["iid"].append(chosen["iid-auroc"])
            row["ood"].append(chosen["ood-auroc"])
            row["ood-auroc-sel"].append(by_auroc["ood-auroc"])
            row["ood-final"].append(final["ood-auroc"])
            print(
                f"{name:<22}{seed:>5}{chosen['round']:>7}{chosen['iid-auroc']:>8.3f}{chosen['ood-auroc']:>9.3f}"
                f"{by_auroc['ood-auroc']:>13.3f}{final['ood-auroc']:>11.3f}{time.monotonic() - started:>7.1f}",
                flush=True,
            )
    print()
    print(f"summary over seeds {args.seeds} (mean ± sd); 'ood' = held-out reversed-site AUROC")
    print(f"{'method':<22}{'iid':>16}{'ood (val-objective)':>22}{'ood (val-auroc)':>18}{'ood (final)':>16}")
    for name, row in results.items():
        print(f"{name:<22}{_fmt(row['iid']):>16}{_fmt(row['ood']):>22}{_fmt(row['ood-auroc-sel']):>18}{_fmt(row['ood-final']):>16}")
    irm, erm, oracle = (float(np.nanmean(results[m]["ood"])) for m in ("FedAvg-IRM", "FedAvg-ERM", "oracle (no shortcut)"))
    ratio = irm / oracle if oracle > 0 else math.nan
    print()
    print(f"target IRM >= 0.85 x oracle: IRM/oracle = {ratio:.2f} -> {'met' if ratio >= 0.85 else 'NOT met'}")
    print(f"target IRM clearly above ERM: IRM - ERM = {irm - erm:+.3f} -> {'met' if irm - erm >= 0.1 else 'NOT met'}")


if __name__ == "__main__":
    main()
