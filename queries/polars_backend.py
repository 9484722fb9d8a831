"""The embedded backend: Polars over Parquet, lazily.

Contribution bounding uses the table's cached rank (:mod:`civicdp.queries.polars_rank_cache`):
each row's position, within its person, in a stable random order; keeping rows of rank
<= L keeps at most L rows per person, chosen from that person's rows alone.

Rows are filtered before they are bounded: a query about kiosk visits keeps up to L
of each person's kiosk visits (with a value), not whichever of their rows came first.
Without filters or missing values the cached rank is used as it is (a plain filter,
the fast path); otherwise the kept rows are re-ranked in the same random order. The
cache is sorted by person and rank, so re-ranking is a single pass over runs of rows
(no hash grouping by person).

Reads are total: whatever the rows hold, the same code runs and no value raises (an
error that depends on a row would answer, without noise, whether such a row exists).
Non-finite floats are missing values, casts of values never fail, sums do not wrap
(:mod:`civicdp.queries.polars_exprs`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from civicdp.queries.backend import AggregateRequest, GroupKey, Measure, RowFilter, person_column
from civicdp.queries.metadata import DatasetMetadata
from civicdp.queries.polars_exprs import (check_units, format_groups, group_expr, measured, row_condition, run_rank,
                                         total)
from civicdp.queries.polars_one_pass import fits_one_pass, one_pass_aggregates
from civicdp.queries.polars_rank_cache import RANK, RankCache

_PROFILES_KEPT = 256  # contribution profiles remembered (each a few KB), least recently used dropped


class PolarsBackend:
    """Exact bounded aggregates with Polars; see :class:`civicdp.queries.backend.Backend`."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self._ranks = RankCache(cache_dir, forget=self._forget_profiles)
        # (ranked file, limit, what the query keeps) -> people with at least r kept rows
        self._profiles: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._profiles_guard = threading.Lock()

    # -- rows ----------------------------------------------------------------------------

    def scan(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> pl.LazyFrame:
        """The ranked table's rows that have a person, NaN and infinities in float columns read as missing.

        Every reader of the data goes through here, so no later step meets a non-finite
        value: it would pass ``is_not_null``, survive ``clip`` and break integer casts.
        """
        frame = pl.scan_parquet(self._ranks.ranked_path(dataset_dir, metadata, table))
        # Rows without a person cannot be bounded per person: bounded together as one "person",
        # one more such row could push another out (a change of 2L, not L). They count for no one.
        frame = frame.filter(pl.col(person_column(metadata, table)).is_not_null())
        floats = [name for name, dtype in frame.collect_schema().items() if dtype.is_float()]
        if not floats:
            return frame
        return frame.with_columns(pl.when(pl.col(n).is_finite()).then(pl.col(n)).otherwise(None).alias(n)
                                  for n in floats)

    def row_condition(self, row_filter: RowFilter, column_type: str | None = None) -> pl.Expr:
        return row_condition(row_filter, column_type)

    def bound(self, rows: pl.LazyFrame, metadata: DatasetMetadata, table: str, contributions: int,
              conditions: Sequence[pl.Expr] = ()) -> pl.LazyFrame:
        """Filter, then keep rank <= ``contributions``: the cached rank as it is without conditions
        (the fast path), else the remaining rows of each person re-ranked in the same order."""
        rank = pl.col(RANK)
        if conditions:
            rows = rows.filter(pl.all_horizontal(list(conditions)))
            rank = run_rank(person_column(metadata, table))
        return rows.filter(rank <= contributions)

    # -- aggregates ----------------------------------------------------------------------

    def contribution_profile(self, dataset_dir: Path, metadata: DatasetMetadata, table: str, limit: int,
                             filters: tuple[RowFilter, ...] = (), measure: Measure | None = None) -> np.ndarray:
        """People with at least r kept rows, r = 1..limit, on the rows ``aggregate`` bounds.

        The rows are those of :meth:`_kept` for the same filters and measure: the rank used
        is the one bounding uses (the cached rank, or the re-rank after filtering), so the
        profile is exactly how many people would lose a row at each bound.
        """
        # The exact profile of a table file never changes; the private choice made from it
        # draws fresh noise every time, so remembering the profile costs no privacy. The key
        # holds everything the kept rows depend on: the ranked file (named after the data's
        # bytes and the declaration), the filters with the declared types they are read
        # with, the measured column, how it is read and whether its missing values are dropped.
        meta = metadata.tables[table]
        kept = (tuple((f, meta.columns[f.column].type) for f in filters),
                None if measure is None or measure.column is None else
                (measure.column, measure.kind == "rows", meta.columns[measure.column].type,
                 meta.columns[measure.column].nullable))
        key = (str(self._ranks.ranked_path(dataset_dir, metadata, table)), limit, kept)
        with self._profiles_guard:
            known = self._profiles.get(key)
            if known is not None:
                self._profiles.move_to_end(key)
                return known.copy()
        profile = self._profile(dataset_dir, metadata, table, limit, filters, measure)
        with self._profiles_guard:
            self._profiles[key] = profile
            while len(self._profiles) > _PROFILES_KEPT:
                self._profiles.popitem(last=False)
        return profile.copy()

    def _forget_profiles(self, ranked_file: str) -> None:
        """Drop the profiles of a cache file removed as stale (its content is never read again)."""
        for key in [k for k in list(self._profiles) if k[0] == ranked_file]:
            self._profiles.pop(key, None)

    def _profile(self, dataset_dir: Path, metadata: DatasetMetadata, table: str, limit: int,
                 filters: tuple[RowFilter, ...], measure: Measure | None) -> np.ndarray:
        frame, rank, _ = self._kept(self.scan(dataset_dir, metadata, table), metadata, table, filters, measure)
        # Ranks run 1..k within each person, so the rows of rank r are the people with at least r rows.
        counts = (frame.select(rank.alias(RANK)).filter(pl.col(RANK) <= limit)
                  .group_by(RANK).len().collect())
        profile = np.zeros(limit, dtype=np.int64)
        profile[counts[RANK].to_numpy().astype(np.int64) - 1] = counts["len"].to_numpy()
        return profile

    @staticmethod
    def _kept(frame: pl.LazyFrame, metadata: DatasetMetadata, table: str, filters: tuple[RowFilter, ...],
              measure: Measure | None) -> tuple[pl.LazyFrame, pl.Expr, pl.Expr | None]:
        """The rows bounding applies to, the rank that bounds them, and the measured value.

        Filters, and for a nullable measured column its missing values, are applied
        first; the remaining rows of each person are then re-ranked in the same order.
        Without either, the cached rank is used as it is (the fast path).
        """
        meta = metadata.tables[table]
        value = measured(measure) if measure is not None else None
        conditions = [row_condition(f, meta.columns[f.column].type) for f in filters]
        if value is not None and meta.columns[measure.column].nullable:  # type: ignore[union-attr]
            conditions.append(value.is_not_null())
        rank = pl.col(RANK)
        if conditions:
            # Filter, then bound: re-rank the remaining rows of each person in the same order.
            frame = frame.filter(pl.all_horizontal(conditions))
            rank = run_rank(person_column(metadata, table))
        return frame, rank, value

    def aggregate(self, request: AggregateRequest) -> pl.DataFrame:
        meta = request.metadata.tables[request.table]
        measure = request.measure
        if measure.kind == "sum":
            check_units(measure)
        frame, rank, value = self._kept(self.scan(request.dataset_dir, request.metadata, request.table),
                                        request.metadata, request.table, request.filters, measure)
        frame = frame.filter(rank <= request.contributions)
        if value is not None and not meta.columns[measure.column].nullable:  # type: ignore[index]
            # Declared without nulls: a stray null is dropped after bounding (the fast path stays).
            frame = frame.filter(value.is_not_null())
        groups = [group_expr(g, meta.columns[g.column].type) for g in request.group_by]
        if measure.kind == "rows":
            aggs = [pl.len().cast(pl.Int64).alias("rows")]
        elif measure.kind == "sum":
            aggs = [pl.len().cast(pl.Int64).alias("rows"), total(value, measure)]  # type: ignore[arg-type]
        else:
            return self._grid(frame, groups, value, request.group_by, measure.grid)  # type: ignore[arg-type]
        # frame: [group columns..., (position)] -> one row per group with rows/total
        if groups:
            out = frame.group_by(groups).agg(aggs).collect()
        else:
            out = frame.select(aggs).collect()
        return format_groups(out, request.group_by)

    def aggregate_many(self, requests: Sequence[AggregateRequest]) -> list[pl.DataFrame]:
        """One read of the table for requests that share it, its filters and a single keyed grouping
        each (:mod:`civicdp.queries.polars_one_pass`); any others one :meth:`aggregate` each."""
        if fits_one_pass(requests):
            first = requests[0]
            return one_pass_aggregates(self.scan(first.dataset_dir, first.metadata, first.table), requests)
        return [self.aggregate(request) for request in requests]

    @staticmethod
    def _grid(frame: pl.LazyFrame, groups: list[pl.Expr], value: pl.Expr, group_by: tuple[GroupKey, ...],
              grid_values: tuple[float, ...]) -> pl.DataFrame:
        """Rows per grid position and group, from one sort of each group's values.

        The grid is searched in the sorted values (m searches per group), not each value in
        the grid (a search per row) nor each distinct value counted first (a hash of every
        value: as many as rows on continuous data). ``#(values < g)`` and ``#(values <= g)``
        at every grid point give every position's count by differences (:func:`grid_positions`).
        NumPy sorts a group's values several times faster than a sort inside Polars' ``agg``;
        it orders NaN last and compares -0.0 equal to 0.0, as Polars' search does.
        """
        names = [g.name for g in group_by]
        # values: [group columns..., __value] of the kept rows with a value
        values = frame.select(*groups, value.alias("__value")).filter(pl.col("__value").is_not_null()).collect()
        parts = values.partition_by(names, as_dict=True) if names else {(): values}
        grid = np.asarray(grid_values, dtype=np.float64)
        keys, below, at_or_below, n = [], [], [], []
        for key, part in parts.items():
            if part.height == 0:
                continue
            sorted_values = np.sort(part["__value"].to_numpy())
            keys.append(key)
            below.append(np.searchsorted(sorted_values, grid, side="left"))
            at_or_below.append(np.searchsorted(sorted_values, grid, side="right"))
            n.append(part.height)
        m = len(grid)
        counts = grid_positions(np.array(below, dtype=np.int64).reshape(-1, m),
                                np.array(at_or_below, dtype=np.int64).reshape(-1, m), np.array(n, dtype=np.int64))
        group, position = np.nonzero(counts)
        # out: [group columns..., position, rows], the non-empty positions of each group
        key_frame = pl.DataFrame([pl.Series(name, [k[i] for k in keys], dtype=values.schema[name])
                                  for i, name in enumerate(names)])
        out = pl.DataFrame([*key_frame[group].get_columns(), pl.Series("position", position.astype(np.int64)),
                            pl.Series("rows", counts[group, position].astype(np.int64))])
        return format_groups(out, group_by)


def grid_positions(below: np.ndarray, at_or_below: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Rows per grid position [groups x 2m + 1] from the counts of values below and at or below each of
    the m grid points: position 2i + 1 holds the values equal to grid[i], position 2i those strictly
    between grid[i - 1] and grid[i] (2m: above the last point, NaN included)."""
    below, at_or_below = below.astype(np.int64), at_or_below.astype(np.int64)
    groups, m = below.shape
    counts = np.empty((groups, 2 * m + 1), dtype=np.int64)
    counts[:, 1::2] = at_or_below - below
    counts[:, 0] = below[:, 0]
    counts[:, 2:-1:2] = below[:, 1:] - at_or_below[:, :-1]
    counts[:, -1] = np.asarray(n, dtype=np.int64) - at_or_below[:, -1]
    return counts
