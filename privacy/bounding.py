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


#: Rows one exact integer sum may add up (a public engine limit: 2**39, about 550 billion).
MAX_SUM_ROWS = 2**39
#: Largest |value| of one row, in units of the resolution, whose sums over ``MAX_SUM_ROWS``
#: rows stay within 2**62: exact in int64 with as much room again for the noise.
MAX_ROW_UNITS = 2**62 // MAX_SUM_ROWS


def quantized_bound(lower: float, upper: float, resolution: float) -> int:
    """Largest absolute value, in units of ``resolution``, of a clipped value."""
    return math.ceil(max(abs(lower), abs(upper)) / resolution)


def fits_exact_sum(lower: float, upper: float, resolution: float) -> bool:
    """Whether sums of values clipped to ``[lower, upper]`` at ``resolution`` can never overflow int64."""
    units = max(abs(lower), abs(upper)) / resolution
    return math.isfinite(units) and units <= MAX_ROW_UNITS


def coarsest_needed(lower: float, upper: float) -> float:
    """The finest power-of-ten resolution whose sums over ``[lower, upper]`` cannot overflow."""
    return 10.0 ** math.ceil(math.log10(max(abs(lower), abs(upper)) / MAX_ROW_UNITS))


def alpha_fraction(alpha: float) -> Fraction:
    """The quantile level as an exact fraction with a small denominator."""
    return Fraction(alpha).limit_denominator(1000)


def quantile_sensitivity(alpha: float, contributions: int) -> int:
    """L-infinity sensitivity of :func:`quantile_scores` when a person adds or removes up to ``contributions`` rows."""
    a = alpha_fraction(alpha)
    return contributions * max(a.numerator, a.denominator - a.numerator)


def quantile_scores(below: np.ndarray, above: np.ndarray, alpha: float,
                    total: int | None = None) -> np.ndarray:
    """Integer scores (lower is better) of candidates as the ``alpha`` quantile.

    ``below[j]`` and ``above[j]`` count the values ranked strictly before and strictly
    after candidate j; the other ``total - below[j] - above[j]`` values are tied with it
    (``total`` defaults to ``below + above``: no ties). With level ``num/den`` and
    ``n = total``, candidate j covers the ranks ``below[j] .. n - above[j]`` and scores
    how far ``num/den * n`` lies outside them::

        max(den * below - num * n,  den * above - (den - num) * n,  0)

    Zero when the level's rank is among the candidate's; without ties this is
    ``|(den - num) * below - num * above|``. Sensitivity: one row more adds 1 to ``n``
    and to at most one of ``below``/``above``, so the first term moves by ``den - num``
    or ``-num``, the second by ``num`` or ``-(den - num)``, and their maximum with 0 by
    at most ``max(num, den - num)`` (a maximum is 1-Lipschitz): see
    :func:`quantile_sensitivity`. The bound is attained (a row below a candidate whose
    first term is the largest moves its score by ``den - num``).
    """
    a = alpha_fraction(alpha)
    num, den = a.numerator, a.denominator
    below = np.asarray(below, dtype=np.int64)
    above = np.asarray(above, dtype=np.int64)
    n = below + above if total is None else np.int64(total)
    return np.maximum(np.maximum(den * below - num * n, den * above - (den - num) * n), 0)


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


def top_count_scores(counts_by_bound: list[np.ndarray], top: int, noise: list[int]) -> np.ndarray:
    """Integer scores (lower is better) of candidate bounds by how well the top counts clear the noise.

    ``counts_by_bound[p][:, j]`` holds the exact bounded counts of every cell (e.g. every
    catalogue pair) of period p under candidate bound j, and ``noise[j]`` a public integer
    noise level for that bound (it depends on the bound, the loss and the number of cells
    only). Candidate j scores ``noise[j] - min over periods of the top-th largest count``:
    the best bound lifts the top-th count furthest above the noise that bound brings.

    Sensitivity (see :data:`TOP_COUNT_SENSITIVITY`): for a fixed bound, adding or removing
    one person moves each bounded count by 0 or 1, all in the same direction, and no one
    else's contribution (the bound's rule uses the person's own rows only). An order
    statistic of a vector whose entries each move by at most 1 moves by at most 1 (the
    top-th largest of ``x`` and of ``x + d``, ``0 <= d <= 1``, differ by at most 1), and so
    does a minimum over periods of such statistics. The noise term is public, so every
    score moves by at most 1.
    """
    if not counts_by_bound or not 1 <= top <= counts_by_bound[0].shape[0]:
        raise ValueError(f"top must be between 1 and the number of cells, got {top}")
    kth = np.min([np.partition(c, -top, axis=0)[-top] for c in counts_by_bound], axis=0)
    return np.asarray(noise, dtype=np.int64) - kth.astype(np.int64)


#: L-infinity sensitivity of :func:`top_count_scores` (one person, any number of pairs).
TOP_COUNT_SENSITIVITY = 1
