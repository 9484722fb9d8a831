"""``"contributions": "auto"``: the contribution bound chosen privately for the query at hand.

The rule. For a query, ``n_r`` is the number of people with at least r rows among the
rows the query keeps (after its filters, and after dropping rows whose measured value is
missing when the column is nullable: exactly the rows the bound is applied to). The
query's predicted error at bound L, summed over its cells, is

    E(L) = (bias of the rows the bound drops) + (noise of the answer at L)
         = b * sum_{r > L} n_r + c * L

where ``c * L`` is the half-width of the answer's own stated interval (the kind's
``predicted`` accuracy, summed over cells; it grows linearly with L) and ``b`` the most
one dropped row can move the answer (one row for counts and histograms, the largest
|value| for sums, the width of the bounds for a mean, ``max(q, 1 - q)`` rows of rank for
a quantile at level q). Dividing by b, ``E(L) / b = sum_{r > L} n_r + t * L`` with the
break-even ``t = c / b``: raising L by one keeps ``n_{L+1}`` more rows and adds t to the
noise. E is convex (n_r only falls as r grows) and minimal at the L with
``n_{L+1} <= t <= n_L``. Candidates are every L from 1 to ``AUTO_REACH`` times the
dataset's bound L_f; :func:`civicdp.privacy.bounding.bound_scores` scores each by how far t lies
from ``[n_{L+1}, n_L]`` (zero at the minimisers; one person moves it by at most one
person) plus a public pull toward L_f, and the exponential mechanism (OpenDP's
permute-and-flip) picks one with the query's auto share of the loss (10% by default).

Means and quantiles only lower the bound (candidates 1..L_f). Their truncation bias is
not the rows dropped but how differently those rows look, which the profile cannot tell
and the selection's share of the loss cannot measure (one person with many rows moves
such a measurement as much as the whole noise being weighed). Lowering is safe to judge:
dropping the rows between L and L_f changes a mean by at most their share times the width
of the bounds (a quantile's rank by at most their number times ``max(q, 1 - q)``), so with
E counting only those rows, the real error at L exceeds the real error at L_f by at most
E(L) - E(L_f). Raising is not: its noise is certain and its gain may be nil.

The worst case. Let tau be the selection's error at the query's confidence (with
probability at least that confidence the chosen score is within tau of the best; tau =
``scale * ln(candidates / alpha)`` people) and ``rho = tau / t``. Then, with at least that
probability, ``E(L) <= (1 + w) * E(L_f)`` with ``w`` from
:func:`civicdp.privacy.bounding.auto_worst_case`: ``w = rho`` when only lowering; when raising too,
``w = max(2 rho, 1/2, ...)`` (the 1/2: a table with fewer people than t, where every bound
above L_f looks alike to the selection and only the pull holds it within 1.5 L_f). Proof
sketch: if the chosen L has ``score(L) <= sigma`` then every r between L_f and L has
``|n_r - t| <= sigma`` on the side that matters, so ``|E(L) - E(L_f)| <= |L - L_f| * sigma``;
the pull bounds ``|L - L_f|`` and the best candidate's score, and ``E(L_f) >= t * L_f``
(its noise alone), more when it drops rows. A query whose worst case would exceed
:data:`MAX_WORST` (the selection too coarse for it: few cells, or a small share of the
loss) first drops to lowering only, and if even that is too coarse, ``auto`` keeps L_f,
spends the whole loss on the answer and says so in the notes. The decision uses public
numbers only (kind, cells, loss, confidence, metadata), never the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from civicdp.privacy.bounding import BOUND_SCORE_SENSITIVITY, auto_candidates, auto_worst_case, bound_scores
from civicdp.privacy.mechanisms import NoisyMin
from civicdp.queries.context import QueryContext
from civicdp.queries.kinds.base import Calibration, Kind
from civicdp.queries.kinds.statistics import value_bounds

#: Largest worst case accepted: auto's predicted error at most (1 + MAX_WORST) times the fixed bound's.
MAX_WORST = 1.0


@dataclass(frozen=True)
class Model:
    """A kind's predicted-error model for the auto bound: break-even t and direction."""

    kind: str
    target: float  # t: people above L at which one more row per person costs as much noise as it saves bias
    upward: bool  # whether the kind may raise the bound above the dataset's
    unit: str  # what one dropped row can move: the bias unit, for the notes


