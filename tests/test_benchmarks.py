"""The benchmarks' own arithmetic (fast), and each benchmark script end to end on a tiny case
(slow: ``python -m pytest -m slow``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import load_benchmark


def _report(round_number, verdicts):
    return {"round": round_number, "excluded": [c for c, excluded, _ in verdicts if excluded],
            "verdicts": [{"client": c, "excluded": e, "clip_scale": s} for c, e, s in verdicts]}


def test_detection_counts_attacker_rounds_from_the_start_and_honest_exclusions():
    bench = load_benchmark("guard_benchmark")
    reports = [
        _report(1, [("a", False, 1.0), ("h", False, 1.0)]),  # before the strike: not counted
        _report(2, [("a", False, 1.0), ("h", False, 0.5)]),
        _report(3, [("a", True, 0.0), ("h", False, 1.0)]),
        _report(4, [("a", True, 0.0), ("h", True, 0.0)]),
    ]
    found = bench.detection(reports, ["a"], start=2)
    assert found["tpr"] == pytest.approx(2 / 3)
    assert found["flagged-in-2"] == 1.0  # first flagged in round 3, within 2 rounds of round 2
    assert found["honest-excluded"] == 1 and found["fpr"] == pytest.approx(1 / 4)
    assert bench.shortenings(reports, ["h"])["h"] == pytest.approx(1 / 4)
    late = bench.detection(reports, ["a"], start=1)
    assert late["flagged-in-2"] == 0.0


def test_benign_cases_change_only_the_hospitals_they_name():
    bench = load_benchmark("guard_benchmark")
    base = bench.base_world(10, 3)
    for case in bench.BENIGN["heldout"] + bench.BENIGN["tuning"]:
        changed = bench.benign_case(base, case)
        touched = {s["name"] for s, t in zip(base["data"]["sites"], changed["data"]["sites"]) if s != t}
        touched |= set(changed.get("behaviour", {}))
        assert touched <= set(bench.affected(base, case)), case
    assert set(bench.TUNING_ATTACKS).isdisjoint(bench.HELDOUT_ATTACKS)
    assert set(bench.SEEDS["tuning"]).isdisjoint(bench.SEEDS["heldout"])


def test_label_shift_keeps_the_images_of_each_class_and_reaches_the_prevalence():
    from common.data import Split

    bench = load_benchmark("explain_benchmark")
    rng = np.random.default_rng(0)
    split = Split(rng.random((400, 1, 28, 28)).astype(np.float32), (rng.random(400) < 0.5).astype(np.int64))
    shifted = bench.label_shift(split, 0.15, rng)
    assert shifted.labels.mean() == pytest.approx(0.15, abs=0.01)
    assert all(any(np.array_equal(image, original) for original in split.images[split.labels == label])
               for image, label in zip(shifted.images[:10], shifted.labels[:10]))


def test_the_objectives_benchmark_declares_disjoint_tuning_and_heldout_seeds():
    bench = load_benchmark("objectives_benchmark")
    tuning = {seed for seeds in bench.TUNING.values() for seed in seeds}
    heldout = {seed for seeds in bench.HELDOUT.values() for seed in seeds}
    assert tuning.isdisjoint(heldout)
    assert {"tag_only", "noise_only", "unrecorded_tag", "prevalence_only", "scanner_only", "weak_correlation",
            "pneumonia"} <= set(bench.HELDOUT)
    removed = bench.without_records(bench.world("confounded", 3), ("tag",))
    assert all(site.recorded == ("denoising", "noise") for site in removed.data.sites)


@pytest.mark.slow
def test_the_guard_benchmark_runs_an_attack_row_and_a_benign_case(tmp_path):
    bench = load_benchmark("guard_benchmark")
    bench.ROUNDS = 3
    raw = bench.base_world(5, 0)
    raw["federation"] |= {"num_rounds": 3, "evaluate_every": 3}
    oracle = bench.run(bench.oracle_world(raw, bench.attackers_of(raw, "replay")), backdoor=True)
    row = bench.attack_row(raw, "replay", "guard", 0, tmp_path / "none.npz", oracle)
    assert row["tpr"] >= 0.5 and row["fpr"] == 0.0 and math.isfinite(row["oracle-gap"])


@pytest.mark.slow
def test_the_objectives_benchmark_scores_a_row():
    bench = load_benchmark("objectives_benchmark")
    scenario = bench.world("prevalence_tuning", 0).with_overrides(federation={"num_rounds": 4})
    row = bench.run_row("subspace", scenario)
    assert set(row) >= {"val-auroc", "val-objective", "final"}
    assert 0 <= row["final"]["ood-auroc"] <= 1 and 0 <= row["final"]["ood-accuracy"] <= 1


@pytest.mark.slow
def test_the_explain_suite_runs_a_case(tmp_path):
    bench = load_benchmark("explain_benchmark")
    from simulations.datasets import build_site

    scenario = bench.world(0, "ERM").with_overrides(federation={"num_rounds": 4, "evaluate_every": 4})
    model, calibration, _ = bench.trained(scenario, tmp_path)
    sources = [(s.test.images, s.test.labels) for s in (build_site(scenario, i) for i in range(3))]
    row = bench.run_case(model, calibration, sources, scenario, "annotation", 2, 0)
    assert row["leading"] and set(row["shares"]["log-loss"]) == {"prevalence", "acquisition", "association"}
