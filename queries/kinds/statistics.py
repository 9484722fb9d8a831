"""Sums and means of a numeric column clipped to public bounds.

Values are clipped to ``[lower, upper]`` and rounded to the column's resolution, so
sums are exact integers and each row moves a sum by at most
``ceil(max(|lower|, |upper|) / resolution)`` units; with L rows per person that
times L is the sum's L1 sensitivity. A mean releases a noisy sum of values centred
on the middle of the bounds (halving its sensitivity) and a noisy count, with half
the privacy loss each, and divides them (post-processing).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from civicdp.privacy import accuracy
from civicdp.queries.backend import Measure
from civicdp.queries.context import QueryContext, sum_units
from civicdp.queries.errors import QueryError
from civicdp.queries.kinds.base import Calibration, Kind, aligned, output, register


def value_bounds(ctx: QueryContext) -> tuple[float, float]:
    """The clipping bounds: the spec's, which must lie within the declared ones."""
    column = ctx.column
    name = ctx.spec.column
    if column is None or column.type not in ("int", "float"):
        raise QueryError("column", f"a {ctx.spec.aggregate} needs a numeric column",
                         "Name an int or float column with declared bounds")
    if column.bounds is None:
        raise QueryError("column", f"'{name}' has no declared bounds, so one person's influence "
                         "on the answer would be unlimited",
                         "Ask the data steward to declare public bounds for it")
    lo, hi = (float(b) for b in column.bounds)  # type: ignore[arg-type]
    if ctx.spec.bounds is not None:
        slo, shi = ctx.spec.bounds
        if not (math.isfinite(slo) and math.isfinite(shi)) or slo >= shi:
            raise QueryError("bounds", "bounds must be two finite, increasing numbers", "E.g. [0, 240]")
        if slo < lo or shi > hi:
            raise QueryError("bounds", f"must lie within the declared bounds [{lo:g}, {hi:g}]",
                             "Narrow the bounds or leave them out")
        lo, hi = slo, shi
    return lo, hi


class Sum(Kind):
    name = "sum"
    uses = frozenset({"bounds"})

    def check(self, ctx: QueryContext) -> None:
        super().check(ctx)
        value_bounds(ctx)

    def _unit(self, ctx: QueryContext) -> tuple[float, float, float, int]:
        lo, hi = value_bounds(ctx)
        resolution = ctx.column.value_resolution  # type: ignore[union-attr]
        return lo, hi, resolution, sum_units(str(ctx.spec.column), lo, hi, resolution)

    def calibrate(self, ctx: QueryContext, contributions: int, epsilon: float | None) -> Calibration:
        _, _, resolution, bound = self._unit(ctx)
        sensitivity = contributions * bound
        if epsilon is not None:  # a budget in the dataset's unit (epsilon, or rho on zCDP datasets)
            mechanism = ctx.accounting.additive(sensitivity, epsilon)
        else:
            if ctx.spec.accuracy < resolution:  # type: ignore[operator]
                raise QueryError("accuracy", f"below the column's resolution {resolution:g}",
                                 f"Ask for an accuracy of at least {resolution:g}")
            mechanism = ctx.accounting.additive_for_accuracy(sensitivity, ctx.spec.accuracy / resolution, ctx.alpha)
        return Calibration(contributions, {"sums": mechanism})

    def measure(self, ctx: QueryContext) -> Measure:
        lo, hi, resolution, _ = self._unit(ctx)
        return Measure("sum", ctx.spec.column, lower=lo, upper=hi, resolution=resolution)

    def release(self, ctx: QueryContext, calibration: Calibration, exact: pl.DataFrame) -> pl.DataFrame:
        resolution = self._unit(ctx)[2]
        totals = aligned(ctx, exact, ["rows", "total"])["total"].to_numpy()
        mechanism = calibration.mechanisms["sums"]
        noisy = np.asarray(mechanism.release(totals.tolist()), dtype=np.float64) * resolution
        half = mechanism.accuracy(ctx.alpha) * resolution
        return output(ctx, {"value": noisy.tolist(), "ci_low": (noisy - half).tolist(),
                            "ci_high": (noisy + half).tolist()})

    def predicted(self, ctx: QueryContext, calibration: Calibration) -> dict[str, Any]:
        half = calibration.mechanisms["sums"].accuracy(ctx.alpha) * self._unit(ctx)[2]
        return {"half_width": half, "unit": ctx.spec.column, "cells": ctx.n_cells}


