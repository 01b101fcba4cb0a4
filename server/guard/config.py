"""Every number that decides a guard verdict, in one validated model (``[federation.guard]``).

Each threshold says what it means in the units the guard measures. Defaults were chosen
on the guard benchmark's declared tuning cases (``benchmarks/guard_benchmark.py``) and
then frozen; what the benchmark measured with them is in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class GuardConfig(BaseModel):
    """The server guard (``server/guard/``): which updates to exclude, and how far any one
    accepted update may move the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    sketch_size: int = Field(
        1024, ge=64, le=65_536,
        description="length of the CountSketch every update is compressed to: the guard's memory per client "
        "and round, whatever the model's size",
    )
    sample_size: int = Field(
        4096, ge=256, le=1_000_000,
        description="coordinates of every update kept apart (unsketched) for the crafted-update test",
    )
    # Influence bound, applied to every accepted update.
    clip_ratio: float = Field(
        2.0, ge=1.0, le=100.0,
        description="no accepted update moves the model by more than this times the round's median update "
        "length, times sqrt(its local steps over the median's) when it trained more steps",
    )
    # Detectors (``server/guard/detectors.py``): each flags on evidence that a different
    # prevalence, scanner, size or joining time cannot produce.
    idle_ratio: float = Field(
        0.01, gt=0.0, lt=1.0,
        description="idle: an update shorter than this fraction of the round's median was not trained",
    )
    boost_ratio: float = Field(
        4.0, gt=1.0,
        description="boosted: an update longer than this times the round's median length, times sqrt(its "
        "local steps over the median's) when it trained more, is longer than local training explains",
    )
    suspect_weight: float = Field(
        0.5, gt=0.0, le=1.0,
        description="the share of its update kept by a hospital that only a down-weighting detector flagged "
        "(unlearnt, crafted, direction): evidence honest heterogeneity can also produce may lessen a hospital's "
        "say in a round, never silence it",
    )
    unlearnt_share: float = Field(
        4.0, gt=1.0,
        description="unlearnt: an update whose share of length in the span of the other updates is under this "
        "many times what a random direction would have was not learnt from cases like theirs "
        "(off under DP-SGD, whose noise is such a direction)",
    )
    copy_distance: float = Field(
        0.05, gt=0.0, lt=1.0,
        description="copy: an update closer to another hospital's update (this round or the last) than this "
        "fraction of the longer one's length is a replay or a copy",
    )
    mirror_cosine: float = Field(
        0.95, gt=0.5, le=1.0,
        description="mirror: cosine with the other hospitals' mean update at or below minus this is their "
        "consensus reversed",
    )
    crafted_regularity: float = Field(
        4.0, gt=1.0,
        description="crafted: departing from the others' mean by the same number of their standard deviations "
        "at nearly every coordinate (|median| over robust spread of the departure at least this) is an update "
        "computed from their statistics",
    )
    reversal_cosine: float = Field(
        0.7, gt=0.0, le=1.0,
        description="reversal: cosine with the hospital's own last accepted update at or below minus this is a "
        "hospital turning against its own training",
    )
    reversal_memory: int = Field(
        5, ge=1, le=100, description="reversal: rounds a hospital's last accepted update stays its yardstick"
    )
    # The reference set: optional, explicit, small.
    reference_set: Path | None = Field(
        None,
        description="labelled reference cases the server holds (.npz with images and labels, at most "
        "`max_reference_cases`; docs/guard.md); without one the guard runs data-free",
    )
    max_reference_cases: int = Field(200, ge=20, le=200, description="the reference set's size limit")
    reference_trainings: int = Field(
        4, ge=2, le=32,
        description="direction: balanced local trainings on the reference set per round; their jackknife "
        "spread is the yardstick's error",
    )
    direction_z: float = Field(
        3.5, gt=0.0,
        description="direction: pooled z (Stouffer over `direction_window` rounds) at or beyond which an update "
        "points against what honest training on the reference cases does",
    )
    direction_window: int = Field(4, ge=1, le=50, description="direction: rounds whose evidence is pooled")
    direction_wobble: float = Field(
        0.13, ge=0.0, le=1.0,
        description="direction: how much an honest update's cosine with the reference training wobbles from round "
        "to round (the spread of its round-to-round changes over sqrt 2), added in quadrature to the references' error",
    )
    min_clients: int = Field(
        3, ge=3,
        description="fewest updates a round needs for the guard to judge them (comparisons need others)",
    )
