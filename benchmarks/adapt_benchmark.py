"""Benchmark: AUROC at a new, unlabeled hospital before and after `causalfed adapt`.

The federation of the explain benchmark (three source hospitals with one scanner, no
shortcuts) trains a model. New hospitals with other scanners then adapt it with their
unlabeled images only: the explain benchmark's four mild acquisitions and eight stronger
ones (dark or bright contrast curves, heavy blur, low dose). The metric is test AUROC
before and after. Target: a gain of >= 0.05 under acquisition shift, reported both over
every scanner and over the scanners whose shift cost the model >= 0.05 AUROC against a
new hospital with the source scanner (where there is something to recover).

`adapt` as shipped first checks how far the new hospital's features moved from the
federation's (moments the federation wrote beside its model) and leaves the model alone
below a small standardised effect (0.2); the "always" columns adapt regardless.

    python benchmarks/adapt_benchmark.py [--model-seeds 0 1]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
from pathlib import Path

import numpy as np

from client.adapt import adapt_features, onboard
from client.task import evaluate
from common.feature_shift import FEATURE_MOMENTS_FILE, FeatureMoments


def _explain_benchmark():
    spec = importlib.util.spec_from_file_location("explain_benchmark", Path(__file__).with_name("explain_benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STRONG_ACQUISITIONS = [
    {"gamma": 2.5, "gaussian_noise": 0.03},
    {"gamma": 3.0, "gaussian_noise": 0.03},
    {"gamma": 2.2, "blur_sigma": 1.0, "gaussian_noise": 0.03},
    {"gamma": 2.0, "brightness": -0.1, "gaussian_noise": 0.05},
    {"gamma": 0.4, "gaussian_noise": 0.03},
    {"brightness": 0.35, "gaussian_noise": 0.03},
    {"blur_sigma": 1.5, "gaussian_noise": 0.03},
    {"photon_count": 25},
]
HURT = 0.05  # AUROC the shift must cost before it counts as one adaptation should repair


def _adapt_both_ways(model, unlabeled, reference: FeatureMoments, seed: int):
    """`adapt` as shipped (it checks the shift first), and adapted regardless."""
    checked = copy.deepcopy(model)
    result = onboard(checked, unlabeled, reference=reference, source_prevalence=0.5, seed=seed)
    if result.adapted:
        return result, checked, checked
    always = copy.deepcopy(model)
    adapt_features(always, unlabeled, source_prevalence=0.5, seed=seed)
    return result, checked, always


def _summary(label: str, gains: list[float], repaired: list[float]) -> None:
    mean = float(np.mean(gains))
    print(f"{label}: mean AUROC gain over every scanner ({len(gains)}): {mean:+.3f} "
          f"(target >= +0.05: {'met' if mean >= 0.05 else 'NOT met'})")
    if repaired:
        hurt = float(np.mean(repaired))
        print(f"{label}: mean AUROC gain where the shift cost >= {HURT} AUROC ({len(repaired)} of {len(gains)}): "
              f"{hurt:+.3f} (target >= +0.05: {'met' if hurt >= 0.05 else 'NOT met'})")
    print(f"{label}: worst change: {min(gains):+.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    bench = _explain_benchmark()
    gains = {"adapt": [], "always": []}
    repaired = {"adapt": [], "always": []}
    print(f"{'seed':>4} {'scanner':<62}{'source':>8}{'before':>8}{'shift':>8}{'adapt':>8}{'gain':>8}"
          f"{'always':>8}{'gain':>8}{'EM prev.':>9}")
    for seed in args.model_seeds:
        scenario = bench.world(seed)
        model, run_dir = bench.trained_run(scenario)
        reference = FeatureMoments.load(run_dir / FEATURE_MOMENTS_FILE)
        spread = json.loads((run_dir / FEATURE_MOMENTS_FILE).read_text())["sites"]
        print(f"   {seed} the federation's own hospitals, shift from their pool: "
              + ", ".join(f"{site} {value:.3f}" for site, value in spread.items()))
        reference_auroc = evaluate(model, bench.shifted_site(scenario, {}, 0).test)["auroc"]
        for acquisition in [*bench.ACQUISITIONS, *STRONG_ACQUISITIONS]:
            target = bench.shifted_site(scenario, {"acquisition": acquisition}, 0)
            unlabeled = np.concatenate([target.train.images, target.val.images])
            before = evaluate(model, target.test)["auroc"]
            result, checked, always = _adapt_both_ways(model, unlabeled, reference, seed)
            after = {"adapt": evaluate(checked, target.test)["auroc"], "always": evaluate(always, target.test)["auroc"]}
            for way, value in after.items():
                gains[way].append(value - before)
                if reference_auroc - before >= HURT:
                    repaired[way].append(value - before)
            decision = f"{after['adapt']:.3f}" if result.adapted else "left"
            print(f"{seed:>4} {str(acquisition):<62}{reference_auroc:>8.3f}{before:>8.3f}{result.shift:>8.3f}"
                  f"{decision:>8}{after['adapt'] - before:>+8.3f}{after['always']:>8.3f}{after['always'] - before:>+8.3f}"
                  f"{result.prevalence.value:>9.3f}", flush=True)
    print()
    _summary("adapt (shift-checked)", gains["adapt"], repaired["adapt"])
    _summary("always adapt", gains["always"], repaired["always"])


if __name__ == "__main__":
    main()
