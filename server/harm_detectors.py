"""The guard's harm detectors: what an update does to the server's clean validation cases
(a registry shared with ``server/detectors.py``; one small class each, one family).

Leaving it out of the aggregate (``intervention``), applying it alone (``solo-ranking``),
and the first-order question of whether it points with or against what ranks the cases
(``validation-direction``) or what the server's own training on them does
(``reference-direction``). Harm is what the guard exists to prevent, so this family gets
its own share of the level (``combine_by_family``).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from scipy.stats import norm

from server.detectors import HARM_FAMILY, Detector
from server.guard_evidence import Finding, Measurements, RoundEvidence, pooled_over_rounds
from server.guard_stats import robust_spread, robust_z, stouffer_upper_p, upper_p


class InterventionDetector(Detector):
    name = "intervention"
    family = HARM_FAMILY
    min_effect: ClassVar[float] = 0.002  # validation log-loss: below this it is noise

    def inspect(self, evidence: RoundEvidence) -> Finding:
        n, effects = len(evidence.clients), evidence.measured.loo_effects
        if effects is None:
            return Finding(np.ones(n), [""] * n)
        harm = -effects  # > 0: the aggregate is better without this client
        z = robust_z(harm)
        p_values = np.where(harm > self.min_effect, upper_p(z), 1.0)
        reasons = [f"leaving it out changes validation loss by {e:+.4f}" for e in effects]
        return Finding(p_values, reasons)


class SoloRankingDetector(Detector):
    """Evidence accumulates over rounds (Stouffer): a few hundred validation cases rank one
    client's model only roughly. As for the forecast, the yardstick is the client's own
    history where it has one: a hospital whose cases always rank the validation set a
    little worse (another prevalence, other shortcuts) is not blamed for it every round.

    Both are relative to the round's median change: as the model converges, every
    client's model alone gains less, and a history that stopped learning (a client once
    flagged) would otherwise read that common drift as the client's growing harm (seed 4:
    honest hospitals flagged from round 3 to the end, z 6 by round 3)."""

    name = "solo-ranking"
    family = HARM_FAMILY
    # Against its own history, it asks whether a client changed (its history learns from
    # every round: ``ClientMemory.remember_solo_change``), so a client whose updates point
    # with the validation ranking is excused, as for the other habits. Seed 2 with 500
    # validation cases: an honest hospital whose cosine with the ranking was +0.17 was
    # flagged in round 6 because its model alone ranked 0.02 below its first round's record.
    habit_only = True
    sums_over_rounds = True
    min_drop: ClassVar[float] = 0.03  # validation AUROC: smaller drops are sampling noise

    def inspect(self, evidence: RoundEvidence) -> Finding:
        n, changes = len(evidence.clients), evidence.measured.solo_auroc_changes
        if changes is None or not np.isfinite(changes).all():
            return Finding(np.ones(n), [""] * n)  # no ranking to compare (e.g. a one-class validation set)
        drop = -changes
        relative = changes - np.median(changes)
        expected = np.array([m.solo_change if m.solo_change is not None else 0.0 for m in evidence.memories])
        surprise = expected - relative  # > 0: worse than its own record, beyond the round's common change
        z = np.clip(surprise / max(robust_spread(drop), 1e-6), -3.0, 6.0)  # one freak round must not dominate the sum
        pooled, rounds = pooled_over_rounds(evidence.memories, self.name, z)
        # Each round's score is a robust z of a few clients, heavy-tailed: in round 1, with
        # no history, honest hospitals of another population make two clusters, and the
        # spread of the larger one is no yardstick for the smaller (seed 8: two honest
        # hospitals at z 3.7 and 3.8, flagged with the normal tail).
        p_values = np.where(drop > self.min_drop, stouffer_upper_p(pooled, rounds), 1.0)
        reasons = [f"its model alone changes validation AUROC by {c:+.3f} (z {s:+.1f} over {k} rounds)"
                   for c, s, k in zip(changes, pooled, rounds)]
        return Finding(p_values, reasons, {"z": z, "relative": relative})


class ValidationDirectionDetector(Detector):
    """The first-order intervention: does the update point with or against what ranks the
    server's clean validation cases? That is, its cosine with the descent direction of a
    pairwise ranking loss on them (``server/guard_round.py``).

    Pairwise, every positive against every negative, so the bias cancels: a hospital with
    another prevalence moves the bias, not the ranking. (What a prevalence moves through
    the features, the update's common shift, is taken out before: ``server/guard_round.py``.)
    Shortcuts tell nothing on the validation cases (their correlation with the label is
    0.5), so learning one moves across this direction, not against it. A flipped update,
    or one learnt from flipped labels, points against it.

    The yardstick is zero, in units of the cosine's error (its bootstrap error with the
    honest round-to-round wobble, ``direction_wobble``): not the client's
    history, since pointing against the clean ranking is harm however long a client has
    done it (an attacker present from the first round would otherwise become its own
    yardstick); not the other clients, since being the least helpful is not harm, and
    three attackers at -0.4 widen the others' spread until nobody stands out. Evidence
    adds up over rounds (Stouffer).
    """

    name = "validation-direction"
    family = HARM_FAMILY
    sums_over_rounds = True
    # The bootstrap error is only the validation sample's. An honest hospital's update also
    # wobbles round to round against the population's ranking, by an amount that does not
    # shrink with the sample: seed 6's hospital 03 read -0.115 +/- 0.008 once (z 14 on the
    # error alone). So the error is taken with this wobble in quadrature. Doubling the
    # error instead still left that one at z 7, and cost the flippers whose error is large.
    # Chosen on rounds recorded from the tenth version (seeds 1, 5, 6 and 11, flip attacks):
    # 0.03 left the largest honest z at 3.7 where doubling left 7.0, and 60% of round-1
    # flippers passed the 3.86 that flags a lone client, against 16%. The first rounds of 61
    # seeds: largest honest z 2.4 (``benchmarks/ranking_evidence.py --rounds 1``; all in
    # ``benchmarks/GUARD_HISTORY.md``, "Server guard, eleventh version").
    direction_wobble: ClassVar[float] = 0.03
    # A cosine this small is no direction, whatever its error: a Gaussian-noise update's is
    # 0.00 +/- 0.00 every round (seed 8), which read as z -3, helpful, and so excused its
    # change of habit. Honest updates' cosines are 0.1-0.45, flipped ones' -0.1 to -0.46.
    min_cosine: ClassVar[float] = 0.05

    @classmethod
    def round_z(cls, cosines: np.ndarray, errors: np.ndarray, *, wobble: float) -> np.ndarray:
        """One round's score per update: > 0 against the ranking, in units of its bootstrap
        error and ``wobble`` in quadrature; NaN where it has no direction.

        No direction is no measurement (NaN, left out of the sums), not a measured zero:
        counted as z 0, a flipped hospital's rounds without direction diluted the rounds
        with it (seed 11, sign-flip: z 0, 2.2, 0, 3.4 summed to 2.8, without the zeros 4.0).
        """
        z = -cosines / np.maximum(np.hypot(errors, wobble), 1e-6)
        return np.where(np.abs(cosines) < cls.min_cosine, np.nan, z)

    what: ClassVar[str] = "the validation ranking"

    def measurements(self, measured: Measurements) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The cosines this detector judges, and their errors."""
        return measured.ranking_alignments, measured.ranking_errors

    def inspect(self, evidence: RoundEvidence) -> Finding:
        n = len(evidence.clients)
        cosines, errors = self.measurements(evidence.measured)
        if cosines is None or errors is None or not (np.isfinite(cosines).all() and np.isfinite(errors).all()):
            return Finding(np.ones(n), [""] * n)  # no validation set, or a one-class one
        # Clipped: one freak round must not dominate the sum (NaN stays NaN).
        z = np.clip(self.round_z(cosines, errors, wobble=self.direction_wobble), -3.0, 6.0)
        pooled, counts = pooled_over_rounds(evidence.memories, self.name, z)
        reasons = [f"its update points {'against' if c < 0 else 'with'} {self.what} (cosine {c:+.2f} "
                   f"+/- {e:.2f}; z {s:+.1f} over {k} rounds with a direction)"
                   for c, e, s, k in zip(cosines, errors, pooled, counts)]
        return Finding(norm.sf(pooled), reasons, {"z": z, "pooled": pooled})


