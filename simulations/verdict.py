"""The first thing a run says: did the model learn the lesion or the shortcut?

At a held-out hospital where the shortcuts are reversed, a model that reads the shortcut
ranks patients worse than chance, one that reads the lesion ranks them well. The verdict
compares the scenario's method with FedAvg-ERM trained on the same hospitals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from simulations.selection import round_summary


class VerdictThresholds(BaseModel):
    """What held-out AUROC the words of a verdict stand for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    avoided: float = Field(
        0.7, gt=0.5, le=1.0,
        description="held-out AUROC at or above this: the model ranks the held-out hospital's patients by what "
        "stays true there (the lesion), so it avoided the shortcut",
    )
    followed: float = Field(
        0.5, ge=0.0, le=0.5,
        description="held-out AUROC below this: worse than chance where the shortcut is reversed, so the model "
        "learnt the shortcut",
    )


@dataclass(frozen=True)
class MethodResult:
    label: str  # e.g. "strata-subspace" or "FedAvg-ERM"
    heldout_auroc: float
    iid_auroc: float

    def words(self, thresholds: VerdictThresholds, *, reversed_shortcut: bool = True) -> str:
        if not math.isfinite(self.heldout_auroc):
            return "was not evaluated at a held-out hospital"
        if not reversed_shortcut:  # nothing to avoid: say how well it ranks there
            return "ranks the held-out hospital's patients well" if self.heldout_auroc >= thresholds.avoided else \
                "ranks the held-out hospital's patients poorly"
        if self.heldout_auroc >= thresholds.avoided:
            return "avoided the shortcut"
        if self.heldout_auroc < thresholds.followed:
            return "learnt the shortcut (worse than chance where it is reversed)"
        return "partly avoided the shortcut"


def method_result(label: str, history: dict) -> MethodResult:
    """The final model's held-out and i.i.d. AUROC (the model the run delivers)."""
    last = round_summary(history["rounds"][-1])
    return MethodResult(label, last["ood-auroc"], last["iid-auroc"])


def reverses_a_shortcut(scenario) -> bool:
    """Whether some held-out hospital's confounder links to the label against the training
    hospitals' (where it is below 0.5 and theirs above)."""
    data = scenario.data
    for confounder in data.confounders:
        trained = [s.correlation_of(confounder) for s in data.train_sites]
        held = [s.correlation_of(confounder) for s in data.sites if s.role == "heldout"]
        if held and min(held) < 0.5 < max(trained):
            return True
    return False


def verdict_lines(results: list[MethodResult], thresholds: VerdictThresholds | None = None, *,
                  reversed_shortcut: bool = True) -> list[str]:
    """One sentence per method, the scenario's method first, then the comparison."""
    thresholds = thresholds or VerdictThresholds()
    lines = [f"{r.label}: held-out AUROC {r.heldout_auroc:.3f} (i.i.d. {r.iid_auroc:.3f}): "
             f"{r.words(thresholds, reversed_shortcut=reversed_shortcut)}" for r in results]
    if len(results) == 2 and all(math.isfinite(r.heldout_auroc) for r in results):
        gain = results[0].heldout_auroc - results[1].heldout_auroc
        lines.append(f"{results[0].label} {'gains' if gain >= 0 else 'loses'} {abs(gain):.3f} held-out AUROC over "
                     f"{results[1].label} on the same hospitals")
    return lines
