"""Counts of rows per group, and histograms over public bins.

Each person keeps at most L rows and each row adds one to exactly one cell, so the
vector of counts has L1 (and L2) sensitivity L: discrete Laplace noise of scale
L / epsilon, or on a zCDP dataset discrete Gaussian noise for its share of rho
(``ctx.accounting``; the ``budget`` a kind is calibrated with is in the dataset's unit).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from civicdp.privacy.accounting import Additive
from civicdp.queries.backend import Measure
from civicdp.queries.context import QueryContext
from civicdp.queries.errors import QueryError
from civicdp.queries.kinds.base import Calibration, Kind, aligned, cell_positions, output, register


def _counting_mechanism(ctx: QueryContext, contributions: int, budget: float | None) -> Additive:
    if budget is not None:
        return ctx.accounting.additive(contributions, budget)
    if ctx.spec.accuracy < 1:  # type: ignore[operator]
        raise QueryError("accuracy", f"counts are whole numbers, so a half-width below 1 ({ctx.spec.accuracy}) "
                         "cannot be promised", "Ask for an accuracy of at least 1")
    return ctx.accounting.additive_for_accuracy(contributions, ctx.spec.accuracy, ctx.alpha)  # type: ignore[arg-type]


def _noisy_with_interval(mechanism: Additive, exact: np.ndarray, alpha: float) -> dict[str, list]:
    noisy = np.asarray(mechanism.release(exact.tolist()), dtype=np.int64)
    half = mechanism.accuracy(alpha)
    return {"value": noisy.tolist(), "ci_low": (noisy - half).tolist(), "ci_high": (noisy + half).tolist()}


class Count(Kind):
    name = "count"

    def calibrate(self, ctx: QueryContext, contributions: int, epsilon: float | None) -> Calibration:
        return Calibration(contributions, {"counts": _counting_mechanism(ctx, contributions, epsilon)})

    def measure(self, ctx: QueryContext) -> Measure:
        return Measure("rows", ctx.spec.column)

    def release(self, ctx: QueryContext, calibration: Calibration, exact: pl.DataFrame) -> pl.DataFrame:
        rows = aligned(ctx, exact, ["rows"])["rows"].to_numpy()
        return output(ctx, _noisy_with_interval(calibration.mechanisms["counts"], rows, ctx.alpha))

    def predicted(self, ctx: QueryContext, calibration: Calibration) -> dict[str, Any]:
        half = calibration.mechanisms["counts"].accuracy(ctx.alpha)
        return {"half_width": half, "unit": "rows", "cells": ctx.n_cells}


class Histogram(Kind):
    """Counts per public bin of a numeric column (bins left-closed; outer bins open-ended)."""

    name = "histogram"
    uses = frozenset({"bins"})

    def check(self, ctx: QueryContext) -> None:
        super().check(ctx)
        bins = ctx.spec.bins
        if ctx.column is None or ctx.column.type not in ("int", "float"):
            raise QueryError("column", "a histogram needs a numeric column", "Name an int or float column")
        if not bins or len(bins) < 2:
            raise QueryError("bins", "a histogram needs at least two bin edges",
                             "Give increasing edges, e.g. [0, 5, 15, 30, 60]")
        if any(not np.isfinite(b) for b in bins) or any(a >= b for a, b in zip(bins, bins[1:])):
            raise QueryError("bins", "bin edges must be finite and strictly increasing",
                             "Give increasing edges, e.g. [0, 5, 15, 30, 60]")
        if len(bins) > 10_001 or ctx.n_cells * (len(bins) - 1) > 1_000_000:
            raise QueryError("bins", "too many bins", "Use at most 10,000 bins and 1,000,000 cells")

    def _labels(self, ctx: QueryContext) -> list[str]:
        edges = ctx.spec.bins or ()
        return [f"[{a:g}, {b:g})" for a, b in zip(edges, edges[1:])]

    def calibrate(self, ctx: QueryContext, contributions: int, epsilon: float | None) -> Calibration:
        return Calibration(contributions, {"counts": _counting_mechanism(ctx, contributions, epsilon)})

    def measure(self, ctx: QueryContext) -> Measure:
        inner = tuple(float(b) for b in (ctx.spec.bins or ())[1:-1])
        return Measure("grid", ctx.spec.column, grid=inner)

    def release(self, ctx: QueryContext, calibration: Calibration, exact: pl.DataFrame) -> pl.DataFrame:
        labels = self._labels(ctx)
        positions = cell_positions(ctx, exact, 2 * len(labels))
        # position 2i: strictly inside bin i; 2i + 1: on the left edge of bin i + 1.
        per_bin = positions[:, 0::2].copy()
        per_bin[:, 1:] += positions[:, 1::2][:, : len(labels) - 1]
        columns = _noisy_with_interval(calibration.mechanisms["counts"], per_bin.ravel(), ctx.alpha)
        return output(ctx, {"bin": labels * ctx.n_cells, **columns}, repeat=len(labels))

    def predicted(self, ctx: QueryContext, calibration: Calibration) -> dict[str, Any]:
        half = calibration.mechanisms["counts"].accuracy(ctx.alpha)
        return {"half_width": half, "unit": "rows", "cells": ctx.n_cells * len(self._labels(ctx))}


register(Count())
register(Histogram())
