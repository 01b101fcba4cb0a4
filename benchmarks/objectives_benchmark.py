"""Benchmark (issue 35): every objective, tuned on declared worlds, then run on held-out ones.

Declared before any run. The defaults of ``subspace`` and ``strata-subspace``
(``client/subspace_objectives.py``: warm-up share 0.8, 3 directions, head speed-up 10) were
chosen on the tuning worlds only. For time (about 45 s a federation on two cores), the
tuning table runs those two and FedAvg-ERM, and the held-out run reported in RESULTS.md
runs ``REPORTED_HELDOUT``: the two baselines the targets name (FedAvg-ERM, FedBN), the
metadata method of the earlier benchmark (backdoor over strata) and the two subspace
methods; any other method runs with ``--methods``.

- tuning worlds (seeds 0, 1, 2): ``confounded``, ``default``, ``denoising_only``, and two
  defined here: ``scanner_tuning`` (confounded's scanners, no shortcut) and
  ``prevalence_tuning`` (one scanner, no shortcut, training prevalence 0.2 to 0.8, held-out
  0.5);
- held-out worlds (seeds 3, 4, 5): ``confounded``, ``tag_only``, ``noise_only``,
  ``unrecorded_tag``, ``prevalence_only``, ``scanner_only``, ``weak_correlation``,
  ``pneumonia`` (real X-rays);
- metadata ablation (held-out seeds): ``confounded`` with each recorded confounder removed
  in turn, and with all removed, for the methods that read metadata.

Per run, at the round each training-site rule chooses (``val-auroc``: the best mean
validation AUROC of the training hospitals; ``val-objective``: the objective's own
validation value, after its warm-up) and at the final round: held-out AUROC, worst-site
AUROC (every hospital, held-out included), and the held-out hospital's decisions, calibrated
on the training hospitals' validation cases and taken at its estimated prevalence: accuracy,
balanced accuracy, sensitivity at 90% specificity, ECE (``common/calibration.py``).
Leave-one-site-out selection (four more federations per row) is not run: it would multiply
the benchmark's time by five.

    python benchmarks/objectives_benchmark.py --phase tuning
    python benchmarks/objectives_benchmark.py --phase heldout [--part worlds ablation]
    python benchmarks/objectives_benchmark.py --phase heldout --summary-only

Rows go to ``--out`` (JSONL) as they finish; a rerun skips rows already there.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from simulations.runner import run_scenario
from simulations.scenario import SimulationScenario, load_scenario
from simulations.selection import round_summary, select_round

METHODS: dict[str, dict] = {
    "FedAvg-ERM": {"objective": "erm", "objective_params": {}},
    "FedProx": {"objective": "fedprox", "objective_params": {"mu": 0.01}},
    "FedBN": {"objective": "fedbn", "objective_params": {}},
    "IRMv1": {"objective": "irm", "objective_params": {"penalty_weight": 1000.0, "warmup_rounds": 3}},
    "V-REx": {"objective": "vrex", "objective_params": {}},
    "Fishr": {"objective": "fishr", "objective_params": {}},
    "prototype alignment": {"objective": "prototype", "objective_params": {}},
    "backdoor (strata)": {"objective": "backdoor-strata", "objective_params": {}},
    "backdoor (style)": {"objective": "backdoor-style", "objective_params": {}},
    "backdoor (strata) + V-REx": {"objective": "backdoor-strata-vrex", "objective_params": {}},
    "subspace": {"objective": "subspace", "objective_params": {}},
    "strata-subspace": {"objective": "strata-subspace", "objective_params": {}},
}
REPORTED_HELDOUT = ("FedAvg-ERM", "FedBN", "backdoor (strata)", "subspace", "strata-subspace")
METADATA_METHODS = ("backdoor (strata)", "backdoor (strata) + V-REx", "strata-subspace")
NO_METADATA = "subspace"
TUNING = {"confounded": (0, 1, 2), "default": (0, 1, 2), "denoising_only": (0, 1, 2), "scanner_tuning": (0, 1, 2),
          "prevalence_tuning": (0, 1, 2)}
HELDOUT = {world: (3, 4, 5) for world in ("confounded", "tag_only", "noise_only", "unrecorded_tag", "prevalence_only",
                                          "scanner_only", "weak_correlation", "pneumonia")}
RULES = ("val-auroc", "val-objective", "final")
REPORTED = ("ood-auroc", "worst-site-auroc", "iid-auroc", "ood-accuracy", "ood-balanced-accuracy",
            "ood-sensitivity-at-90-specificity", "ood-ece", "ood-prevalence-used")


def world(name: str, seed: int) -> SimulationScenario:
    """A built-in scenario, or one of the two tuning worlds defined here."""
    if name not in ("scanner_tuning", "prevalence_tuning"):
        return load_scenario(name).with_overrides(seed=seed)
    raw = load_scenario("confounded").model_dump(mode="json")
    raw |= {"name": name, "seed": seed}
    raw["data"]["confounders"] = []
    for site in raw["data"]["sites"]:
        site |= {"correlation": 0.5, "recorded": None}
    if name == "prevalence_tuning":
        for site, prevalence in zip(raw["data"]["sites"], (0.2, 0.4, 0.6, 0.8, 0.5)):
            site |= {"prevalence": prevalence, "acquisition": {"gamma": 1.0, "blur_sigma": 0.2, "gaussian_noise": 0.03}}
    return SimulationScenario.model_validate(raw)


def without_records(scenario: SimulationScenario, removed: tuple[str, ...]) -> SimulationScenario:
    """The same world with the ``removed`` confounders no longer recorded at any hospital."""
    raw = scenario.model_dump(mode="json")
    for site in raw["data"]["sites"]:
        recorded = site["recorded"] if site["recorded"] is not None else raw["data"]["confounders"]
        site["recorded"] = [name for name in recorded if name not in removed]
    return SimulationScenario.model_validate(raw)


def scores(history: dict) -> dict[str, dict[str, float]]:
    """Per selection rule: the chosen round and what it reports."""
    warmup = int(history["meta"]["warmup-rounds"])
    by_round = {r["round"]: r for r in history["rounds"]}
    chosen = {rule: select_round(history, warmup_rounds=warmup, criterion=rule) for rule in RULES if rule != "final"}
    chosen["final"] = history["rounds"][-1]["round"]
    return {rule: {"round": r} | {k: round_summary(by_round[r])[k] for k in REPORTED} for rule, r in chosen.items()}


def run_row(method: str, scenario: SimulationScenario) -> dict:
    started = time.monotonic()
    configured = scenario.with_overrides(training=METHODS[method], federation={"engine": "inprocess",
                                                                              "evaluate_every": 2})
    history = run_scenario(configured)
    return {"method": method, "world": scenario.name, "seed": scenario.seed, "seconds": round(time.monotonic() - started, 1),
            **scores(history)}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []


def _run_all(jobs: list[tuple[str, SimulationScenario, dict]], out: Path) -> None:
    done = {(r["method"], r["world"], r["seed"], r.get("removed", "")) for r in _rows(out)}
    for method, scenario, extra in jobs:
        key = (method, scenario.name, scenario.seed, extra.get("removed", ""))
        if key in done:
            continue
        row = run_row(method, scenario) | extra
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        picked = row["val-auroc"]
        print(f"{method:<27} {scenario.name:<18} seed {scenario.seed} {extra.get('removed', ''):<16} "
              f"ood {picked['ood-auroc']:.3f} worst {picked['worst-site-auroc']:.3f} acc {picked['ood-accuracy']:.3f} "
              f"ece {picked['ood-ece']:.3f} ({row['seconds']:.0f}s)", flush=True)


def world_jobs(worlds: dict[str, tuple[int, ...]], methods: list[str]) -> list:
    return [(m, world(w, s), {"part": "worlds"}) for w, seeds in worlds.items() for s in seeds for m in methods]


def ablation_jobs(seeds: tuple[int, ...], methods: list[str]) -> list:
    jobs = []
    for seed in seeds:
        base = world("confounded", seed)
        for removed in [(name,) for name in base.data.confounders] + [tuple(base.data.confounders)]:
            label = "none recorded" if len(removed) > 1 else f"{removed[0]} unrecorded"
            jobs += [(m, without_records(base, removed), {"part": "ablation", "removed": label})
                     for m in METADATA_METHODS if m in methods]
    return jobs


def _fmt(values: list[float]) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return f"{np.mean(finite):.3f} ± {np.std(finite):.3f}" if finite else "n/a"


def summarise(rows: list[dict], worlds: list[str], rule: str) -> None:
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    for name in worlds:
        chosen = [r for r in rows if r["world"] == name and r.get("part", "worlds") == "worlds"]
        if not chosen:
            continue
        print(f"\n{name} (selection: {rule}; mean ± sd over seeds {sorted({r['seed'] for r in chosen})})")
        print(f"{'method':<27}{'held-out AUROC':>16}{'worst-site':>16}{'accuracy':>16}{'bal. acc.':>16}"
              f"{'sens@90spec':>16}{'ECE':>16}")
        for method in methods:
            picked = [r[rule] for r in chosen if r["method"] == method]
            if picked:
                print(f"{method:<27}" + "".join(f"{_fmt([p[k] for p in picked]):>16}" for k in (
                    "ood-auroc", "worst-site-auroc", "ood-accuracy", "ood-balanced-accuracy",
                    "ood-sensitivity-at-90-specificity", "ood-ece")))


def summarise_ablation(rows: list[dict], rule: str) -> None:
    ablation = [r for r in rows if r.get("part") == "ablation"]
    if not ablation:
        return
    print(f"\nmetadata ablation on confounded (selection: {rule}; held-out AUROC, mean ± sd over seeds)")
    labels = sorted({r["removed"] for r in ablation})
    print(f"{'method':<27}" + "".join(f"{label:>20}" for label in labels))
    for method in [m for m in METADATA_METHODS if any(r["method"] == m for r in ablation)]:
        print(f"{method:<27}" + "".join(
            f"{_fmt([r[rule]['ood-auroc'] for r in ablation if r['method'] == method and r['removed'] == label]):>20}"
            for label in labels))
    for method in ("FedAvg-ERM", NO_METADATA):  # the floors: no metadata read at all
        values = [r[rule]["ood-auroc"] for r in rows if r["method"] == method and r["world"] == "confounded"
                  and r.get("part", "worlds") == "worlds"]
        print(f"{method + ' (reads none)':<27}{_fmt(values):>20}")


def targets(rows: list[dict], rule: str) -> None:
    """The issue's targets on the rows given (held-out worlds)."""
    def mean(method: str, name: str, key: str) -> float:
        values = [r[rule][key] for r in rows if r["method"] == method and r["world"] == name
                  and r.get("part", "worlds") == "worlds"]
        return float(np.mean(values)) if values else math.nan

    print(f"\ntargets (selection: {rule})")
    free = mean(NO_METADATA, "confounded", "ood-auroc")
    print(f"  {NO_METADATA} on confounded: {free:.3f} (target >= 0.85: {'met' if free >= 0.85 else 'NOT met'})")
    for name in ("tag_only", "noise_only"):
        a, b = mean(NO_METADATA, name, "ood-auroc"), mean("FedAvg-ERM", name, "ood-auroc")
        print(f"  {NO_METADATA} on {name}: {a:.3f} vs FedAvg-ERM {b:.3f} (target >= ERM + 0.10: "
              f"{'met' if a >= b + 0.10 else 'NOT met'})")
    for name in ("prevalence_only", "scanner_only"):
        best = max(mean("FedAvg-ERM", name, "ood-accuracy"), mean("FedBN", name, "ood-accuracy"))
        for method in (NO_METADATA, "strata-subspace"):
            a = mean(method, name, "ood-accuracy")
            print(f"  {method} accuracy on {name}: {a:.3f} vs best of ERM and FedBN {best:.3f} (target within 0.03: "
                  f"{'met' if a >= best - 0.03 else 'NOT met'})")
    low = [(r["method"], r["world"], r["seed"], round(r[rule]["ood-accuracy"], 3)) for r in rows
           if r[rule]["ood-auroc"] >= 0.80 and r[rule]["ood-accuracy"] < 0.70 and r.get("part", "worlds") == "worlds"]
    print(f"  rows with held-out AUROC >= 0.80 but accuracy < 0.70: {low or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=("tuning", "heldout"), required=True)
    parser.add_argument("--part", nargs="+", choices=("worlds", "ablation"), default=["worlds", "ablation"])
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), metavar="METHOD",
                        help="default: REPORTED_HELDOUT held out; FedAvg-ERM and the two subspace methods when tuning")
    parser.add_argument("--worlds", nargs="+", default=None, help="a subset of the phase's worlds")
    parser.add_argument("--out", type=Path, default=None, help="JSONL of rows (default: /tmp/objectives-<phase>.jsonl)")
    parser.add_argument("--summary-only", action="store_true", help="summarise the rows in --out, train nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.methods = args.methods or (list(REPORTED_HELDOUT) if args.phase == "heldout"
                                    else ["FedAvg-ERM", NO_METADATA, "strata-subspace"])
    worlds = TUNING if args.phase == "tuning" else HELDOUT
    if args.worlds:
        worlds = {w: s for w, s in worlds.items() if w in args.worlds}
    out = args.out or Path(f"/tmp/objectives-{args.phase}.jsonl")
    if not args.summary_only:
        if "worlds" in args.part:
            _run_all(world_jobs(worlds, args.methods), out)
        if "ablation" in args.part and args.phase == "heldout":
            _run_all(ablation_jobs(HELDOUT["confounded"], args.methods), out)
    rows = [r for r in _rows(out) if r["method"] in args.methods and r["world"] in worlds]
    for rule in ("val-auroc", "val-objective"):
        summarise(rows, list(worlds), rule)
        summarise_ablation(rows, rule)
        if args.phase == "heldout":
            targets(rows, rule)


if __name__ == "__main__":
    main()
