"""Label shift between hospitals: prevalence offsets on the logit scale. Pure maths."""

from __future__ import annotations

import math


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def prior_shift_offset(*, local_positive: int, local_total: int, reference_prevalence: float) -> float:
    """Logit offset turning P(y|x) under the reference prior into P(y|x) under the local one.

    Under label shift (P(x|y) shared, P(y) not), Bayes' rule gives
    logit P_local(y|x) = logit P_ref(y|x) + logit p_local - logit p_ref. The local
    prevalence is Laplace-smoothed, so a hospital with only positives stays finite.
    """
    local = (local_positive + 1) / (local_total + 2)
    return logit(local) - logit(reference_prevalence)
