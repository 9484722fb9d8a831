"""Quantiles over a public candidate grid, by the exponential mechanism.

For each group and quantile level, every candidate gets an integer score from the
counts of kept values below and above it (zero at the exact quantile); OpenDP's
permute-and-flip selection releases a low-scoring candidate. With L rows per person
a score moves by at most ``L * max(num, den - num)`` (level = num/den). The loss of
one level is charged once for all groups: the map is linear in the rows a person
has in a group, and those rows sum to at most L across groups.

Accuracy is stated in rows of rank: with the stated confidence, the released value
is a candidate whose position among the group's kept values is within
``rank_error`` rows of the exact quantile's position (plus the grid's spacing).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from privacy.bounding import alpha_fraction, quantile_scores, quantile_sensitivity
from privacy.mechanisms import NoisyMin
from queries.backend import Measure
from queries.context import QueryContext
from queries.errors import QueryError
from queries.kinds.base import Calibration, Kind, cell_positions, output, register
from queries.kinds.statistics import value_bounds

DEFAULT_CANDIDATES = 1000
MAX_CANDIDATES = 100_000


class Quantiles(Kind):
    name = "quantiles"
    uses = frozenset({"bounds", "quantiles", "candidates"})

    def check(self, ctx: QueryContext) -> None:
        super().check(ctx)
        levels = ctx.spec.quantiles
        if not levels:
            raise QueryError("quantiles", "list the quantile levels to compute", "E.g. [0.5, 0.9]")
        if any(not (math.isfinite(q) and 0 < q < 1) for q in levels) or len(set(levels)) != len(levels):
            raise QueryError("quantiles", "levels must be distinct numbers strictly between 0 and 1",
                             "E.g. [0.5, 0.9]")
        if ctx.spec.accuracy is not None:
            raise QueryError("accuracy", "a quantile's accuracy in value units depends on the private "
                             "data", "Ask with 'epsilon'")
        lo, hi = value_bounds(ctx)
        grid = self.grid(ctx)
        if len(grid) > MAX_CANDIDATES:
            raise QueryError("candidates", f"{len(grid)} candidates is more than {MAX_CANDIDATES}",
                             "Use a coarser grid")
        if any(not math.isfinite(c) for c in grid) or any(a >= b for a, b in zip(grid, grid[1:])):
            raise QueryError("candidates", "candidates must be finite and strictly increasing",
                             'E.g. {"start": 0, "stop": 60, "step": 0.5}')
        if grid[0] < lo or grid[-1] > hi:
            raise QueryError("candidates", f"candidates must lie within the bounds [{lo:g}, {hi:g}]",
                             "Narrow the grid")

    def grid(self, ctx: QueryContext) -> list[float]:
        candidates = ctx.spec.candidates
        if candidates is None:
            lo, hi = value_bounds(ctx)
            step = (hi - lo) / DEFAULT_CANDIDATES
            return [lo + i * step for i in range(DEFAULT_CANDIDATES + 1)]
        if isinstance(candidates, tuple):
            return [float(c) for c in candidates]
        if not (math.isfinite(candidates.step) and candidates.step > 0 and candidates.stop >= candidates.start):
            raise QueryError("candidates", "a grid needs start <= stop and a positive step",
                             'E.g. {"start": 0, "stop": 60, "step": 0.5}')
        if (candidates.stop - candidates.start) / candidates.step > MAX_CANDIDATES:
            raise QueryError("candidates", f"the grid has more than {MAX_CANDIDATES} candidates",
                             "Use a larger step")
        return candidates.values()

    def calibrate(self, ctx: QueryContext, contributions: int, epsilon: float | None) -> Calibration:
        assert epsilon is not None
        levels = ctx.spec.quantiles or ()
        share = epsilon / len(levels)
        return Calibration(contributions, {
            f"q{level:g}": NoisyMin.for_epsilon(quantile_sensitivity(level, contributions), share)
            for level in levels
        })

    def measure(self, ctx: QueryContext) -> Measure:
        lo, hi = value_bounds(ctx)
        return Measure("grid", ctx.spec.column, lower=lo, upper=hi, grid=tuple(self.grid(ctx)))

    def release(self, ctx: QueryContext, calibration: Calibration, exact: pl.DataFrame) -> pl.DataFrame:
        grid = np.asarray(self.grid(ctx))
        m = len(grid)
        positions = cell_positions(ctx, exact, 2 * m + 1)
        # below[j]: values < grid[j] (positions <= 2j); above[j]: values > grid[j] (positions > 2j + 1)
        cumulative = np.cumsum(positions, axis=1)
        below = cumulative[:, 0 : 2 * m : 2]
        above = cumulative[:, -1:] - cumulative[:, 1 : 2 * m + 1 : 2]
        levels = ctx.spec.quantiles or ()
        values, level_col, rank_errors = [], [], []
        for cell in range(ctx.n_cells):
            for level in levels:
                mechanism = calibration.mechanisms[f"q{level:g}"]
                index = mechanism.release(quantile_scores(below[cell], above[cell], level).tolist())
                values.append(float(grid[index]))
                level_col.append(level)
                rank_errors.append(self._rank_error(mechanism, level, m, ctx.alpha))
        none = [None] * len(values)
        return output(ctx, {"quantile": level_col, "value": values, "ci_low": none, "ci_high": none,
                            "rank_error": rank_errors}, repeat=len(levels))

    @staticmethod
    def _rank_error(mechanism: NoisyMin, level: float, candidates: int, alpha: float) -> float:
        # Moving one row across a candidate changes its score by the level's denominator.
        return mechanism.score_error(candidates, alpha) / alpha_fraction(level).denominator

    def predicted(self, ctx: QueryContext, calibration: Calibration) -> dict[str, Any]:
        m = len(self.grid(ctx))
        return {
            "rank_error": {f"{level:g}": self._rank_error(calibration.mechanisms[f"q{level:g}"],
                                                          level, m, ctx.alpha)
                           for level in ctx.spec.quantiles or ()},
            "unit": "rows of rank", "candidates": m, "cells": ctx.n_cells,
        }


register(Quantiles())
