"""The embedded backend: Polars over Parquet, lazily.

Contribution bounding uses a per-table rank column: each row's position, within its
person, in a random order given by a hash of the row's own content. Keeping rows
with rank <= L keeps at most L rows per person, and which rows are kept depends only
on that person's rows, so adding or removing one person changes nothing else (the
truncation is stable). The rank is computed once per table file and cached as a
Parquet file next to the data (or in ``cache_dir``).

Rows are filtered before they are bounded: a query about kiosk visits keeps up to L
of each person's kiosk visits (with a value), not whichever of their rows came first.
Without filters or missing values the cached rank is used as it is (a plain filter,
the fast path); otherwise the kept rows are re-ranked in the same random order. The
cache is sorted by person and rank, so re-ranking is a single pass over runs of rows
(no hash grouping by person).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import polars as pl

from queries.backend import AggregateRequest, GroupKey, Measure, RowFilter
from queries.metadata import DatasetMetadata

RANK = "__civicdp_rank"
UNIT = "__civicdp_unit"
_HASH_SEED = 0x5EED_C1F1C


class PolarsBackend:
    """Exact bounded aggregates with Polars; see :class:`queries.backend.Backend`."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._profiles: dict[tuple[str, int], np.ndarray] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # -- reading ---------------------------------------------------------------

    def _source(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> Path:
        return Path(dataset_dir) / metadata.tables[table].path

    def _ranked_path(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> Path:
        source = self._source(dataset_dir, metadata, table)
        stat = source.stat()
        key = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{metadata.privacy_unit}|v3"
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        cache = self.cache_dir or Path(dataset_dir) / ".civicdp-cache"
        path = cache / f"{table}-{digest}.parquet"
        if path.exists():
            return path
        with self._lock_for(path):  # one writer per file in this process; others wait for it
            if not path.exists():
                cache.mkdir(parents=True, exist_ok=True)
                # A name of its own per writer (other processes may be writing too), then an
                # atomic rename: readers never see half a file.
                handle, tmp = tempfile.mkstemp(dir=cache, prefix=f".{table}-", suffix=".tmp")
                os.close(handle)
                try:
                    self._rank(dataset_dir, metadata, table).sink_parquet(tmp, statistics=True)
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
        return path

    def _lock_for(self, path: Path) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(str(path), threading.Lock())

    def _rank(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> pl.LazyFrame:
        meta = metadata.tables[table]
        frame = pl.scan_parquet(self._source(dataset_dir, metadata, table))
        if meta.privacy_unit_via:
            via = meta.privacy_unit_via
            owner = pl.scan_parquet(self._source(dataset_dir, metadata, via["table"]))
            units = owner.select(pl.col(via["on"]), pl.col(metadata.privacy_unit).alias(UNIT))
            frame = frame.join(units, on=via["on"], how="inner")
        unit = _unit_column(metadata, table)
        columns = list(meta.columns)
        # rows: [columns..., (UNIT)]; the order within a person comes from the row's own content
        order = pl.struct(columns).hash(seed=_HASH_SEED)
        ranked = frame.with_columns(order.rank("ordinal").over(unit).cast(pl.UInt32).alias(RANK))
        # Sorted so that each person's rows are contiguous and in rank order (see _run_rank).
        return ranked.sort(unit, RANK)

    def scan(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> pl.LazyFrame:
        return pl.scan_parquet(self._ranked_path(dataset_dir, metadata, table))

    # -- the Backend interface -------------------------------------------------------

    def contribution_profile(self, dataset_dir: Path, metadata: DatasetMetadata, table: str,
                             limit: int) -> np.ndarray:
        # The exact profile of a table file never changes; the private choice made from it
        # draws fresh noise every time, so remembering the profile costs no privacy.
        key = (str(self._ranked_path(dataset_dir, metadata, table)), limit)
        if key not in self._profiles:
            self._profiles[key] = self._profile(dataset_dir, metadata, table, limit)
        return self._profiles[key].copy()

    def _profile(self, dataset_dir: Path, metadata: DatasetMetadata, table: str, limit: int) -> np.ndarray:
        counts = (
            self.scan(dataset_dir, metadata, table)
            .filter(pl.col(RANK) <= limit)
            .group_by(RANK)
            .len()
            .collect()
        )
        profile = np.zeros(limit, dtype=np.int64)
        profile[counts[RANK].to_numpy().astype(np.int64) - 1] = counts["len"].to_numpy()
        return profile

    def aggregate(self, request: AggregateRequest) -> pl.DataFrame:
        meta = request.metadata.tables[request.table]
        frame = self.scan(request.dataset_dir, request.metadata, request.table)
        measure = request.measure
        conditions = [_filter_expr(f) for f in request.filters]
        if measure.column is not None and meta.columns[measure.column].nullable:
            conditions.append(pl.col(measure.column).is_not_null())
        rank = pl.col(RANK)
        if conditions:
            # Filter, then bound: re-rank the remaining rows of each person in the same order.
            frame = frame.filter(pl.all_horizontal(conditions))
            rank = _run_rank(_unit_column(request.metadata, request.table))
        frame = frame.filter(rank <= request.contributions)
        if measure.column is not None and not meta.columns[measure.column].nullable:
            # Declared without nulls: a stray null is dropped after bounding (the fast path stays).
            frame = frame.filter(pl.col(measure.column).is_not_null())
        groups = [_group_expr(g, meta.columns[g.column].type) for g in request.group_by]
        if measure.kind == "rows":
            aggs = [pl.len().cast(pl.Int64).alias("rows")]
        elif measure.kind == "sum":
            value = (pl.col(measure.column).cast(pl.Float64).clip(measure.lower, measure.upper)
                     - measure.offset) / measure.resolution
            aggs = [pl.len().cast(pl.Int64).alias("rows"),
                    value.round(0).cast(pl.Int64).sum().alias("total")]
        else:
            return self._grid(frame, groups, measure, request.group_by)
        # frame: [group columns..., (position)] -> one row per group with rows/total
        if groups:
            out = frame.group_by(groups).agg(aggs).collect()
        else:
            out = frame.select(aggs).collect()
        return _format_groups(out, request.group_by)


    @staticmethod
    def _grid(frame: pl.LazyFrame, groups: list[pl.Expr], measure: Measure,
              group_by: tuple[GroupKey, ...]) -> pl.DataFrame:
        # Count each distinct value first: far fewer binary searches than rows.
        x = pl.col(measure.column).cast(pl.Float64).alias("__value")
        grid = pl.lit(pl.Series("grid", measure.grid, dtype=pl.Float64))
        names = [g.name for g in group_by]
        distinct = frame.group_by([*groups, x]).agg(pl.len().cast(pl.Int64).alias("rows"))
        position = grid.search_sorted(pl.col("__value"), side="left") + grid.search_sorted(
            pl.col("__value"), side="right")
        # distinct: [group columns..., __value, rows] -> [group columns..., position, rows]
        out = (distinct.with_columns(position.cast(pl.Int64).alias("position"))
               .group_by([*names, "position"]).agg(pl.col("rows").sum()).collect())
        return _format_groups(out, group_by)


def _run_rank(unit: str) -> pl.Expr:
    """Position of each row within its person's run of rows (rows sorted by person)."""
    index = pl.int_range(pl.len(), dtype=pl.UInt32)
    first = (pl.col(unit) != pl.col(unit).shift(1)).fill_null(True)
    return index - pl.when(first).then(index).forward_fill() + 1


def _unit_column(metadata: DatasetMetadata, table: str) -> str:
    return UNIT if metadata.tables[table].privacy_unit_via else metadata.privacy_unit


def _filter_expr(row_filter: RowFilter) -> pl.Expr:
    column = pl.col(row_filter.column)
    if row_filter.bucket:
        column = _bucket_expr(column, row_filter.bucket)
    if row_filter.values is not None:
        return column.is_in(list(row_filter.values))
    expr = pl.lit(True)
    if row_filter.start is not None:
        expr = expr & (column >= row_filter.start)
    if row_filter.end is not None:
        expr = expr & (column < row_filter.end)
    return expr


def _bucket_expr(column: pl.Expr, bucket: str) -> pl.Expr:
    if bucket == "hour":
        return column.dt.hour().cast(pl.Int64)
    if bucket == "weekday":
        return column.dt.weekday().cast(pl.Int64)
    if bucket == "day":
        return column.dt.date()
    if bucket == "week":
        return column.dt.truncate("1w").dt.date()
    return column.dt.truncate("1mo").dt.date()


def _group_expr(group: GroupKey, column_type: str) -> pl.Expr:
    column = pl.col(group.column)
    if group.bucket:
        return _bucket_expr(column, group.bucket).alias(group.name)
    if column_type == "int":
        return column.cast(pl.Int64).alias(group.name)
    if column_type == "bool":
        return column.cast(pl.Boolean).alias(group.name)
    return column.cast(pl.String).alias(group.name)


def _format_groups(out: pl.DataFrame, group_by: tuple[GroupKey, ...]) -> pl.DataFrame:
    """Turn date buckets into their public key text (after aggregation, on few rows)."""
    for group in group_by:
        if group.bucket == "day":
            out = out.with_columns(pl.col(group.name).dt.strftime("%Y-%m-%d"))
        elif group.bucket == "week":
            out = out.with_columns(pl.col(group.name).dt.strftime("%G-W%V"))
        elif group.bucket == "month":
            out = out.with_columns(pl.col(group.name).dt.strftime("%Y-%m"))
    return out
