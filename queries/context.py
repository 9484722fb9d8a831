"""Validation of a spec against dataset metadata, into a resolved query context.

Everything here reads the spec and the public metadata only, so every error is
independent of the data.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from civicdp.privacy.accounting import Accounting
from civicdp.privacy.bounding import coarsest_needed, fits_exact_sum, quantized_bound
from civicdp.queries.backend import GroupKey, RowFilter
from civicdp.queries.errors import QueryError
from civicdp.queries.metadata import TIME_BUCKETS, ColumnMeta, DatasetMetadata, TableMeta, bucket_keys, bucket_keys_between
from civicdp.queries.spec import Filter, QuerySpec

#: Cells (combinations of group keys) one query may release.
MAX_CELLS = 200_000
CELL = "__cell"


def key_texts(keys: tuple | list) -> list[str]:
    """Public keys as text exactly as Polars casts the column's values (``True`` -> ``"true"``).

    Matching ``str(key)`` against ``cast(pl.String)`` silently dropped every boolean key.
    """
    return pl.Series(list(keys), strict=False).cast(pl.String).to_list()


def sum_units(column: str, lower: float, upper: float, resolution: float) -> int:
    """Units of ``resolution`` one row may add to an exact sum; refused if sums could overflow.

    Sums are exact int64 totals, so a resolution too fine for the bounds is refused while
    planning, from public numbers alone, rather than wrapping or failing on the data.
    """
    if not fits_exact_sum(lower, upper, resolution):
        raise QueryError("resolution", f"'{column}' at resolution {resolution:g} within bounds "
                         f"[{lower:g}, {upper:g}] gives sums that could overflow an exact 64-bit total",
                         f"Ask the data steward to declare a resolution of at least "
                         f"{coarsest_needed(lower, upper):g} for '{column}', or narrower bounds")
    return quantized_bound(lower, upper, resolution)


@dataclass(frozen=True)
class EngineLimits:
    """Operator-set limits on what one query may ask."""

    max_epsilon: float = 10.0
    max_cells: int = MAX_CELLS
    auto_fraction: float = 0.1  # share of a query's loss spent choosing its contribution bound


@dataclass(frozen=True)
class QueryContext:
    """A validated spec with everything resolved against the metadata."""

    spec: QuerySpec
    metadata: DatasetMetadata
    dataset_dir: Path
    table: TableMeta
    column: ColumnMeta | None
    group_by: tuple[GroupKey, ...]
    filters: tuple[RowFilter, ...]
    cells: pl.DataFrame  # [group names..., __cell]: every public key combination
    contributions: int | None  # None: chosen privately at run time ("auto")
    alpha: float

    @property
    def n_cells(self) -> int:
        return self.cells.height

    @property
    def accounting(self) -> Accounting:
        """The dataset's accounting: which noise a budget share buys, and in which unit."""
        return self.metadata.accounting.rule


def resolve(spec: QuerySpec, metadata: DatasetMetadata, dataset_dir: Path,
            limits: EngineLimits) -> QueryContext:
    """Validate ``spec`` against ``metadata``; raises :class:`QueryError` naming the field."""
    if spec.dataset is not None and spec.dataset != metadata.name:
        raise QueryError("dataset", f"this dataset is '{metadata.name}', not '{spec.dataset}'",
                         "Name the dataset you are querying, or leave 'dataset' out")
    if spec.table not in metadata.tables:
        raise QueryError("table", f"no table '{spec.table}'",
                         f"Use one of {sorted(metadata.tables)}")
    table = metadata.tables[spec.table]
    column = _value_column(spec, metadata, table)
    filters = tuple(_row_filter(i, f, table) for i, f in enumerate(spec.filters))
    group_by = _restrict(tuple(_group_key(i, text, table) for i, text in enumerate(spec.group_by)), filters)
    names = [g.name for g in group_by]
    if len(set(names)) != len(names):
        raise QueryError("group_by", "the same grouping appears twice", "List each grouping once")
    n_cells = math.prod(len(g.keys) for g in group_by)
    if n_cells > limits.max_cells:
        raise QueryError("group_by", f"{n_cells} groups is more than the {limits.max_cells} allowed",
                         "Group by fewer columns or coarser time buckets")
    _check_privacy(spec, limits)
    return QueryContext(
        spec=spec, metadata=metadata, dataset_dir=Path(dataset_dir), table=table, column=column,
        group_by=group_by,
        filters=filters,
        cells=_cells(group_by), contributions=_contributions(spec, metadata),
        alpha=1 - spec.confidence,
    )


