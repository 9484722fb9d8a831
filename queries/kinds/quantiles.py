"""Quantiles over a public candidate grid, by the exponential mechanism.

For each group and quantile level, every candidate gets an integer score from the
counts of kept values below and above it (zero at the exact quantile); OpenDP's
permute-and-flip selection releases a low-scoring candidate. With L rows per person a
score moves by at most ``L * max(num, den - num)`` (level = num/den). The loss of one
selection is charged once for all groups: the map is linear in the rows a person has
in a group, and those rows sum to at most L across groups.

Value intervals (``"intervals": true``, the default) spend part of the loss: 10% on a
noisy count per group and, per level, 20% each on two more selections at levels
``level -/+ delta``, where ``delta`` is the rank error those selections can make
divided by a lower bound on the count. Each endpoint then lies on the right side of
the true quantile with high probability; one grid step of margin covers the grid's
rounding. The three failure events share the error probability (union bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from privacy.bounding import alpha_fraction, quantile_scores, quantile_sensitivity
from privacy.loss import PrivacyLoss
from privacy.mechanisms import LaplaceVector, NoisyMin
from queries.backend import Measure
from queries.context import QueryContext
from queries.errors import QueryError
from queries.kinds.base import Calibration, Kind, cell_positions, output, register
from queries.kinds.statistics import value_bounds

DEFAULT_CANDIDATES = 1000
MAX_CANDIDATES = 100_000
COUNT_SHARE = 0.1  # of the query's loss, for the per-group counts that scale the intervals
SIDE_SHARE = 0.2  # of each level's loss, for each interval endpoint
LEVEL_GRID = 1000  # interval levels are multiples of 1/1000, rounded outward


@dataclass(frozen=True)
class EndpointSelection:
    """An interval endpoint's selection, calibrated at release time for its level.

    Its level depends on the released count, so its scale is fixed only then; its loss
    is reserved in full now, and the run-time mechanism's privacy map never exceeds it.
    """

    contributions: int
    epsilon: float
    name = "exponential mechanism (permute-and-flip), interval endpoint"

    @property
    def loss(self) -> PrivacyLoss:
        return PrivacyLoss(self.epsilon)

    @property
    def sensitivity(self) -> int:
        return self.contributions * LEVEL_GRID

    @property
    def scale(self) -> float:
        return 2 * self.sensitivity / self.epsilon

    def mechanism(self, level: float) -> NoisyMin:
        return NoisyMin.for_epsilon(quantile_sensitivity(level, self.contributions), self.epsilon)

    def rank_error(self, candidates: int, alpha: float) -> float:
        """Bound on the rows of rank an endpoint selection can miss by, for any level."""
        return 2 * self.contributions * math.log(candidates / alpha) / self.epsilon


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
        if any(not math.isfinite(c) for c in grid) or any(a >= b for a, b in zip(grid, grid[1:])):
            raise QueryError("candidates", "candidates must be finite and strictly increasing",
                             'E.g. {"start": 0, "stop": 60, "step": 0.5}')
        if not grid or grid[0] < lo or grid[-1] > hi:
            raise QueryError("candidates", f"candidates must lie within the bounds [{lo:g}, {hi:g}]",
                             "Narrow the grid")

    def grid(self, ctx: QueryContext) -> list[float]:
        candidates = ctx.spec.candidates
        if candidates is None:
            lo, hi = value_bounds(ctx)
            step = (hi - lo) / DEFAULT_CANDIDATES
            return [lo + i * step for i in range(DEFAULT_CANDIDATES + 1)]
        if isinstance(candidates, tuple):
            if len(candidates) > MAX_CANDIDATES:
                raise QueryError("candidates", f"more than {MAX_CANDIDATES} candidates", "Use fewer")
            return [float(c) for c in candidates]
        if not (math.isfinite(candidates.step) and candidates.step > 0 and candidates.stop >= candidates.start
                and math.isfinite(candidates.start) and math.isfinite(candidates.stop)):
            raise QueryError("candidates", "a grid needs finite start <= stop and a positive step",
                             'E.g. {"start": 0, "stop": 60, "step": 0.5}')
        if (candidates.stop - candidates.start) / candidates.step > MAX_CANDIDATES:
            raise QueryError("candidates", f"the grid has more than {MAX_CANDIDATES} candidates",
                             "Use a larger step")
        return candidates.values()

    def calibrate(self, ctx: QueryContext, contributions: int, epsilon: float | None) -> Calibration:
        assert epsilon is not None  # check() refuses target accuracies
        levels = ctx.spec.quantiles or ()
        mechanisms: dict[str, Any] = {}
        per_level = epsilon / len(levels)
        if ctx.spec.intervals:
            mechanisms["counts"] = LaplaceVector.for_epsilon(contributions, epsilon * COUNT_SHARE)
            per_level = epsilon * (1 - COUNT_SHARE) / len(levels)
        for level in levels:
            point = per_level * (1 - 2 * SIDE_SHARE) if ctx.spec.intervals else per_level
            mechanisms[f"q{level:g}"] = NoisyMin.for_epsilon(quantile_sensitivity(level, contributions), point)
            if ctx.spec.intervals:
                mechanisms[f"q{level:g}-low"] = EndpointSelection(contributions, per_level * SIDE_SHARE)
                mechanisms[f"q{level:g}-high"] = EndpointSelection(contributions, per_level * SIDE_SHARE)
        return Calibration(contributions, mechanisms)

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
        n_low = self._count_lower_bounds(ctx, calibration, cumulative[:, -1])
        values, level_col, lows, highs = [], [], [], []
        for cell in range(ctx.n_cells):
            def select(mechanism: NoisyMin, level: float) -> int:
                return mechanism.release(quantile_scores(below[cell], above[cell], level).tolist())

            for level in levels:
                values.append(float(grid[select(calibration.mechanisms[f"q{level:g}"], level)]))
                level_col.append(level)
                if n_low is None:
                    lows.append(None)
                    highs.append(None)
                    continue
                low_side = calibration.mechanisms[f"q{level:g}-low"]
                delta = low_side.rank_error(m, ctx.alpha / 3) / n_low[cell] if n_low[cell] > 0 else 1.0
                low_level = math.floor((level - delta) * LEVEL_GRID) / LEVEL_GRID
                high_level = math.ceil((level + delta) * LEVEL_GRID) / LEVEL_GRID
                # One grid step of margin covers a quantile that falls between candidates.
                lows.append(float(grid[max(0, select(low_side.mechanism(low_level), low_level) - 1)])
                            if low_level > 0 else float(grid[0]))
                high_side = calibration.mechanisms[f"q{level:g}-high"]
                highs.append(float(grid[min(m - 1, select(high_side.mechanism(high_level), high_level) + 1)])
                             if high_level < 1 else float(grid[-1]))
        return output(ctx, {"quantile": level_col, "value": values, "ci_low": lows, "ci_high": highs},
                      repeat=len(levels))

    @staticmethod
    def _count_lower_bounds(ctx: QueryContext, calibration: Calibration, rows: np.ndarray) -> np.ndarray | None:
        counts = calibration.mechanisms.get("counts")
        if counts is None:
            return None
        noisy = np.asarray(counts.release(rows.tolist()), dtype=np.float64)
        return noisy - counts.accuracy(ctx.alpha / 3)

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
            "note": "each value is within rank_error rows of the exact quantile's position"
                    + ("; value intervals come from two more selections per level" if ctx.spec.intervals else ""),
        }


register(Quantiles())
