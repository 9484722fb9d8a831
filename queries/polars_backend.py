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

The cache is named after everything its content depends on: the bytes of every file it
reads (the table and, for a ``privacy_unit_via`` table, the owner table that gives each
row its person), the declared columns, the mapping and the privacy unit. A digest of
the bytes, not the size and mtime: a steward who corrects person ids in ``events``
changes the persons of ``steps`` without touching ``steps.parquet``, and ``cp -p`` or a
restore rewrites a file with its mtime kept.

Reads are total: whatever the rows hold, the same code runs and no value raises (an
error that depends on a row would answer, without noise, whether such a row exists).
Non-finite floats are missing values, casts of values never fail, sums do not wrap.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import polars as pl

from civicdp.queries.backend import AggregateRequest, GroupKey, Measure, RowFilter
from civicdp.queries.errors import DatasetUnavailable
from civicdp.queries.integrity import OWNER_KEY_TEXT, owner_key_counts
from civicdp.queries.metadata import DatasetMetadata

RANK = "__civicdp_rank"
UNIT = "__civicdp_unit"
_HASH_SEED = 0x5EED_C1F1C
_CACHE_VERSION = "v4"  # bump whenever the content of a cache file changes meaning
_KEY_CHARS = 24  # hex characters of the cache key in a cache file's name
_CACHE_NAME = re.compile(rf"[0-9a-f]{{{_KEY_CHARS}}}\.parquet")
_INT64 = (-(2**63), 2**63 - 1)
_ATTEMPTS = 3  # rankings tried while the steward is replacing files
_PROFILES_KEPT = 256  # contribution profiles remembered (each a few KB), least recently used dropped

#: What changes whenever a file's bytes may have: a rewrite (size, mtime, ctime), a
#: replacement (inode), a copy with its mtime preserved (cp -p, rsync -a: inode or ctime).
FileState = tuple[int, int, int, int, int]


class _SourceChanged(Exception):
    """A source file changed between its digest and the ranking that read it."""


