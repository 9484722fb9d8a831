"""The data-touching step, behind a small interface a Spark backend can also satisfy.

A backend does only this: read a table, keep at most ``contributions`` rows per
person (a random selection that depends on each person's own rows alone), apply
filters on public columns, clip values to public bounds, and aggregate per group.
It returns exact bounded aggregates; noise, accounting and intervals are shared and
backend-independent (:mod:`civicdp.queries.query_plan`, :mod:`privacy`).

Analyses that read rows their own way (bundle discovery, lagged points, department
scores) use the row operations of the same interface: :meth:`Backend.scan` (a table's
rows, each with its person, in the bounding order), :meth:`Backend.row_condition` (a
validated filter as a condition on those rows) and :meth:`Backend.bound` (contribution
bounding of those rows). Their rows name each person in :func:`person_column`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol, Sequence

import numpy as np
import polars as pl

from civicdp.queries.metadata import DatasetMetadata

#: The column that names the person of a ``privacy_unit_via`` table's rows, as a backend reads them.
UNIT = "__civicdp_unit"


def person_column(metadata: DatasetMetadata, table: str) -> str:
    """The column of ``table``'s rows, as :meth:`Backend.scan` returns them, that names each row's person.

    The privacy unit for a table that holds it; :data:`UNIT` (the owner's privacy unit,
    joined on the declared key) for a ``privacy_unit_via`` table.
    """
    return UNIT if metadata.tables[table].privacy_unit_via else metadata.privacy_unit


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
    """Computes exact aggregates over contribution-bounded data, and serves bounded rows to analyses."""

    def aggregate(self, request: AggregateRequest) -> pl.DataFrame:
        """One row per non-empty group: the group columns (named ``GroupKey.name``, in
        the keys' representation), ``position`` for grid measures, and Int64 columns
        ``rows`` (and ``total`` for sums, saturated at the Int64 range).

        Total on any data: no value in a row may make it raise (such an error would
        reveal the row without noise). Non-finite numbers are missing values, and a value
        that cannot be read as a key or a number is a value outside the keys, or missing."""
        ...

    def aggregate_many(self, requests: Sequence[AggregateRequest]) -> list[pl.DataFrame]:
        """``[aggregate(r) for r in requests]``: the same exact values, reading the data as few times as it can.

        For the many aggregates of one report (one table, the same filters, one grouping
        each): a backend may read and bound the table once for all of them. Every frame
        aligns with ``aggregate``'s on the request's cells (same groups, same ``rows``,
        ``total`` and ``position`` values); groups without rows may be present with zeros."""
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

    # -- rows, for analyses that read the data their own way --------------------------------

    def scan(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> pl.LazyFrame:
        """The table's rows that have a person, each person's rows together and in the stable
        random order that bounding keeps them in; the person in :func:`person_column`.

        Non-finite floats are read as missing values. Columns may be added, and rows
        joined or filtered, before :meth:`bound`, as long as the rows keep this order."""
        ...

    def row_condition(self, row_filter: RowFilter, column_type: str | None = None) -> pl.Expr:
        """The condition a row of :meth:`scan` meets when it passes ``row_filter``.

        With ``column_type`` (the column's declared type) the column is first read the way
        grouping reads it, as ``aggregate`` filters; without, its stored values are compared
        with the filter's values as they are. Never raises on a row's value."""
        ...

    def bound(self, rows: pl.LazyFrame, metadata: DatasetMetadata, table: str, contributions: int,
              conditions: Sequence[pl.Expr] = ()) -> pl.LazyFrame:
        """Contribution bounding, as ``aggregate`` bounds: filter first, then keep each person's
        first ``contributions`` remaining rows.

        ``rows`` are rows of :meth:`scan` of ``table`` in its order (with any added columns);
        the rows meeting every one of ``conditions`` are kept, and of those at most
        ``contributions`` per person, the first in the stable random order. Which rows a
        person keeps depends on that person's rows alone."""
        ...
