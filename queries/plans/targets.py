"""The cheapest mechanisms of one part (or one shared group) for its target, from public parameters only.

- counts, histograms, sums: the noise whose (1 - alpha) half-width per cell is the target
  (OpenDP's accuracy-to-scale, as a query with ``accuracy`` gets today);
- means: a noisy centred sum and a noisy count, as the ``mean`` kind releases them, with the
  stated interval ``(sum ± hs) / (count ∓ hc)`` at most the target for every group of at
  least ``min_rows`` rows wherever its mean lies. The two half-widths are chosen together:
  the pair of least total budget (1-D search over the count's half-width), not an even split;
- quantiles: each level's exponential selection whose released value lies within the target
  rows of rank of the exact quantile (at error ``alpha * SELECTION_ALPHA``), and one tree of
  counts for all levels' intervals, at the budget of the most demanding level, with tests at
  the remaining error (the value is clamped into its interval, so both must hold).
"""

from __future__ import annotations

import math
from statistics import NormalDist

from civicdp.privacy import accuracy
from civicdp.privacy.bounding import alpha_fraction, quantile_sensitivity
from civicdp.privacy.accounting import Additive
from civicdp.privacy.mechanisms import _EXACT_GAUSSIAN_SCALE, GaussianVector, NoisyMin
from civicdp.privacy.planning import accuracy_exponent, relative_cost
from civicdp.queries.context import QueryContext, sum_units
from civicdp.queries.errors import QueryError
from civicdp.queries.kinds import KINDS
from civicdp.queries.kinds.base import Calibration
from civicdp.queries.kinds.statistics import value_bounds
from civicdp.queries.plans.spec import Target

#: Share of a quantile part's error allowed to its value's selection; the rest to its interval's tests.
SELECTION_ALPHA = 0.9
#: Points of the 1-D search for a mean's split (the optimum is flat: 400 points is within 0.1%).
_SPLIT_POINTS = 400


def needs(ctx: QueryContext, target: Target) -> None:
    """Refuse a target that does not fit the part's aggregate, naming the field and the fix."""
    aggregate = ctx.spec.aggregate
    if aggregate in ("count", "sum", "histogram"):
        if target.half_width is None:
            raise QueryError("accuracy.half_width", f"a {aggregate}'s target is a half-width",
                             'E.g. "accuracy": {"half_width": 50}')
    elif aggregate == "mean":
        if target.min_rows is None or (target.half_width is None) == (target.relative is None):
            raise QueryError("accuracy", "a mean's target is a half_width (or a relative share of its bounds) "
                             "for groups of at least min_rows rows, because its accuracy depends on the "
                             "private group sizes", 'E.g. "accuracy": {"half_width": 5, "min_rows": 1000}')
    elif aggregate == "quantiles":
        if target.rank_half_width is None:
            raise QueryError("accuracy.rank_half_width", "a quantile's accuracy in value units depends on the "
                             "private data; its target is in rows of rank",
                             'E.g. "accuracy": {"rank_half_width": 100}')


def for_target(ctx: QueryContext, contributions: int, target: Target) -> Calibration:
    """The part's mechanisms meeting ``target`` (one quantile context may hold several levels' targets)."""
    needs(ctx, target)
    aggregate = ctx.spec.aggregate
    if aggregate == "mean":
        return mean_for_target(ctx, contributions, target)
    if aggregate == "quantiles":
        return quantiles_for_targets(ctx, contributions, {q: target for q in ctx.spec.quantiles or ()})
    half = float(target.half_width)  # type: ignore[arg-type]
    if aggregate == "sum":
        lo, hi = value_bounds(ctx)
        resolution = ctx.column.value_resolution  # type: ignore[union-attr]
        if half < resolution:
            raise QueryError("accuracy.half_width", f"below the column's resolution {resolution:g}",
                             f"Ask for a half-width of at least {resolution:g}")
        units = sum_units(str(ctx.spec.column), lo, hi, resolution)
        return Calibration(contributions, {"sums": additive_for(ctx, contributions * units, half / resolution, ctx.alpha)})
    if half < 1:
        raise QueryError("accuracy.half_width", "counts are whole numbers, so a half-width below 1 cannot be promised",
                         "Ask for a half-width of at least 1")
    return Calibration(contributions, {"counts": additive_for(ctx, contributions, half, ctx.alpha)})


def additive_for(ctx: QueryContext, sensitivity: int, half_width: float, alpha: float) -> Additive:
    """The noise whose (1 - alpha) half-width per cell is at most ``half_width`` (in units of the answer).

    Large discrete Gaussian scales are sized in closed form: OpenDP's exact accuracy sums the
    distribution (minutes at scales of 10^6), while ``GaussianVector.accuracy`` states
    ``ceil(scale * z)`` there, a true half-width (see its docstring).
    """
    accounting = ctx.accounting
    if accounting.zcdp:
        z = NormalDist().inv_cdf(1 - alpha / 2)
        scale = (half_width - 1) / z
        if scale > _EXACT_GAUSSIAN_SCALE:
            mechanism = GaussianVector(float(sensitivity), scale, accounting.delta)
            assert mechanism.accuracy(alpha) <= half_width
            return mechanism
    return accounting.additive_for_accuracy(sensitivity, half_width, alpha)