class PolarsBackend:
    """Exact bounded aggregates with Polars; see :class:`civicdp.queries.backend.Backend`."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else None
        # (ranked file, limit, what the query keeps) -> people with at least r kept rows
        self._profiles: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._profiles_guard = threading.Lock()
        self._digests: dict[str, tuple[FileState, str]] = {}  # path -> (its state, sha256 of its bytes)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # -- reading ---------------------------------------------------------------

    def _source(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> Path:
        return Path(dataset_dir) / metadata.tables[table].path

    def _sources(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> list[Path]:
        """Every file the ranked table is made from."""
        via = metadata.tables[table].privacy_unit_via
        owners = [self._source(dataset_dir, metadata, via["table"])] if via else []
        return [self._source(dataset_dir, metadata, table), *owners]

    def _ranked_path(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> Path:
        for _ in range(_ATTEMPTS):
            try:
                return self._ranked_path_once(dataset_dir, metadata, table)
            except _SourceChanged:
                continue
        raise DatasetUnavailable("table", f"the files of table '{table}' kept changing while they were read",
                                 "Ask again once the data steward has finished replacing them")

    def _ranked_path_once(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> Path:
        meta = metadata.tables[table]
        sources = self._sources(dataset_dir, metadata, table)
        contents = [self._content(source) for source in sources]
        key = json.dumps({"files": [digest for _, digest in contents], "via": meta.privacy_unit_via,
                          "columns": list(meta.columns), "unit": metadata.privacy_unit,
                          "seed": _HASH_SEED, "version": _CACHE_VERSION}, sort_keys=True)
        cache = self.cache_dir or Path(dataset_dir) / ".civicdp-cache"
        prefix = _cache_prefix(dataset_dir, table)
        path = cache / f"{prefix}{hashlib.sha256(key.encode()).hexdigest()[:_KEY_CHARS]}.parquet"
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
                    # The ranking opened the files by name: publish it under this key only if
                    # they still hold the bytes that were digested.
                    if [_file_state(source) for source in sources] != [state for state, _ in contents]:
                        raise _SourceChanged
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                self._remove_stale(cache, prefix, path)
        return path

    def _content(self, path: Path) -> tuple[FileState, str]:
        """The file's state and the sha256 of its bytes, hashed once per state in this process."""
        state = _file_state(path)
        known = self._digests.get(str(path))
        if known is not None and known[0] == state:
            return known
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
            if _state_of(os.fstat(handle.fileno())) != state:
                raise _SourceChanged  # replaced or rewritten while hashed
        self._digests[str(path)] = (state, digest)
        return state, digest

    def _remove_stale(self, cache: Path, prefix: str, current: Path) -> None:
        """Delete this table's cache files for earlier contents (they are never read again)."""
        for entry in os.scandir(cache):
            name = entry.name
            if name != current.name and name.startswith(prefix) and _CACHE_NAME.fullmatch(name[len(prefix):]):
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:  # another process removed it first
                    pass
                for key in [k for k in list(self._profiles) if k[0] == str(cache / name)]:
                    self._profiles.pop(key, None)

    def _lock_for(self, path: Path) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(str(path), threading.Lock())

    def _rank(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> pl.LazyFrame:
        meta = metadata.tables[table]
        frame = pl.scan_parquet(self._source(dataset_dir, metadata, table))
        if meta.privacy_unit_via:
            via = meta.privacy_unit_via
            rows, keys = owner_key_counts(dataset_dir, metadata, table)
            if rows != keys:
                # Registration refuses such files; these were changed afterwards. A repeated key
                # would credit one row to several people (issue 11's harness: 9 moves for L = 3).
                raise DatasetUnavailable("table", OWNER_KEY_TEXT, "Ask the data steward to make the key unique")
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
        """The ranked table's rows that have a person, NaN and infinities in float columns read as missing.

        Every reader of the data goes through here, so no later step meets a non-finite
        value: it would pass ``is_not_null``, survive ``clip`` and break integer casts.
        """
        frame = pl.scan_parquet(self._ranked_path(dataset_dir, metadata, table))
        # Rows without a person cannot be bounded per person: bounded together as one "person",
        # one more such row could push another out (a change of 2L, not L). They count for no one.
        frame = frame.filter(pl.col(_unit_column(metadata, table)).is_not_null())
        floats = [name for name, dtype in frame.collect_schema().items() if dtype.is_float()]
        if not floats:
            return frame
        return frame.with_columns(pl.when(pl.col(n).is_finite()).then(pl.col(n)).otherwise(None).alias(n)
                                  for n in floats)

    # -- the Backend interface -------------------------------------------------------

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
        key = (str(self._ranked_path(dataset_dir, metadata, table)), limit, kept)
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
        value = _measured(measure) if measure is not None else None
        conditions = [_filter_expr(f, meta.columns[f.column].type) for f in filters]
        if value is not None and meta.columns[measure.column].nullable:  # type: ignore[union-attr]
            conditions.append(value.is_not_null())
        rank = pl.col(RANK)
        if conditions:
            # Filter, then bound: re-rank the remaining rows of each person in the same order.
            frame = frame.filter(pl.all_horizontal(conditions))
            rank = _run_rank(_unit_column(metadata, table))
        return frame, rank, value

    def aggregate(self, request: AggregateRequest) -> pl.DataFrame:
        meta = request.metadata.tables[request.table]
        measure = request.measure
        if measure.kind == "sum":
            _check_units(measure)
        frame, rank, value = self._kept(self.scan(request.dataset_dir, request.metadata, request.table),
                                        request.metadata, request.table, request.filters, measure)
        frame = frame.filter(rank <= request.contributions)
        if value is not None and not meta.columns[measure.column].nullable:  # type: ignore[index]
            # Declared without nulls: a stray null is dropped after bounding (the fast path stays).
            frame = frame.filter(value.is_not_null())
        groups = [_group_expr(g, meta.columns[g.column].type) for g in request.group_by]
        if measure.kind == "rows":
            aggs = [pl.len().cast(pl.Int64).alias("rows")]
        elif measure.kind == "sum":
            aggs = [pl.len().cast(pl.Int64).alias("rows"), _total(value, measure)]  # type: ignore[arg-type]
        else:
            return self._grid(frame, groups, value, request.group_by, measure.grid)  # type: ignore[arg-type]
        # frame: [group columns..., (position)] -> one row per group with rows/total
        if groups:
            out = frame.group_by(groups).agg(aggs).collect()
        else:
            out = frame.select(aggs).collect()
        return _format_groups(out, request.group_by)

    @staticmethod
    def _grid(frame: pl.LazyFrame, groups: list[pl.Expr], value: pl.Expr, group_by: tuple[GroupKey, ...],
              grid_values: tuple[float, ...]) -> pl.DataFrame:
        # Count each distinct value first: far fewer binary searches than rows.
        x = value.alias("__value")
        grid = pl.lit(pl.Series("grid", grid_values, dtype=pl.Float64))
        names = [g.name for g in group_by]
        distinct = frame.group_by([*groups, x]).agg(pl.len().cast(pl.Int64).alias("rows"))
        position = grid.search_sorted(pl.col("__value"), side="left") + grid.search_sorted(
            pl.col("__value"), side="right")
        # distinct: [group columns..., __value, rows] -> [group columns..., position, rows]
        out = (distinct.with_columns(position.cast(pl.Int64).alias("position"))
               .group_by([*names, "position"]).agg(pl.col("rows").sum()).collect())
        return _format_groups(out, group_by)


def _measured(measure: Measure) -> pl.Expr | None:
    """The measured column as the kind reads it: a sum or a grid reads a number or nothing
    (a value stored as unreadable text is missing, like a null), a row count any value."""
    if measure.column is None:
        return None
    if measure.kind == "rows":
        return pl.col(measure.column)
    return pl.col(measure.column).cast(pl.Float64, strict=False)


def _check_units(measure: Measure) -> None:
    """Refuse, whatever the data, a sum whose clipped rows could fall outside Int64 units."""
    largest = max(abs(measure.lower - measure.offset), abs(measure.upper - measure.offset)) / measure.resolution
    if not largest < 2.0**63:  # also refuses NaN
        raise ValueError(f"values of up to {largest:.3g} units do not fit in Int64: the plan should "
                         "have refused this resolution")


def _total(value: pl.Expr, measure: Measure) -> pl.Expr:
    """Sum of ``round((clip(x) - offset) / resolution)``: exact, and never an error or a wrap.

    Values are finite (see ``scan``) and clipped, so each row's units fit Int64
    (``_check_units``). The sum runs in Int128 (no wrap below 2**64 rows) and is then
    saturated to Int64: clamping is 1-Lipschitz, so the sum's sensitivity still holds,
    where an overflow error would reveal, without noise, how large the data's sum is.
    """
    units = ((value.clip(measure.lower, measure.upper) - measure.offset) / measure.resolution).round(0)
    total = units.cast(pl.Int64, strict=False).cast(pl.Int128).sum()
    return total.clip(*_INT64).cast(pl.Int64).alias("total")


def _state_of(stat: os.stat_result) -> FileState:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _file_state(path: Path) -> FileState:
    return _state_of(os.stat(path))


def _cache_prefix(dataset_dir: Path, table: str) -> str:
    """Start of the names of one table's cache files; a cache_dir may serve several datasets."""
    where = hashlib.sha256(str(Path(dataset_dir).resolve()).encode()).hexdigest()[:8]
    return f"{table}-{where}-"


def _run_rank(unit: str) -> pl.Expr:
    """Position of each row within its person's run of rows (rows sorted by person).

    Rows without a person are one run, as the cached rank groups them: each their own
    run would keep every one of them, unbounded.
    """
    index = pl.int_range(pl.len(), dtype=pl.UInt32)
    first = pl.col(unit).ne_missing(pl.col(unit).shift(1)) | (index == 0)
    return index - pl.when(first).then(index).forward_fill() + 1


def _unit_column(metadata: DatasetMetadata, table: str) -> str:
    return UNIT if metadata.tables[table].privacy_unit_via else metadata.privacy_unit


def _filter_expr(row_filter: RowFilter, column_type: str | None = None) -> pl.Expr:
    """``column_type`` (the declared type) reads the column as grouping does (``_as_keys``)."""
    column = pl.col(row_filter.column)
    if row_filter.bucket:
        column = _bucket_expr(column, row_filter.bucket)
    elif column_type is not None and row_filter.values is not None:
        column = _as_keys(column, column_type, row_filter.values)
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
    if group.bucket:
        return _bucket_expr(pl.col(group.column), group.bucket).alias(group.name)
    return _as_keys(pl.col(group.column), column_type, group.keys).alias(group.name)


def _as_keys(column: pl.Expr, column_type: str, keys: tuple[int | str | bool, ...]) -> pl.Expr:
    """The column in the representation of its public keys, as the query's cells hold them.

    A value that cannot be read as a key becomes null (a group outside the keys) instead
    of failing the cast: an error would tell that such a value exists.
    """
    if column_type == "int":
        column = column.cast(pl.Int64, strict=False)
    elif column_type == "bool":
        column = column.cast(pl.Boolean, strict=False)
    else:
        column = column.cast(pl.String, strict=False)
    # The cells' dtype is inferred from the keys the same way (civicdp.queries.context._cells).
    keys_dtype = pl.Series(list(keys), strict=False).dtype
    return column if keys_dtype == pl.Null else column.cast(keys_dtype, strict=False)


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