def _value_column(spec: QuerySpec, metadata: DatasetMetadata, table: TableMeta) -> ColumnMeta | None:
    if spec.column is None:
        if spec.aggregate != "count":
            raise QueryError("column", f"a {spec.aggregate} needs a column",
                             "Name the numeric column to aggregate")
        return None
    meta = table.columns.get(spec.column)
    if meta is None:
        raise QueryError("column", f"unknown column '{spec.column}'",
                         f"Use one of {sorted(table.columns)}")
    if meta.identifier or spec.column == metadata.privacy_unit:
        raise QueryError("column", f"'{spec.column}' is an identifier and cannot be aggregated",
                         "Aggregate a measured column instead")
    return meta


def _split(text: str) -> tuple[str, str | None]:
    column, _, bucket = text.partition(":")
    return column, bucket or None


def _group_key(index: int, text: str, table: TableMeta) -> GroupKey:
    field = f"group_by.{index}"
    column, bucket = _split(text)
    meta = table.columns.get(column)
    if meta is None:
        raise QueryError(field, f"unknown column '{column}'", f"Use one of {sorted(table.columns)}")
    if bucket is not None:
        if meta.type != "datetime":
            raise QueryError(field, f"'{column}' is not a time column, so it has no '{bucket}' bucket",
                             "Group by the column itself")
        if bucket not in TIME_BUCKETS:
            raise QueryError(field, f"unknown time bucket '{bucket}'", f"Use one of {list(TIME_BUCKETS)}")
        return GroupKey(column, bucket, tuple(bucket_keys(meta, bucket)))
    if meta.type == "datetime":
        raise QueryError(field, f"a time column needs a bucket to group by",
                         f"Write e.g. '{column}:day'; buckets: {list(TIME_BUCKETS)}")
    if meta.keys is None:
        raise QueryError(field, f"'{column}' has no public key set, so grouping by it would reveal "
                         "which values occur", "Group by a column with declared keys, or ask the "
                         "data steward to declare its public keys")
    return GroupKey(column, None, tuple(meta.keys))  # type: ignore[arg-type]


def _row_filter(index: int, spec_filter: Filter, table: TableMeta) -> RowFilter:
    field = f"filters.{index}"
    column, bucket = _split(spec_filter.column)
    meta = table.columns.get(column)
    if meta is None:
        raise QueryError(field, f"unknown column '{column}'", f"Use one of {sorted(table.columns)}")
    if not meta.public:
        raise QueryError(field, f"'{column}' is not a public column and cannot be filtered on",
                         "Filter on a column with declared keys or a time column")
    if bucket is not None:
        if meta.type != "datetime" or bucket not in ("hour", "weekday"):
            raise QueryError(field, f"cannot filter on '{spec_filter.column}'",
                             "Only time columns' hour and weekday buckets can be filtered by value")
        keys: tuple = tuple(bucket_keys(meta, bucket))
    else:
        keys = meta.keys or ()
    if spec_filter.op == "between":
        if bucket is not None:
            raise QueryError(field, f"'between' applies to the time column itself, not its {bucket} bucket",
                             f"Filter '{column}' with 'between', or '{spec_filter.column}' with 'eq'/'in'")
        return _time_range(field, column, meta, spec_filter)
    values = (spec_filter.value,) if spec_filter.op == "eq" else spec_filter.values
    if spec_filter.op == "eq" and spec_filter.value is None:
        raise QueryError(f"{field}.value", "an 'eq' filter needs a value", "Add \"value\": ...")
    if not values:
        raise QueryError(f"{field}.values", "an 'in' filter needs a non-empty list of values",
                         "Add \"values\": [...]")
    if not keys:
        raise QueryError(field, f"'{column}' is a time column", "Filter it with op 'between'")
    unknown = [v for v in values if not any(_same_key(v, k) for k in keys)]
    if unknown:
        shown = list(keys)[:12]
        raise QueryError(f"{field}.value", f"{unknown[0]!r} is not a public key of '{spec_filter.column}'",
                         f"Use one of {shown}{' ...' if len(keys) > 12 else ''}")
    return RowFilter(column, bucket, values=tuple(values))


def _same_key(value: object, key: object) -> bool:
    """Equal and of the same kind: True is not the key 1, nor "1" the key 1."""
    return type(value) is type(key) and value == key


