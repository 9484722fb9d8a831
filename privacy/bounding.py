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


#: How far above the dataset's bound ``auto`` may look: candidates 1..AUTO_REACH * L_fixed.
AUTO_REACH = 4
#: Pull toward the dataset's bound: a candidate L pays ``AUTO_PULL * resolution * |L - L_fixed|
#: / L_fixed`` people of score, so the data must outweigh that before auto moves far.
AUTO_PULL = 2


def auto_candidates(fixed: int, limit: int, upward: bool) -> list[int]:
    """Public candidate bounds of ``"contributions": "auto"``: every L from 1 to the top.

    The top is ``min(limit, AUTO_REACH * fixed)`` when the kind may raise the bound, else
    ``fixed`` itself (means and quantiles only lower it). Every integer is a candidate, so
    the bound that minimises the predicted error is always among them (the worst case in
    :func:`auto_worst_case` relies on that).
    """
    top = min(limit, AUTO_REACH * fixed) if upward else min(limit, fixed)
    return list(range(1, max(top, 1) + 1))


def bound_scores(people_with_at_least: np.ndarray, candidates: list[int], target_above: float,
                 fixed: int, resolution: float = 0.0, upward: bool = True) -> np.ndarray:
    """Integer scores (lower is better, quarter-person units) of candidate bounds for ``auto``.

    ``people_with_at_least[r - 1]`` is the number of people with at least r kept rows
    (on the rows the query keeps: after its filters and dropping missing values), for
    r = 1..max(candidates)+1. With ``n_r`` that profile, the query's predicted error at
    bound L is ``E(L) = sum_{r > L} n_r + t * L`` (``t = target_above``: rows dropped by
    the bound, weighted as the kind's bias, plus noise that grows by t per unit of L), a
    convex function of L; its minimisers are the L with ``n_{L+1} <= t <= n_L``.

    Candidate L scores the distance from t to the interval ``[n_{L+1}, n_L]`` (zero
    exactly at the minimisers), plus a public pull toward the dataset's bound ``fixed``:
    ``ceil(AUTO_PULL * resolution * |L - fixed| / fixed)`` people (``resolution``: the
    selection's own error, so moving far needs evidence well beyond it). When the kind
    only lowers the bound (``upward`` false), the top candidate ``fixed`` needs only
    ``t <= n_fixed``.

    Sensitivity (:data:`BOUND_SCORE_SENSITIVITY`): adding or removing one person changes
    every ``n_r`` by 0 or 1 (the person's rows are ranked among their own rows only), so
    both ends of every interval move by at most one person, and the distance from a fixed
    point to an interval moves by at most the largest move of its ends. The pull is
    public. Scores are in quarter people (t rounded to a quarter), so they move by at most 4.
    """
    n = np.asarray(people_with_at_least, dtype=np.int64)
    bounds = np.asarray(candidates, dtype=np.int64)
    above = 4 * n[bounds]  # 4 * n_{L+1}
    at = 4 * n[bounds - 1]  # 4 * n_L
    target = int(round(4 * target_above))
    gap = np.maximum(above - target, 0)
    if not upward:
        gap = np.where(bounds == fixed, 0, gap)  # the top candidate: no bound above it to compare with
    distance = gap + np.maximum(target - at, 0)
    pull = np.ceil(4 * AUTO_PULL * resolution * np.abs(bounds - fixed) / fixed).astype(np.int64)
    return distance + pull


#: Sensitivity of :func:`bound_scores` (scores are in quarter-person units).
BOUND_SCORE_SENSITIVITY = 4


def auto_worst_case(ratio: float, fixed: int, top: int, upward: bool) -> float:
    """Worst excess of ``auto``'s predicted error over the dataset's bound, as a share of the latter.

    ``ratio`` is rho = tau / t: the selection's error tau (people; the exponential
    mechanism's score error at the query's confidence, over the candidates) over the
    break-even t of :func:`bound_scores`. With probability at least that confidence the
    chosen L has ``score(L) <= min score + tau`` and then

        E(L) <= (1 + w) * E(fixed),

    with w returned here. Lowering only (means, quantiles): ``w = rho``. Raising too
    (candidates up to ``top``, pull k = AUTO_PULL):
    ``w = max(rho * max(k, (1 + k)^2 / (4k)), 1 / k,
    fixed / (top + 1 - fixed), rho * (fixed + k * (top - fixed)) / (top + 1))``:
    the first term when t lies within the profile, the second when fewer people than t
    have rows at all, the last two when more than t people have more than ``top`` rows.
    See :mod:`civicdp.queries.auto_bound` for the derivation.
    """
    if not upward or top <= fixed:
        return ratio
    k = AUTO_PULL
    within = ratio * max(k, (1 + k) ** 2 / (4 * k))
    few = 1 / k
    heavy = max(fixed / (top + 1 - fixed), ratio * (fixed + k * (top - fixed)) / (top + 1))
    return max(within, few, heavy)


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
