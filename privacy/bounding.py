"""Contribution bounding: the public rules that fix each person's influence.

Every query keeps at most ``L`` rows per person (the contribution bound) and clips
values to public bounds, so sensitivities follow from public parameters alone. This
module holds the arithmetic of those rules: the sensitivities they imply, the
integer scores for private quantiles over a public candidate grid, and the scores
for choosing ``L`` itself privately.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def quantized_bound(lower: float, upper: float, resolution: float) -> int:
    """Largest absolute value, in units of ``resolution``, of a clipped value."""
    return math.ceil(max(abs(lower), abs(upper)) / resolution)


def alpha_fraction(alpha: float) -> Fraction:
    """The quantile level as an exact fraction with a small denominator."""
    return Fraction(alpha).limit_denominator(1000)


def quantile_sensitivity(alpha: float, contributions: int) -> int:
    """L-infinity sensitivity of :func:`quantile_scores` when a person adds or removes up to ``contributions`` rows."""
    a = alpha_fraction(alpha)
    return contributions * max(a.numerator, a.denominator - a.numerator)


def quantile_scores(below: np.ndarray, above: np.ndarray, alpha: float) -> np.ndarray:
    """Integer scores (lower is better) of candidates as the ``alpha`` quantile.

    ``below[j]`` and ``above[j]`` count values strictly below and above candidate j.
    The score ``|(1 - alpha) * below - alpha * above|`` (scaled to integers) is zero at
    the exact quantile and grows by at most ``max(alpha, 1 - alpha)`` per row.
    """
    a = alpha_fraction(alpha)
    num, den = a.numerator, a.denominator
    return np.abs((den - num) * below.astype(np.int64) - num * above.astype(np.int64))


def bound_candidates(limit: int) -> list[int]:
    """Public candidate bounds: every L up to 16, then about 12% apart up to ``limit``.

    A short, geometric list keeps the selection sharp: with hundreds of candidates in
    a flat tail, their combined weight could outvote the best one at small epsilon.
    """
    candidates = set(range(1, min(limit, 16) + 1))
    value = 16.0
    while value < limit:
        value *= 1.12
        candidates.add(min(limit, round(value)))
    return sorted(candidates)


def bound_scores(people_with_at_least: np.ndarray, candidates: list[int], target_above: float) -> np.ndarray:
    """Scores of candidate bounds L (lower is better) for a private choice of L.

    ``people_with_at_least[r - 1]`` is the number of people with at least r rows, for
    r = 1..max(candidates)+1. Candidate L scores ``|#people with more than L rows -
    target_above|`` (in quarter-person units, to keep scores integral); one person
    changes every score by at most one person. Choosing L so that about
    ``target_above`` people exceed it balances the rows lost to truncation (bias)
    against noise that grows with L.
    """
    exceed = people_with_at_least[np.asarray(candidates)].astype(np.int64)  # index L is r = L + 1
    return np.abs(exceed * 4 - round(target_above * 4))


#: Sensitivity of :func:`bound_scores` (scores are in quarter-person units).
BOUND_SCORE_SENSITIVITY = 4