def _naive_utc(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is None:
        return moment
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


def _time_range(field: str, column: str, meta: ColumnMeta, spec_filter: Filter) -> RowFilter:
    if meta.type != "datetime":
        raise QueryError(field, f"'between' applies to time columns and '{column}' is not one",
                         "Use 'eq' or 'in' on key columns")
    start, end = spec_filter.start, spec_filter.end
    if start is None and end is None:
        raise QueryError(field, "a time range needs a start, an end, or both",
                         'Add "start" and/or "end" as ISO dates')
    # Stored times are naive UTC; an aware bound is converted, not just stripped.
    start, end = _naive_utc(start), _naive_utc(end)
    lo, hi = (datetime.fromisoformat(str(b)) if not isinstance(b, datetime) else b.replace(tzinfo=None)
              for b in meta.bounds)  # type: ignore[union-attr]
    if start and end and start >= end:
        raise QueryError(field, f"the time range starts ({start}) at or after it ends ({end})",
                         "Give a start before the end")
    if (start and start >= hi) or (end and end <= lo):
        raise QueryError(field, f"the time range lies outside the dataset's period {lo} to {hi}",
                         "Choose a range inside the dataset's period")
    # Clamp to the declared period, so bucket keys of the range are finite and public.
    return RowFilter(column, None, start=max(start or lo, lo), end=min(end or hi, hi))


def _restrict(group_by: tuple[GroupKey, ...], filters: tuple[RowFilter, ...]) -> tuple[GroupKey, ...]:
    """Group keys that a filter on the same column excludes are not released at all."""
    restricted = []
    for group in group_by:
        keys = group.keys
        for row_filter in filters:
            if (row_filter.column, row_filter.bucket) == (group.column, group.bucket) and row_filter.values:
                keys = tuple(k for k in keys if k in row_filter.values)
            if (row_filter.column == group.column and group.bucket in ("day", "week", "month")
                    and row_filter.values is None):
                inside = set(bucket_keys_between(group.bucket, row_filter.start, row_filter.end))
                keys = tuple(k for k in keys if k in inside)
        restricted.append(GroupKey(group.column, group.bucket, keys))  # type: ignore[arg-type]
    return tuple(restricted)


def _cells(group_by: tuple[GroupKey, ...]) -> pl.DataFrame:
    if not group_by:
        return pl.DataFrame({CELL: [0]}, schema={CELL: pl.Int64})
    rows = list(itertools.product(*(g.keys for g in group_by)))
    data = {g.name: [r[i] for r in rows] for i, g in enumerate(group_by)}
    frame = pl.DataFrame(data, strict=False)
    return frame.with_row_index(CELL).with_columns(pl.col(CELL).cast(pl.Int64))


def _check_privacy(spec: QuerySpec, limits: EngineLimits) -> None:
    if (spec.epsilon is None) == (spec.accuracy is None):
        raise QueryError("epsilon", "give either a privacy loss 'epsilon' or a target 'accuracy', not both"
                         if spec.epsilon is not None else "give a privacy loss 'epsilon' or a target 'accuracy'",
                         'For example "epsilon": 0.1, or "accuracy": 50 for ±50 at the stated confidence')
    if spec.epsilon is not None:
        eps = spec.epsilon
        if not math.isfinite(eps) or eps <= 0:
            raise QueryError("epsilon", f"must be a finite number greater than 0, got {eps}",
                             "Use a value such as 0.1")
        if eps > limits.max_epsilon:
            raise QueryError("epsilon", f"{eps} is above the maximum {limits.max_epsilon} per query",
                             "Ask with a smaller privacy loss")
    if spec.accuracy is not None and (not math.isfinite(spec.accuracy) or spec.accuracy <= 0):
        raise QueryError("accuracy", f"must be a finite number greater than 0, got {spec.accuracy}",
                         "Give the half-width you need, e.g. 50 for ±50")
    if not 0.5 <= spec.confidence <= 0.999 or not math.isfinite(spec.confidence):
        raise QueryError("confidence", f"must be between 0.5 and 0.999, got {spec.confidence}",
                         "Use e.g. 0.95")


def _contributions(spec: QuerySpec, metadata: DatasetMetadata) -> int | None:
    if spec.contributions is None:
        return metadata.row_limit(spec.table)  # a linked table's own default (steps per case), if declared
    if spec.contributions == "auto":
        if spec.accuracy is not None:
            raise QueryError("contributions", "a target accuracy needs a fixed contribution bound, "
                             "because the noise is calibrated before any data is read",
                             "Give a whole number of rows per person, or ask with 'epsilon'")
        return None
    if not 1 <= spec.contributions <= metadata.max_contributions_limit:
        raise QueryError("contributions", f"must be between 1 and {metadata.max_contributions_limit} "
                         f"rows per person, got {spec.contributions}", "Choose a bound in that range")
    return spec.contributions
