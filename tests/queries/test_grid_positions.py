"""The grid measure's positions (queries/polars_backend.py): one sort per group gives the same counts as
placing every value on the grid by hand, on continuous values with ties, atoms, NaN, +-inf and -0.0."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from civicdp.queries.backend import GroupKey
from civicdp.queries.polars_backend import PolarsBackend, grid_positions


def _position(x: float, grid: list[float]) -> int:
    """The measure's definition: 2i + 1 when x equals grid[i], 2i strictly between grid[i-1] and grid[i]."""
    if math.isnan(x):
        return 2 * len(grid)  # NaN sorts above every number
    below = sum(g < x for g in grid)
    return 2 * below + (1 if below < len(grid) and grid[below] == x else 0)


def _by_hand(groups: list, values: list[float], grid: list[float]) -> dict:
    out: dict = {}
    for g, x in zip(groups, values):
        key = (g, _position(x, grid))
        out[key] = out.get(key, 0) + 1
    return out


def _data(seed: int, n: int) -> tuple[list, list[float], list[float]]:
    rng = np.random.default_rng(seed)
    grid = sorted(set(np.round(rng.uniform(-2, 10, int(rng.integers(1, 40))), 1).tolist()))
    x = rng.lognormal(1, 1, n) - 1  # continuous, skewed
    kind = rng.random(n)
    x[kind < 0.2] = 0.0  # an atom
    x[(kind >= 0.2) & (kind < 0.35)] = rng.choice(grid, int(((kind >= 0.2) & (kind < 0.35)).sum()))  # ties
    x[(kind >= 0.35) & (kind < 0.38)] = np.nan
    x[(kind >= 0.38) & (kind < 0.40)] = np.inf
    x[(kind >= 0.40) & (kind < 0.42)] = -np.inf
    x[(kind >= 0.42) & (kind < 0.45)] = -0.0
    groups = [["counter", "kiosk", "web", None][i] for i in rng.integers(0, 4, n)]
    return groups, x.tolist(), grid


@pytest.mark.parametrize("seed", range(6), ids=lambda s: f"seed{s}")
def test_grid_counts_equal_placing_each_value_by_hand(seed: int) -> None:
    groups, values, grid = _data(seed, 2000)
    frame = pl.DataFrame([pl.Series("g", groups, dtype=pl.String), pl.Series("x", values, dtype=pl.Float64)]).lazy()
    by = (GroupKey("g", None, ("counter", "kiosk", "web")),)
    out = PolarsBackend._grid(frame, [pl.col("g")], pl.col("x"), by, tuple(grid))
    got = {(g, p): r for g, p, r in out.select("g", "position", "rows").iter_rows()}
    assert got == _by_hand(groups, values, grid)
    assert (out["rows"] > 0).all()  # only non-empty positions
    ungrouped = PolarsBackend._grid(frame, [], pl.col("x"), (), tuple(grid))
    assert ungrouped.columns == ["position", "rows"]
    assert dict(ungrouped.iter_rows()) == {p: r for (_, p), r in _by_hand([0] * len(values), values, grid).items()}


def test_grid_of_no_rows_is_empty() -> None:
    frame = pl.DataFrame([pl.Series("g", [], dtype=pl.String), pl.Series("x", [], dtype=pl.Float64)]).lazy()
    by = (GroupKey("g", None, ("a",)),)
    assert PolarsBackend._grid(frame, [pl.col("g")], pl.col("x"), by, (0.0, 1.0)).height == 0


def test_grid_positions_from_counts_below_and_at() -> None:
    # values -1, 0, 0, 0.5, 1, 7, nan on the grid [0, 1, 2]
    counts = grid_positions(np.array([[1, 4, 5]]), np.array([[3, 5, 5]]), np.array([7]))
    assert counts.tolist() == [[1, 2, 1, 1, 0, 0, 2]]
