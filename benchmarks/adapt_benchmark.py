"""Benchmark: AUROC at a new, unlabeled hospital before and after `causalfed adapt`.

The federation of the explain benchmark (three source hospitals with one scanner, no
shortcuts) trains a model. New hospitals with other scanners (the explain benchmark's four
acquisitions) then adapt it with their unlabeled images only. The metric is test AUROC
before and after. Target: a gain of >= 0.05 under acquisition shift.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    bench = _explain_benchmark()
    gains = []
    print(f"{'seed':>4} {'scanner':<62}{'before':>8}{'after':>8}{'gain':>8}{'EM prev.':>9}")
    for seed in args.model_seeds:
        scenario = bench.world(seed)
        model = bench.trained_model(scenario)
        for acquisition in bench.ACQUISITIONS:
            target = bench.shifted_site(scenario, {"acquisition": acquisition}, 0)
            unlabeled = np.concatenate([target.train.images, target.val.images])
            before = evaluate(model, target.test)["auroc"]
            adapted = copy.deepcopy(model)
            result = adapt_features(adapted, unlabeled, source_prevalence=0.5, seed=seed)
            after = evaluate(adapted, target.test)["auroc"]
            gains.append(after - before)
            print(f"{seed:>4} {str(acquisition):<62}{before:>8.3f}{after:>8.3f}{after - before:>+8.3f}"
                  f"{result.prevalence_estimate:>9.3f}", flush=True)
    mean = float(np.mean(gains))
    print(f"\nmean AUROC gain {mean:+.3f} (target >= +0.05: {'met' if mean >= 0.05 else 'NOT met'})")


if __name__ == "__main__":
    main()