class Mean(Sum):
    name = "mean"

    def check(self, ctx: QueryContext) -> None:
        super().check(ctx)
        if ctx.spec.accuracy is not None:
            raise QueryError("accuracy", "a mean's accuracy depends on how many rows each group has, "
                             "which is private", "Ask with 'epsilon', or estimate a sum and a count")

    def _centred(self, ctx: QueryContext) -> tuple[float, float, float, float, int]:
        lo, hi = value_bounds(ctx)
        resolution = ctx.column.value_resolution  # type: ignore[union-attr]
        middle = (lo + hi) / 2
        # The sum of centred values, and also the values themselves, must fit (checked on both).
        sum_units(str(ctx.spec.column), lo, hi, resolution)
        return lo, hi, middle, resolution, sum_units(str(ctx.spec.column), lo - middle, hi - middle, resolution)

    def calibrate(self, ctx: QueryContext, contributions: int, epsilon: float | None) -> Calibration:
        assert epsilon is not None  # check() refuses target accuracies for means
        bound = self._centred(ctx)[4]
        return Calibration(contributions, {
            "sums": ctx.accounting.additive(contributions * bound, epsilon / 2),
            "counts": ctx.accounting.additive(contributions, epsilon / 2),
        })

    def measure(self, ctx: QueryContext) -> Measure:
        lo, hi, middle, resolution, _ = self._centred(ctx)
        return Measure("sum", ctx.spec.column, lower=lo, upper=hi, offset=middle, resolution=resolution)

    def release(self, ctx: QueryContext, calibration: Calibration, exact: pl.DataFrame) -> pl.DataFrame:
        lo, hi, middle, resolution, _ = self._centred(ctx)
        frame = aligned(ctx, exact, ["rows", "total"])
        sums, counts = calibration.mechanisms["sums"], calibration.mechanisms["counts"]
        noisy_sum = np.asarray(sums.release(frame["total"].to_list()), dtype=np.float64) * resolution
        noisy_count = np.asarray(counts.release(frame["rows"].to_list()), dtype=np.float64)
        # Each component holds within its half-width at confidence 1 - alpha/2 (union bound).
        sum_half = sums.accuracy(ctx.alpha / 2) * resolution
        count_half = counts.accuracy(ctx.alpha / 2)
        values, lows, highs = [], [], []
        for s, c in zip(noisy_sum, noisy_count):
            interval = accuracy.ratio(s, sum_half, c, count_half, lo - middle, hi - middle)
            low, high = middle + interval.low, middle + interval.high
            value = min(hi, max(lo, middle + s / c)) if c > 0 else None
            # Post-processing: the point estimate never lies outside its own interval.
            values.append(None if value is None else min(high, max(low, value)))
            lows.append(low)
            highs.append(high)
        return output(ctx, {"value": values, "ci_low": lows, "ci_high": highs})

    def predicted(self, ctx: QueryContext, calibration: Calibration) -> dict[str, Any]:
        resolution = self._centred(ctx)[3]
        return {
            "sum_half_width": calibration.mechanisms["sums"].accuracy(ctx.alpha / 2) * resolution,
            "count_half_width": calibration.mechanisms["counts"].accuracy(ctx.alpha / 2),
            "unit": ctx.spec.column, "cells": ctx.n_cells,
            "note": "the mean's interval is (sum ± sum_half_width) / (count ± count_half_width)",
        }


register(Sum())
register(Mean())