def mean_half_width(ctx: QueryContext, calibration: Calibration, min_rows: int) -> float:
    """The widest stated half-width of a mean over a group of ``min_rows`` rows, wherever its mean lies.

    The interval is the corner interval clipped to the bounds (``accuracy.ratio``); its
    widest side is ``max(hs / (n - hc), (spread * hc + hs) / n)`` in closed form, checked
    here on a grid of means and at the closed form's point.
    """
    lo, hi = value_bounds(ctx)
    middle, spread = (lo + hi) / 2, (hi - lo) / 2
    resolution = ctx.column.value_resolution  # type: ignore[union-attr]
    sum_half = calibration.mechanisms["sums"].accuracy(ctx.alpha / 2) * resolution
    count_half = calibration.mechanisms["counts"].accuracy(ctx.alpha / 2)
    if count_half >= min_rows:
        return math.inf  # the count could be zero: the interval is the whole range
    turn = (spread * (min_rows - count_half) - sum_half) / min_rows  # where the clipped side stops binding
    worst = 0.0
    for centred in [spread * i / 200 for i in range(-200, 201)] + [turn, -turn]:
        if not -spread <= centred <= spread:
            continue
        interval = accuracy.ratio(centred * min_rows, sum_half, min_rows, count_half, -spread, spread)
        worst = max(worst, centred - interval.low, interval.high - centred)
    return worst


def mean_target(ctx: QueryContext, target: Target) -> float:
    lo, hi = value_bounds(ctx)
    return target.half_width if target.half_width is not None else target.relative * (hi - lo)  # type: ignore[operator]


def mean_for_target(ctx: QueryContext, contributions: int, target: Target) -> Calibration:
    """A centred sum and a count whose mean interval meets the target at ``min_rows`` rows, least budget."""
    lo, hi = value_bounds(ctx)
    middle, resolution = (lo + hi) / 2, ctx.column.value_resolution  # type: ignore[union-attr]
    units = sum_units(str(ctx.spec.column), lo - middle, hi - middle, resolution)
    h, n, spread = mean_target(ctx, target), int(target.min_rows or 1), (hi - lo) / 2
    p = accuracy_exponent(ctx.accounting.zcdp)
    # The widest side (mean_half_width): max(hs / (n - hc), (spread hc + hs) / n) <= h.
    top = h * n / spread
    best: tuple[float, float, float] | None = None
    for i in range(1, _SPLIT_POINTS):
        count_half = top * i / _SPLIT_POINTS
        sum_half = min(h * n - spread * count_half, h * (n - count_half))
        if count_half < 1 or sum_half < resolution:
            continue
        cost = relative_cost(sum_half / resolution, contributions * units, p) + relative_cost(count_half, contributions, p)
        if best is None or cost < best[0]:
            best = (cost, sum_half, count_half)
    if best is None:
        raise QueryError("accuracy", f"a mean within ±{h:g} for groups of {n} rows cannot be promised: "
                         "the noise of whole-number counts alone is wider", "Ask for a wider half_width or more min_rows")
    for shrink in (1.0, 0.999, 0.99, 0.97, 0.9, 0.8):  # the conversions round; tighten until the stated interval fits
        calibration = Calibration(contributions, {
            "sums": additive_for(ctx, contributions * units, max(1.0, best[1] * shrink / resolution), ctx.alpha / 2),
            "counts": additive_for(ctx, contributions, max(1.0, best[2] * shrink), ctx.alpha / 2),
        })
        if mean_half_width(ctx, calibration, n) <= h:
            return calibration
    raise QueryError("accuracy", f"could not calibrate a mean within ±{h:g}", "Ask for a wider half_width")


def selection_scale(level: float, candidates: int, rank_half_width: float, alpha: float) -> float:
    """Scale of the exponential selection whose value is within ``rank_half_width`` rows of rank at ``alpha``."""
    # score_error = scale ln(m / alpha) (NoisyMin.score_error) and one row of rank is `den` score units.
    return rank_half_width * alpha_fraction(level).denominator / math.log(max(candidates, 1) / alpha)


def quantiles_for_targets(ctx: QueryContext, contributions: int, targets: dict[float, Target]) -> Calibration:
    """Every level's selection for its rank target, and one shared tree of counts for the intervals."""
    kind = KINDS["quantiles"]
    m = len(kind.grid(ctx))  # type: ignore[attr-defined]
    accounting = ctx.accounting
    delta = accounting.delta if accounting.zcdp else None
    mechanisms: dict = {}
    budgets = []
    for level in ctx.spec.quantiles or ():
        target = targets[level]
        alpha = (1 - target.confidence) * SELECTION_ALPHA
        scale = selection_scale(level, m, float(target.rank_half_width), alpha)  # type: ignore[arg-type]
        selector = NoisyMin(quantile_sensitivity(level, contributions), scale, delta)
        mechanisms[f"q{level:g}"] = selector
        budgets.append(accounting.amount(selector.loss))
    if ctx.spec.intervals:
        depth = kind.tree(ctx).depth  # type: ignore[attr-defined]
        mechanisms = {"cdf": accounting.additive(contributions * depth, max(budgets),
                                                 l2_sensitivity=contributions * math.sqrt(depth)), **mechanisms}
    return Calibration(contributions, mechanisms)


def interval_confidence(confidence: float) -> float:
    """The confidence a quantile part's intervals are stated at, so value and interval together hold at ``confidence``."""
    return 1 - (1 - confidence) * (1 - SELECTION_ALPHA)