class ReferenceDirectionDetector(ValidationDirectionDetector):
    """The same question asked of the server's own training: does the update point with or
    against what an honest hospital's local training on the server's clean cases does,
    once the direction a prevalence moves an update is taken out (``server/reference.py``)?

    Through Adam's steps a prevalence moves an update far more than the mean score's
    gradient says, so a flipped hospital with few positives can look like an honest one
    with many along the validation ranking (seed 4, round 1: cosine -0.02). Against
    references trained with the hospitals' own recipe at two prevalences and then
    balanced, the same update reads -0.19. Judged against zero, in units of the
    references' jackknife error with the same honest wobble, summed over rounds."""

    name = "reference-direction"
    what = "the server's balanced reference training"

    def measurements(self, measured: Measurements) -> tuple[np.ndarray | None, np.ndarray | None]:
        return measured.reference_alignments, measured.reference_errors


# The first-order harm detectors: whether an update points with what ranks the clean cases.
DIRECTIONS = ("validation-direction", "reference-direction")


def pointing_with_the_ranking(findings: dict[str, Finding]) -> np.ndarray:
    """Clients whose update this round points with every direction measured (``DIRECTIONS``:
    the validation ranking and the server's balanced reference), by at least their
    ``min_cosine``. None measured: nobody.

    For these, a validation log-loss that leaving them out improves (``intervention``) is
    calibration, not harm: with three attackers out of seed 9's Gaussian-noise row, the
    honest hospitals left averaged 0.51 positives against the validation set's 0.41, and
    in round 6 leaving out hospital 04 or 06 (0.61, pointing with both directions) lowered
    the validation log-loss by 0.005 and 0.006 (p 4e-6 and 2e-6; flagged on that alone).
    Seeds 2 and 7 flagged the same hospitals the same way in the thirteenth version.
    """
    scores = [findings[name].extra["z"] for name in DIRECTIONS if name in findings and "z" in findings[name].extra]
    if not scores:
        return np.zeros(len(next(iter(findings.values())).p_values), dtype=bool)
    return np.all([np.isfinite(z) & (z < 0) for z in scores], axis=0)
