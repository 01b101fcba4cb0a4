"""Model selection and summaries from a run's per-round metrics, without peeking o.o.d.

Selection uses only the training hospitals' validation splits (DomainBed's "training-domain
validation"), by one of two criteria:

- ``val-objective``: the lowest mean value of the training objective itself (for IRM,
  risk plus the invariance penalty), the default: it asks for what was optimised;
- ``val-auroc``: the highest mean validation AUROC, which favours whatever predicts best
  at the training hospitals, shortcuts included.

Rounds inside an objective's warm-up are not eligible: there the objective is not yet the
one that was asked for.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _sites(round_entry: dict[str, Any], role: str) -> dict[str, dict[str, Any]]:
    return {name: m for name, m in round_entry["sites"].items() if m.get("role") == role}


def _mean(values: list[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def round_summary(round_entry: dict[str, Any]) -> dict[str, float]:
    """i.i.d. (training hospitals' own test sets), o.o.d. (held-out hospitals) and worst site."""
    train = _sites(round_entry, "train")
    heldout = _sites(round_entry, "heldout")
    train_test = [m.get("test-auroc") for m in train.values()]
    every = [m.get("test-auroc") for m in round_entry["sites"].values()]
    return {
        "round": round_entry["round"],
        "train-val-auroc": _mean([m.get("val-auroc") for m in train.values()]),
        "train-val-objective": _mean([m.get("val-objective") for m in train.values()]),
        "iid-auroc": _mean(train_test),
        "ood-auroc": _mean([m.get("test-auroc") for m in heldout.values()]),
        "worst-train-site-auroc": min((v for v in train_test if v is not None), default=math.nan),
        "worst-site-auroc": min((v for v in every if v is not None and math.isfinite(v)), default=math.nan),
        # Decisions at the held-out hospitals: calibrated on training validation, at their estimated prevalence.
        "ood-accuracy": _mean([m.get("test-cal-accuracy") for m in heldout.values()]),
        "ood-balanced-accuracy": _mean([m.get("test-cal-balanced-accuracy") for m in heldout.values()]),
        "ood-ece": _mean([m.get("test-cal-ece") for m in heldout.values()]),
        "ood-sensitivity-at-90-specificity": _mean([m.get("test-sens-at-90-spec") for m in heldout.values()]),
        "ood-prevalence-used": _mean([m.get("prevalence-used") for m in heldout.values()]),
    }


CRITERIA = {"val-objective": ("train-val-objective", -1.0), "val-auroc": ("train-val-auroc", 1.0)}


def select_round(history: dict[str, Any], *, warmup_rounds: int = 0, criterion: str = "val-objective") -> int:
    """The best round after warm-up by ``criterion`` on the training hospitals' validation data."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown selection criterion {criterion!r}; expected one of {sorted(CRITERIA)}")
    rounds = history["rounds"]
    if not rounds:
        raise ValueError("the run has no evaluated rounds")
    key, sign = CRITERIA[criterion]
    eligible = [r for r in rounds if r["round"] > warmup_rounds] or rounds[-1:]
    scores = np.array([sign * round_summary(r)[key] for r in eligible])
    if np.isnan(scores).all():
        return eligible[-1]["round"]
    return eligible[int(np.nanargmax(scores))]["round"]


def summarise_run(history: dict[str, Any], *, warmup_rounds: int = 0) -> dict[str, dict[str, float]]:
    """Summaries of the final round and of the round each criterion selects."""
    by_round = {r["round"]: r for r in history["rounds"]}
    summary = {"final": round_summary(history["rounds"][-1])}
    for criterion in CRITERIA:
        chosen = select_round(history, warmup_rounds=warmup_rounds, criterion=criterion)
        summary[f"selected by {criterion}"] = round_summary(by_round[chosen])
    return summary


def leave_one_site_out(scenario, left_out: str):
    """The scenario with training hospital ``left_out`` turned into a held-out one, and the
    real held-out hospitals dropped: a selection fold must never see them."""
    raw = scenario.model_dump(mode="json")
    sites = [s for s in raw["data"]["sites"] if s["role"] == "train"]
    for site in sites:
        if site["name"] == left_out:
            site["role"] = "heldout"
    raw["data"]["sites"] = sites
    return type(scenario).model_validate(raw)


def loso_scores(fold_histories: dict[str, dict[str, Any]], *, warmup_rounds: int = 0) -> dict[int, float]:
    """Each round's mean validation AUROC at the training hospital each fold left out.

    DomainBed's leave-one-domain-out selection with the round as the choice: fold k trains
    without hospital k and scores round r by k's validation AUROC. Only rounds after the
    warm-up that every fold scored are eligible.
    """
    if not fold_histories:
        raise ValueError("leave-one-site-out selection needs at least one fold")
    scores: dict[int, list[float]] = {}
    for left_out, history in fold_histories.items():
        for entry in history["rounds"]:
            value = entry["sites"].get(left_out, {}).get("val-auroc")
            if value is not None and math.isfinite(value):
                scores.setdefault(entry["round"], []).append(value)
    eligible = {r: float(np.mean(v)) for r, v in scores.items() if r > warmup_rounds and len(v) == len(fold_histories)}
    if not eligible:
        raise ValueError("no round was scored by every fold")
    return eligible


def best_scored_round(scores: dict[int, float]) -> int:
    """The round with the highest score; on a tie, the later round (it trained longer)."""
    return max(scores, key=lambda r: (scores[r], r))
