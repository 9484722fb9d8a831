"""The data-touching step, behind a small interface a Spark backend can also satisfy.

A backend does only this: read a table, keep at most ``contributions`` rows per
person (a random selection that depends on each person's own rows alone), apply
filters on public columns, clip values to public bounds, and aggregate per group.
It returns exact bounded aggregates; noise, accounting and intervals are shared and
backend-independent (:mod:`civicdp.queries.engine`, :mod:`privacy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import polars as pl

from civicdp.queries.metadata import DatasetMetadata


@dataclass(frozen=True)
class GroupKey:
    """A grouping column, optionally a time bucket of it; ``name`` is the output column."""

    column: str
    bucket: str | None
    keys: tuple[int | str, ...]

    @property
    def name(self) -> str:
        return f"{self.column}:{self.bucket}" if self.bucket else self.column


@dataclass(frozen=True)
class RowFilter:
    """A validated filter: ``values`` for eq/in, ``start``/``end`` for a time range."""

    column: str
    bucket: str | None = None
    values: tuple[int | str | bool, ...] | None = None
    start: datetime | None = None
    end: datetime | None = None


@dataclass(frozen=True)
class Measure:
    """What to aggregate per group.

    - ``rows``: number of kept rows (with a non-null ``column`` if one is given);
    - ``sum``: rows and the sum of ``round((clip(x, lower, upper) - offset) / resolution)``;
    - ``grid``: rows per position of each value relative to the sorted public ``grid``:
      position ``2i`` lies strictly between grid[i-1] and grid[i], ``2i + 1`` equals grid[i].
    """

    kind: Literal["rows", "sum", "grid"]
    column: str | None = None
    lower: float = 0.0
    upper: float = 0.0
    offset: float = 0.0
    resolution: float = 1.0
    grid: tuple[float, ...] = ()


@dataclass(frozen=True)
class AggregateRequest:
    dataset_dir: Path
    metadata: DatasetMetadata
    table: str
    contributions: int
    filters: tuple[RowFilter, ...]
    group_by: tuple[GroupKey, ...]
    measure: Measure


class Backend(Protocol):
    """Computes exact aggregates over contribution-bounded data."""

    def aggregate(self, request: AggregateRequest) -> pl.DataFrame:
        """One row per non-empty group: the group columns (named ``GroupKey.name``, in
        the keys' representation), ``position`` for grid measures, and Int64 columns
        ``rows`` (and ``total`` for sums, saturated at the Int64 range).

        Total on any data: no value in a row may make it raise (such an error would
        reveal the row without noise). Non-finite numbers are missing values, and a value
        that cannot be read as a key or a number is a value outside the keys, or missing."""
        ...

    def contribution_profile(self, dataset_dir: Path, metadata: DatasetMetadata, table: str, limit: int,
                             filters: tuple[RowFilter, ...] = (), measure: Measure | None = None) -> np.ndarray:
        """``people_with_at_least[r - 1]`` for r = 1..limit: people with at least r rows.

        Counted on the rows that ``aggregate`` bounds for the same ``filters`` and
        ``measure``: rows passing every filter and, when the measured column is declared
        nullable, with a value (read as ``aggregate`` reads it); rows without a person
        count for no one. With neither, every row of the table. Adding or removing one
        person changes each entry by at most 1."""
        ...