@dataclass(frozen=True)
class AutoBound:
    """The public part of an auto bound: candidates, model, the selection and its worst case."""

    fixed: int
    candidates: tuple[int, ...]
    model: Model | None
    selector: NoisyMin | None  # None: auto fell back to the fixed bound
    resolution: float = math.nan  # tau, people
    worst: float = math.nan  # w: E(chosen) <= (1 + w) E(fixed) at the query's confidence
    reason: str = ""  # why auto fell back (empty when it runs)

    @property
    def top(self) -> int:
        return self.candidates[-1]

    @property
    def upward(self) -> bool:
        return self.top > self.fixed

    @property
    def ratio(self) -> float:
        return self.resolution / self.model.target if self.model else math.inf

    def scores(self, people_with_at_least: np.ndarray) -> np.ndarray:
        """Integer scores of the candidates (quarter people) from the query's contribution profile."""
        assert self.model is not None
        return bound_scores(people_with_at_least, list(self.candidates), self.model.target, self.fixed,
                            self.resolution if self.upward else 0.0, self.upward)

    def describe(self) -> str:
        """The rule as it applies to this query, for the answer's notes."""
        assert self.model is not None
        direction = f"bounds 1 to {self.top}"
        if self.model.kind in ("mean", "quantiles"):
            direction += (f" (a {self.model.kind.rstrip('s')} only lowers the dataset's bound: its truncation "
                          "bias is not the rows dropped but how they differ, which the selection cannot measure)")
        return (f"the bound minimises this query's predicted error - rows dropped (each moving the answer "
                f"by at most {self.model.unit}) plus the noise, which grows by {self.model.target:.4g} of them "
                f"per row of bound - over {direction}, counted on the rows its filters and missing values "
                f"keep; worst case: at most {1 + self.worst:.3g} times the predicted error of the dataset's "
                f"bound of {self.fixed} (at the query's confidence)")


def model(kind: Kind, ctx: QueryContext, calibration: Calibration) -> Model | None:
    """The kind's break-even t, from its own predicted accuracy at the fixed bound (linear in L)."""
    bound = calibration.contributions
    predicted: dict[str, Any] = kind.predicted(ctx, calibration)
    if kind.name in ("count", "histogram"):
        # Every released entry (cell, or cell x bin) carries the half-width; a dropped row is one row.
        return Model(kind.name, predicted["cells"] * predicted["half_width"] / bound, True, "one row")
    if kind.name == "sum":
        lo, hi = value_bounds(ctx)
        largest = max(abs(lo), abs(hi))
        return Model(kind.name, predicted["cells"] * predicted["half_width"] / bound / largest, True,
                     f"{largest:g} (the largest |value|)")
    if kind.name == "mean":
        # Noise: the sum's half-width (the count's adds |mean - middle| times its own; at least
        # zero, so leaving it out never overstates what lowering saves). Bias: the bounds' width.
        lo, hi = value_bounds(ctx)
        return Model(kind.name, ctx.n_cells * predicted["sum_half_width"] / bound / (hi - lo), False,
                     f"{hi - lo:g} (the width of the bounds) over the rows kept")
    if kind.name == "quantiles":
        levels = ctx.spec.quantiles or ()
        rank_errors = predicted["rank_error"]
        noise = sum(rank_errors[f"{level:g}"] for level in levels) / bound
        bias = sum(max(level, 1 - level) for level in levels)
        return Model(kind.name, ctx.n_cells * noise / bias, False, "max(q, 1 - q) rows of rank")
    return None


def plan(kind: Kind, ctx: QueryContext, calibration: Calibration, selector: NoisyMin) -> AutoBound:
    """The auto bound of a query, from public numbers only; ``selector`` is None when it falls back.

    ``calibration`` is the query's mechanisms at the dataset's bound with the loss left
    after the selection's share; ``selector`` the selection that share buys.
    """
    metadata = ctx.metadata
    fixed, limit = metadata.row_limit(ctx.spec.table), metadata.max_contributions_limit
    found = model(kind, ctx, calibration)
    if found is None:
        return AutoBound(fixed, (fixed,), None, None,
                         reason=f"auto has no error model for a {kind.name}, so the dataset's bound is kept")
    if not (math.isfinite(found.target) and found.target > 0):
        return AutoBound(fixed, (fixed,), found, None, reason="the noise model of this query is degenerate")
    best: AutoBound | None = None
    for upward in ((True, False) if found.upward else (False,)):
        candidates = tuple(auto_candidates(fixed, limit, upward))
        tau = selector.score_error(len(candidates), ctx.alpha) / BOUND_SCORE_SENSITIVITY
        worst = auto_worst_case(tau / found.target, fixed, candidates[-1], upward)
        best = AutoBound(fixed, candidates, found, selector, tau, worst)
        if worst <= MAX_WORST:
            return best
    assert best is not None
    return AutoBound(fixed, (fixed,), found, None, best.resolution, best.worst,
                     reason=(f"with {ctx.n_cells} group(s) and this loss, a private choice from the auto "
                             f"share could not tell bounds apart safely (its error, {best.resolution:.4g} "
                             f"people, is {best.ratio:.3g} times the break-even {found.target:.4g}); "
                             f"the dataset's bound of {fixed} rows per person is kept and the whole loss "
                             "answers the query"))
