"""Quantiles over a public candidate grid: values by the exponential mechanism, intervals from a private CDF.

Ranks on a grid. With n kept values in a group and level ``q = num/den``, the *true
quantile* is the sample quantile ``Q``: the smallest kept value x with
``#(values <= x) >= q * n`` (values clipped to the bounds). For a grid point g,
``g <= Q`` exactly when ``#(values < g) < q * n``, and ``g >= Q`` exactly when
``#(values <= g) >= q * n``; the backend's grid measure gives both counts, ties included
(position 2i: strictly between grid points, 2i + 1: equal to grid[i]).

Values. Candidate j takes the values that round up to it (above the previous grid point,
at most grid[j]; the first and last candidates also those beyond the grid), and
:func:`civicdp.privacy.bounding.quantile_scores` scores how far the level's rank lies outside
their ranks: zero at the smallest grid value g with ``#(values <= g) >= q * n``. OpenDP's
permute-and-flip selection releases a low score; one person with L rows moves a score by
at most ``L * max(num, den - num)``. A level's loss is charged once for all groups (the
map is linear in a person's rows, which sum to at most L across groups).

Intervals (``"intervals": true``, the default) spend half of the query's budget on one
noisy tree of counts per group (a b-ary tree over the 2m + 1 grid positions, every node a
discrete Laplace count, or discrete Gaussian on zCDP datasets; each row is in ``depth``
nodes, so all groups' nodes together have L1 sensitivity ``L * depth`` and L2 sensitivity
``L * sqrt(depth)``), shared by all levels. An endpoint test reads
``den * #below - num * n`` at a grid point off the tree (prefix nodes for the values
below, disjoint suffix nodes for the others) and passes only if it clears the threshold
its own noise exceeds with probability at most ``alpha / 2``
(:func:`civicdp.privacy.accuracy.sum_tail_threshold`). The lower endpoint is the last grid point
before the first failing test, scanning up from the lower bound; the upper endpoint the
last before the first failing test scanning down from the upper bound. The lower endpoint
exceeds ``Q`` only if the test at the smallest grid point above ``Q`` passed, which its
noise allows with probability at most ``alpha / 2`` whatever the data (atoms, empty gaps,
values beyond the grid); likewise the upper endpoint. So ``ci_low <= Q <= ci_high`` with
probability at least ``1 - alpha``. An interval that comes out inverted (only possible
when a test failed) is swapped, and the value is clamped into its interval
(post-processing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import polars as pl

from civicdp.privacy.accuracy import chernoff_threshold, sum_tail_threshold
from civicdp.privacy.bounding import alpha_fraction, quantile_scores, quantile_sensitivity
from civicdp.privacy.mechanisms import GaussianVector, LaplaceVector, NoisyMin
from civicdp.queries.backend import Measure
from civicdp.queries.context import QueryContext
from civicdp.queries.errors import QueryError
from civicdp.queries.kinds.base import Calibration, Kind, cell_positions, output, register
from civicdp.queries.kinds.statistics import value_bounds

DEFAULT_CANDIDATES = 1000
MAX_CANDIDATES = 100_000
INTERVAL_SHARE = 0.5  # of the query's budget, for the tree of counts all levels' intervals are read from


def value_scores(positions: np.ndarray, level: float) -> np.ndarray:
    """Scores of the grid candidates as the ``level`` quantile of one group (lower is better).

    ``positions`` holds the group's rows per grid position (2m + 1 of them). Candidate j
    takes the values above grid[j - 1] up to grid[j] (the first and last candidates also
    those beyond the grid), so the values ranked before it are those <= grid[j - 1], and
    its score is zero at the smallest grid value g with ``#(values <= g) >= level * n``.
    """
    cumulative = np.cumsum(np.asarray(positions, dtype=np.int64))
    at_or_below, total = cumulative[1::2], int(cumulative[-1])
    below = np.concatenate(([0], at_or_below[:-1]))
    above = np.concatenate((total - at_or_below[:-1], [0]))
    return quantile_scores(below, above, level, total)


@dataclass(frozen=True)
class CountTree:
    """The public shape of a b-ary tree of counts over ``positions`` leaves (one group's grid positions).

    Level 0 holds the leaves, level l nodes of ``branching ** l`` consecutive leaves, up
    to level ``depth - 1``; only nodes that hold at least one leaf are released. Every
    leaf is in exactly one released node per level. The branching minimises
    ``(branching - 1) * depth ** 3``, to which the variance of a prefix/suffix reading is
    proportional (about ``(branching - 1) * depth`` nodes, each of scale ``L * depth / epsilon``).
    """

    positions: int
    branching: int
    depth: int

    @classmethod
    def for_positions(cls, positions: int) -> CountTree:
        best: tuple[int, int, int] | None = None
        for depth in range(1, max(2, positions.bit_length() + 1)):
            branching = max(2, math.ceil(positions ** (1 / depth)))
            while branching > 2 and (branching - 1) ** depth >= positions:
                branching -= 1
            while branching ** depth < positions:
                branching += 1
            cost = (branching - 1) * depth ** 3
            if best is None or cost < best[0]:
                best = (cost, branching, depth)
        assert best is not None
        return cls(positions, best[1], best[2])

    @property
    def width(self) -> int:
        """Leaves of the padded tree (a power of the branching)."""
        return self.branching ** self.depth

    @cached_property
    def released(self) -> tuple[int, ...]:
        """Released nodes per level (those holding at least one real leaf)."""
        return tuple(-(-self.positions // self.branching ** level) for level in range(self.depth))

    def nodes(self, leaves: np.ndarray) -> np.ndarray:
        """Exact node counts [groups x released nodes] of leaf counts [groups x positions]."""
        level = np.zeros((leaves.shape[0], self.width), dtype=np.int64)
        level[:, : self.positions] = leaves
        parts = []
        for count in self.released:
            parts.append(level[:, :count])
            level = level.reshape(leaves.shape[0], -1, self.branching).sum(axis=2)
        return np.concatenate(parts, axis=1)

    def _levels(self, nodes: np.ndarray) -> list[np.ndarray]:
        """Released nodes [groups x released] back to padded levels (unreleased nodes hold only padding: 0)."""
        out, start = [], 0
        for level, count in enumerate(self.released):
            padded = np.zeros((nodes.shape[0], self.branching ** (self.depth - level)), dtype=np.int64)
            padded[:, :count] = nodes[:, start : start + count]
            out.append(padded)
            start += count
        return out

    def _prefix(self, levels: list[np.ndarray], ends: np.ndarray) -> np.ndarray:
        """Sums of leaves ``0 .. end - 1`` [groups x ends] from the canonical nodes (``digit`` nodes per level)."""
        b = self.branching
        total = np.zeros((levels[0].shape[0], ends.size), dtype=np.int64)
        for level, values in enumerate(levels):
            before = np.cumsum(values.reshape(values.shape[0], -1, b), axis=2) - values.reshape(values.shape[0], -1, b)
            total += before[:, ends // b ** (level + 1), (ends // b ** level) % b]
        return total

    def readings(self, nodes: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For each boundary: the sums of leaves before it and from it on, read off disjoint nodes, and
        how many released nodes each sum adds up (prefix, suffix)."""
        levels = self._levels(nodes)
        before = self._prefix(levels, ends)
        after = self._prefix([v[:, ::-1] for v in levels], self.width - ends)
        k_before, k_after = self.node_counts(ends)
        return before, after, k_before, k_after

    def node_counts(self, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Released nodes in each boundary's prefix and suffix readings (public: the shape only)."""
        mask = np.concatenate([np.ones((1, count), dtype=np.int64) for count in self.released], axis=1)
        levels = self._levels(mask)
        k_before = self._prefix(levels, ends)[0]
        k_after = self._prefix([v[:, ::-1] for v in levels], self.width - ends)[0]
        return k_before, k_after


@dataclass(frozen=True)
class EndpointTests:
    """The thresholds of one level's endpoint tests: a test's noise ``a X + b Y`` (prefix X, suffix Y,
    ``a = den - num``, ``b = num``) reaches them with probability at most ``beta``."""

    noise: str  # "laplace" or "gaussian" (zCDP datasets)
    scale: float
    weights: tuple[int, int]
    beta: float
    quick: int  # a valid threshold for every test of the tree (Chernoff, largest node counts)

    def threshold(self, k_before: int, k_after: int) -> int:
        return sum_tail_threshold(self.noise, self.scale, self.weights, (int(k_before), int(k_after)), self.beta)

    def first_failure(self, margin: np.ndarray, k_before: np.ndarray, k_after: np.ndarray,
                      order: np.ndarray) -> int | None:
        """The first test in ``order`` whose ``margin`` does not reach its threshold, or None.

        A test passes when its margin reaches the quick threshold or its own threshold;
        both bound its noise's tail by ``beta``, so either is a valid pass.
        """
        for j in order[margin[order] < self.quick]:
            if margin[j] < self.threshold(k_before[j], k_after[j]):
                return int(j)
        return None


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

    def tree(self, ctx: QueryContext) -> CountTree:
        return CountTree.for_positions(2 * len(self.grid(ctx)) + 1)

    def calibrate(self, ctx: QueryContext, contributions: int, epsilon: float | None) -> Calibration:
        assert epsilon is not None  # check() refuses target accuracies
        budget = epsilon  # in the dataset's unit: epsilon, or rho on zCDP datasets
        levels = ctx.spec.quantiles or ()
        mechanisms: dict[str, Any] = {}
        per_level = budget / len(levels)
        if ctx.spec.intervals:
            # Each kept row is in one node per level of its group's tree, and a person's rows
            # sum to at most L across groups: L1 sensitivity L * depth; per level the changes
            # sum to at most L, so their squares to at most L^2: L2 sensitivity L * sqrt(depth).
            depth = self.tree(ctx).depth
            mechanisms["cdf"] = ctx.accounting.additive(contributions * depth, budget * INTERVAL_SHARE,
                                                        l2_sensitivity=contributions * math.sqrt(depth))
            per_level = budget * (1 - INTERVAL_SHARE) / len(levels)
        for level in levels:
            mechanisms[f"q{level:g}"] = ctx.accounting.selection(quantile_sensitivity(level, contributions), per_level)
        return Calibration(contributions, mechanisms)

    def measure(self, ctx: QueryContext) -> Measure:
        lo, hi = value_bounds(ctx)
        return Measure("grid", ctx.spec.column, lower=lo, upper=hi, grid=tuple(self.grid(ctx)))

    @staticmethod
    def endpoint_tests(calibration: Calibration, tree: CountTree, level: float, alpha: float) -> EndpointTests:
        """One level's endpoint tests on ``tree``, each side at error ``alpha / 2``."""
        fraction = alpha_fraction(level)
        weights = (fraction.denominator - fraction.numerator, fraction.numerator)
        mechanism = calibration.mechanisms["cdf"]
        if isinstance(mechanism, GaussianVector):
            noise = "gaussian"
        elif isinstance(mechanism, LaplaceVector):
            noise = "laplace"
        else:
            raise TypeError(f"no tail bound for {type(mechanism).__name__} noise")
        k_before, k_after = tree.node_counts(np.arange(1, tree.positions))
        widest = (int(k_before.max()), int(k_after.max()))
        quick = chernoff_threshold(noise, mechanism.scale, weights, widest, alpha / 2)
        return EndpointTests(noise, mechanism.scale, weights, alpha / 2, quick)

    def release(self, ctx: QueryContext, calibration: Calibration, exact: pl.DataFrame) -> pl.DataFrame:
        grid = np.asarray(self.grid(ctx))
        lo, hi = value_bounds(ctx)
        m = len(grid)
        positions = cell_positions(ctx, exact, 2 * m + 1)
        levels = ctx.spec.quantiles or ()
        intervals = self._intervals(ctx, calibration, positions, grid, (lo, hi))
        values, level_col, lows, highs = [], [], [], []
        for cell in range(ctx.n_cells):
            for level in levels:
                mechanism: NoisyMin = calibration.mechanisms[f"q{level:g}"]
                value = float(grid[mechanism.release(value_scores(positions[cell], level).tolist())])
                level_col.append(level)
                if intervals is None:
                    values.append(value)
                    lows.append(None)
                    highs.append(None)
                    continue
                low, high = intervals[level][cell]
                values.append(min(max(value, low), high))
                lows.append(low)
                highs.append(high)
        return output(ctx, {"quantile": level_col, "value": values, "ci_low": lows, "ci_high": highs},
                      repeat=len(levels))

    def _intervals(self, ctx: QueryContext, calibration: Calibration, positions: np.ndarray, grid: np.ndarray,
                   bounds: tuple[float, float]) -> dict[float, list[tuple[float, float]]] | None:
        """Each level's interval per group, read off one noisy tree of counts per group."""
        mechanism = calibration.mechanisms.get("cdf")
        if mechanism is None:
            return None
        tree = self.tree(ctx)
        exact_nodes = tree.nodes(positions)
        noisy = np.asarray(mechanism.release(exact_nodes.ravel().tolist()), dtype=np.int64).reshape(exact_nodes.shape)
        m = len(grid)
        # Lower tests at grid[j]: the values < grid[j] are positions 0..2j (boundary 2j + 1);
        # upper tests: the values <= grid[j] are positions 0..2j + 1 (boundary 2j + 2).
        low_ends, high_ends = 2 * np.arange(m) + 1, 2 * np.arange(m) + 2
        low_before, low_after, low_kb, low_ka = tree.readings(noisy, low_ends)
        high_before, high_after, high_kb, high_ka = tree.readings(noisy, high_ends)
        up, down = np.arange(m), np.arange(m - 1, -1, -1)
        out: dict[float, list[tuple[float, float]]] = {}
        for level in ctx.spec.quantiles or ():
            tests = self.endpoint_tests(calibration, tree, level, ctx.alpha)
            a, b = tests.weights
            cells = []
            for cell in range(ctx.n_cells):
                # den * (#below - q n) read with noise Z = a X - b Y (X prefix, Y suffix noise).
                low_margin = -(a * low_before[cell] - b * low_after[cell])  # passes: #(< grid[j]) < q n
                high_margin = a * high_before[cell] - b * high_after[cell] + 1  # passes: #(<= grid[j]) >= q n
                j = tests.first_failure(low_margin, low_kb, low_ka, up)
                low = float(grid[m - 1]) if j is None else (float(grid[j - 1]) if j > 0 else bounds[0])
                j = tests.first_failure(high_margin, high_kb, high_ka, down)
                high = float(grid[0]) if j is None else (float(grid[j + 1]) if j < m - 1 else bounds[1])
                cells.append((min(low, high), max(low, high)))  # inverted only if a test failed
            out[level] = cells
        return out

    @staticmethod
    def _rank_error(mechanism: NoisyMin, level: float, candidates: int, alpha: float) -> float:
        # Moving one row across a candidate changes its score by the level's denominator.
        return mechanism.score_error(candidates, alpha) / alpha_fraction(level).denominator

    def predicted(self, ctx: QueryContext, calibration: Calibration) -> dict[str, Any]:
        m = len(self.grid(ctx))
        levels = ctx.spec.quantiles or ()
        out: dict[str, Any] = {
            "rank_error": {f"{level:g}": self._rank_error(calibration.mechanisms[f"q{level:g}"], level, m, ctx.alpha)
                           for level in levels},
            "unit": "rows of rank", "candidates": m, "cells": ctx.n_cells,
            "note": "each value is within rank_error rows of the exact quantile's position",
        }
        if "cdf" in calibration.mechanisms:
            tree = self.tree(ctx)
            k_before, k_after = tree.node_counts(np.arange(1, tree.positions))
            widest = (int(k_before.max()), int(k_after.max()))
            margins = {}
            for level in levels:
                tests = self.endpoint_tests(calibration, tree, level, ctx.alpha)
                margins[f"{level:g}"] = tests.threshold(*widest) / alpha_fraction(level).denominator
            out["interval_margin"] = margins
            out["note"] += ("; each interval endpoint's test keeps a margin of up to interval_margin rows of rank "
                            "from the exact quantile (plus the test's own noise), and the endpoint lies on its side "
                            "of the exact quantile with probability at least 1 - alpha / 2")
        return out


register(Quantiles())
