"""Benchmark: does `causalfed explain` blame the mechanism that really shifted?

Controlled cases on the simulator. A federation of three source hospitals (same scanner, no
shortcuts, labels equal to the lesion, prevalence 0.5) trains a model. With noise-free source
labels, a change of lesion prevalence is exactly a change of P(y). Then a new hospital is drawn that differs
from them in exactly one mechanism, at several strengths and with several patient draws:

- prevalence:  P(lesion) in {0.1, 0.2, 0.8, 0.9}
- acquisition: a different scanner (blur, noise, contrast)
- annotation:  label noise in {0.05, 0.1, 0.2, 0.3}

A case counts as correct when the shifted mechanism gets the largest share (in absolute
value) of the change in log-loss. Target: >= 90% of cases.

    python benchmarks/explain_benchmark.py [--model-seeds 0 1] [--draws 3]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np

from simulations.scenario import SimulationScenario as Scenario, parse_scenario
from server.explain import explain_drop
from simulations.runner import run_scenario

ACQUISITIONS = [
    {"gamma": 1.8, "gaussian_noise": 0.03},
    {"gamma": 0.6, "gaussian_noise": 0.03},
    {"brightness": 0.15, "blur_sigma": 0.8, "gaussian_noise": 0.03},
    {"gamma": 0.6, "brightness": 0.1, "blur_sigma": 0.8, "gaussian_noise": 0.06},
]
SHIFTS = {
    "prevalence": [{"prevalence": p} for p in (0.1, 0.2, 0.8, 0.9)],
    "acquisition": [{"acquisition": a} for a in ACQUISITIONS],
    "annotation": [{"label_noise": e} for e in (0.05, 0.1, 0.2, 0.3)],
}
# The source hospitals share one scanner, so a target that copies them differs from the
# federation in the shifted mechanism only (and in its patients).
SOURCE_ACQUISITION = [{"gamma": 1.0, "gaussian_noise": 0.03}] * 3


def world(seed: int) -> Scenario:
    sites = [{"name": f"source-{i}", "correlation": 0.5, "n_samples": 1000, "acquisition": a}
             for i, a in enumerate(SOURCE_ACQUISITION)]
    return parse_scenario({
        "name": "explain", "seed": seed,
        "data": {"label_noise": 0.0, "lesion_intensity": 0.5, "sites": sites},
        "training": {"objective": "erm", "batch_size": 64, "local_epochs": 1},
        "federation": {"num_rounds": 15, "engine": "inprocess"},
    })


def trained_model(scenario: Scenario):
    return trained_run(scenario)[0]


def trained_run(scenario: Scenario):
    """The federation's final model and its run folder (which also holds its feature moments)."""
    import tempfile

    import torch

    from client.task import new_model

    folder = Path(tempfile.mkdtemp(prefix="explain-"))
    run_scenario(scenario, run_dir=folder)
    model = new_model(seed=0)
    model.load_state_dict(torch.load(folder / "model.pt"))
    return model, folder


def shifted_site(scenario: Scenario, change: dict, draw: int):
    """A new hospital like source-0 except for ``change``, with its own patients."""
    from simulations.datasets import build_site

    raw = scenario.model_dump(mode="json")
    target = dict(raw["data"]["sites"][0]) | {"name": "target", "role": "heldout"} | change
    raw["data"]["sites"].append(target)
    raw["seed"] = scenario.seed * 1000 + 17 + draw
    shifted = Scenario.model_validate(raw)
    return build_site(shifted, len(raw["data"]["sites"]) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--draws", type=int, default=3)
    args = parser.parse_args()
    from simulations.datasets import build_site

    hits, total, confusion = 0, 0, Counter()
    print(f"{'seed':>4} {'shifted':<12}{'case':>5}{'draw':>5}{'src loss':>9}{'tgt loss':>9}{'reweighted':>11}"
          f"{'prev':>8}{'acq':>8}{'ann':>8}  blamed")
    for seed in args.model_seeds:
        scenario = world(seed)
        model = trained_model(scenario)
        sources = [(s.train.images, s.train.labels) for s in (build_site(scenario, i) for i in range(3))]
        for truth, changes in SHIFTS.items():
            for case, change in enumerate(changes):
                for draw in range(args.draws):
                    started = time.monotonic()
                    target = shifted_site(scenario, change, draw)
                    result = explain_drop(model, sources, (target.train.images, target.train.labels), metrics=("log-loss",))[0]
                    blamed = result.dominant
                    hits += blamed == truth
                    total += 1
                    confusion[(truth, blamed)] += 1
                    s = result.shares
                    print(f"{seed:>4} {truth:<12}{case:>5}{draw:>5}{result.source_loss:>9.3f}{result.target_loss:>9.3f}"
                          f"{result.reweighted_loss:>11.3f}{s['prevalence']:>8.3f}{s['acquisition']:>8.3f}"
                          f"{s['annotation']:>8.3f}  {blamed}{'' if blamed == truth else '  <- wrong'}"
                          f"  ({time.monotonic() - started:.1f}s)", flush=True)
    print()
    print("confusion (rows: shifted mechanism, columns: blamed)")
    names = list(SHIFTS)
    print(f"{'':<14}" + "".join(f"{n:>13}" for n in names))
    for truth in names:
        print(f"{truth:<14}" + "".join(f"{confusion[(truth, b)]:>13}" for b in names))
    rate = hits / total
    print(f"\nshifted mechanism gets the largest share in {hits}/{total} = {rate:.1%} of cases "
          f"(target >= 90%: {'met' if rate >= 0.9 else 'NOT met'})")


if __name__ == "__main__":
    main()
