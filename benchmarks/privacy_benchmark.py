"""Benchmark: privacy-utility of DP-SGD (Opacus) and its training overhead.

Every training hospital runs DP-SGD with noise calibrated so the whole federation spends
the target epsilon (delta 1e-5); "none" is the same federation without DP. FedAvg-ERM
(DP needs a per-example loss) on the default scenario, rounds chosen on training-site
validation only, as in the shortcut benchmark.

    python benchmarks/privacy_benchmark.py [--epsilons 1 3 8] [--seeds 0 1 2] [--rounds 20]

Prints the DP-SGD overhead on one local round (timed interleaved with plain training),
then one row per (epsilon, seed) and a summary: i.i.d. and held-out AUROC, the epsilon
each hospital actually spent (from its ledger), and wall seconds per federated round.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from simulations.scenario import SimulationScenario as Scenario, load_scenario
from simulations.runner import run_scenario
from simulations.selection import summarise_run


def private(scenario: Scenario, epsilon: float | None) -> Scenario:
    training = {"objective": "erm", "objective_params": {}}
    training["privacy"] = None if epsilon is None else {"target_epsilon": epsilon}
    return scenario.with_overrides(training=training)


def spent_epsilon(history: dict) -> float:
    last = history["rounds"][-1]["sites"]
    values = [m["train-dp-epsilon"] for m in last.values() if "train-dp-epsilon" in m]
    return max(values) if values else float("inf")


def local_round_seconds(scenario: Scenario, *, repetitions: int) -> tuple[float, float]:
    """Median seconds of one local round at the first hospital, without and with DP-SGD.

    The two are interleaved, so a busy machine slows both alike.
    """
    from client.objectives import build_objective
    from client.privacy import DPSettings, PrivacyLedger, train_privately
    from client.task import new_model, train_locally
    from simulations.datasets import build_site

    site = build_site(scenario, 0)
    training = scenario.training
    options = {"epochs": training.local_epochs, "batch_size": training.batch_size,
               "learning_rate": training.learning_rate, "weight_decay": 0.0, "seed": 0}
    objective = build_objective("erm", {}, server_round=1)
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, budget=float("inf"))
    plain, private = [], []
    for _ in range(repetitions):
        started = time.perf_counter()
        train_locally(new_model(seed=0), site.train, objective, **options)
        plain.append(time.perf_counter() - started)
        started = time.perf_counter()
        train_privately(new_model(seed=0), site.train, objective, settings, PrivacyLedger(), **options)
        private.append(time.perf_counter() - started)
    return float(np.median(plain)), float(np.median(private))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--repetitions", type=int, default=5, help="for the overhead timing")
    parser.add_argument("--overhead-only", action="store_true")
    args = parser.parse_args()

    base = load_scenario(args.config)
    if args.rounds:
        base = base.with_overrides(federation={"num_rounds": args.rounds})
    plain, private_s = local_round_seconds(base, repetitions=args.repetitions)
    print(f"one local round at {base.data.sites[0].name} (median of {args.repetitions}, interleaved): "
          f"{plain:.2f} s plain, {private_s:.2f} s DP-SGD -> overhead {private_s / plain:.2f}x")
    if args.overhead_only:
        return
    settings: list[float | None] = [*args.epsilons, None]
    rows: dict[str, dict[str, list[float]]] = {}
    print(f"{'epsilon':>8}{'seed':>6}{'round':>7}{'iid':>8}{'ood':>8}{'eps spent':>11}{'s/round':>9}")
    for seed in args.seeds:
        for epsilon in settings:
            label = "none" if epsilon is None else f"{epsilon:g}"
            started = time.monotonic()
            history = run_scenario(private(base.with_overrides(seed=seed), epsilon), engine="inprocess")
            per_round = (time.monotonic() - started) / len(history["rounds"])
            chosen = summarise_run(history, warmup_rounds=0)["selected by val-objective"]
            spent = spent_epsilon(history)
            row = rows.setdefault(label, {"iid": [], "ood": [], "spent": [], "secs": []})
            for key, value in (("iid", chosen["iid-auroc"]), ("ood", chosen["ood-auroc"]), ("spent", spent), ("secs", per_round)):
                row[key].append(value)
            print(f"{label:>8}{seed:>6}{chosen['round']:>7}{chosen['iid-auroc']:>8.3f}{chosen['ood-auroc']:>8.3f}"
                  f"{spent:>11.3f}{per_round:>9.2f}", flush=True)
    print()
    print(f"summary over seeds {args.seeds} (mean ± sd)")
    print(f"{'epsilon':>8}{'iid AUROC':>16}{'ood AUROC':>16}{'max eps spent':>15}{'s/round':>9}{'overhead':>10}")
    baseline = float(np.mean(rows["none"]["secs"]))
    for label, row in rows.items():
        overhead = float(np.mean(row["secs"])) / baseline
        print(f"{label:>8}{np.mean(row['iid']):>9.3f} ± {np.std(row['iid']):.3f}{np.mean(row['ood']):>9.3f} ± {np.std(row['ood']):.3f}"
              f"{max(row['spent']):>15.3f}{np.mean(row['secs']):>9.2f}{overhead:>9.2f}x")


if __name__ == "__main__":
    main()
