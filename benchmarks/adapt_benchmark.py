"""Benchmark: AUROC at a new, unlabeled hospital before and after `causalfed adapt`.

The federation of the explain benchmark (three source hospitals with one scanner, no
shortcuts) trains a model. New hospitals with other scanners then adapt it with their
unlabeled images only: the explain benchmark's four mild acquisitions and eight stronger
ones (dark or bright contrast curves, heavy blur, low dose). The metric is test AUROC
before and after. Target: a gain of >= 0.05 under acquisition shift, reported both over
every scanner and over the scanners whose shift cost the model >= 0.05 AUROC against a
new hospital with the source scanner (where there is something to recover).

    python benchmarks/adapt_benchmark.py [--model-seeds 0 1]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
from pathlib import Path

import numpy as np

from client.adapt import adapt_features
from client.task import evaluate


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    bench = _explain_benchmark()
    gains, repaired = [], []
    print(f"{'seed':>4} {'scanner':<62}{'source':>8}{'before':>8}{'after':>8}{'gain':>8}{'EM prev.':>9}")
    for seed in args.model_seeds:
        scenario = bench.world(seed)
        model = bench.trained_model(scenario)
        reference = evaluate(model, bench.shifted_site(scenario, {}, 0).test)["auroc"]
        for acquisition in [*bench.ACQUISITIONS, *STRONG_ACQUISITIONS]:
            target = bench.shifted_site(scenario, {"acquisition": acquisition}, 0)
            unlabeled = np.concatenate([target.train.images, target.val.images])
            before = evaluate(model, target.test)["auroc"]
            adapted = copy.deepcopy(model)
            result = adapt_features(adapted, unlabeled, source_prevalence=0.5, seed=seed)
            after = evaluate(adapted, target.test)["auroc"]
            gains.append(after - before)
            if reference - before >= HURT:
                repaired.append(after - before)
            print(f"{seed:>4} {str(acquisition):<62}{reference:>8.3f}{before:>8.3f}{after:>8.3f}{after - before:>+8.3f}"
                  f"{result.prevalence_estimate:>9.3f}", flush=True)
    mean = float(np.mean(gains))
    print(f"\nmean AUROC gain over every scanner ({len(gains)}): {mean:+.3f} "
          f"(target >= +0.05: {'met' if mean >= 0.05 else 'NOT met'})")
    if repaired:
        hurt = float(np.mean(repaired))
        print(f"mean AUROC gain where the shift cost >= {HURT} AUROC ({len(repaired)} of {len(gains)}): {hurt:+.3f} "
              f"(target >= +0.05: {'met' if hurt >= 0.05 else 'NOT met'})")
    print(f"worst change: {min(gains):+.3f}")


if __name__ == "__main__":
    main()
