"""Polars expressions of the backend: filters, groups, measured values and the run rank.

Every expression here is total: whatever a row holds, it evaluates without raising (an
error that depends on a row would answer, without noise, whether such a row exists).
Casts of values never fail (a value that cannot be read becomes null), non-finite
floats have been made missing by the scan before any of these sees them, and sums do
not wrap.
"""

from __future__ import annotations

import polars as pl

from civicdp.queries.backend import GroupKey, Measure, RowFilter

_INT64 = (-(2**63), 2**63 - 1)


def row_condition(row_filter: RowFilter, column_type: str | None = None) -> pl.Expr:
    """``column_type`` (the declared type) reads the column as grouping does (:func:`as_keys`)."""
    column = pl.col(row_filter.column)
    if row_filter.bucket:
        column = bucket_expr(column, row_filter.bucket)
    elif column_type is not None and row_filter.values is not None:
        column = as_keys(column, column_type, row_filter.values)
    if row_filter.values is not None:
        return column.is_in(list(row_filter.values))
    expr = pl.lit(True)
    if row_filter.start is not None:
        expr = expr & (column >= row_filter.start)
    if row_filter.end is not None:
        expr = expr & (column < row_filter.end)
    return expr


def run_rank(unit: str) -> pl.Expr:
    """Position of each row within its person's run of rows (rows sorted by person).

    Rows without a person are one run, as the cached rank groups them: each their own
    run would keep every one of them, unbounded.
    """
    index = pl.int_range(pl.len(), dtype=pl.UInt32)
    first = pl.col(unit).ne_missing(pl.col(unit).shift(1)) | (index == 0)
    return index - pl.when(first).then(index).forward_fill() + 1


def bucket_expr(column: pl.Expr, bucket: str) -> pl.Expr:
    if bucket == "hour":
        return column.dt.hour().cast(pl.Int64)
    if bucket == "weekday":
        return column.dt.weekday().cast(pl.Int64)
    if bucket == "day":
        return column.dt.date()
    if bucket == "week":
        return column.dt.truncate("1w").dt.date()
    return column.dt.truncate("1mo").dt.date()


def group_expr(group: GroupKey, column_type: str) -> pl.Expr:
    if group.bucket:
        return bucket_expr(pl.col(group.column), group.bucket).alias(group.name)
    return as_keys(pl.col(group.column), column_type, group.keys).alias(group.name)


def as_keys(column: pl.Expr, column_type: str, keys: tuple[int | str | bool, ...]) -> pl.Expr:
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


def format_groups(out: pl.DataFrame, group_by: tuple[GroupKey, ...]) -> pl.DataFrame:
    """Turn date buckets into their public key text (after aggregation, on few rows)."""
    for group in group_by:
        if group.bucket == "day":
            out = out.with_columns(pl.col(group.name).dt.strftime("%Y-%m-%d"))
        elif group.bucket == "week":
            out = out.with_columns(pl.col(group.name).dt.strftime("%G-W%V"))
        elif group.bucket == "month":
            out = out.with_columns(pl.col(group.name).dt.strftime("%Y-%m"))
    return out


def measured(measure: Measure) -> pl.Expr | None:
    """The measured column as the kind reads it: a sum or a grid reads a number or nothing
    (a value stored as unreadable text is missing, like a null), a row count any value."""
    if measure.column is None:
        return None
    if measure.kind == "rows":
        return pl.col(measure.column)
    return pl.col(measure.column).cast(pl.Float64, strict=False)


def check_units(measure: Measure) -> None:
    """Refuse, whatever the data, a sum whose clipped rows could fall outside Int64 units."""
    largest = max(abs(measure.lower - measure.offset), abs(measure.upper - measure.offset)) / measure.resolution
    if not largest < 2.0**63:  # also refuses NaN
        raise ValueError(f"values of up to {largest:.3g} units do not fit in Int64: the plan should "
                         "have refused this resolution")


def total(value: pl.Expr, measure: Measure) -> pl.Expr:
    """Sum of ``round((clip(x) - offset) / resolution)``: exact, and never an error or a wrap.

    Values are finite (see ``scan``) and clipped, so each row's units fit Int64
    (:func:`check_units`). The sum runs in Int128 (no wrap below 2**64 rows) and is then
    saturated to Int64: clamping is 1-Lipschitz, so the sum's sensitivity still holds,
    where an overflow error would reveal, without noise, how large the data's sum is.
    """
    units = ((value.clip(measure.lower, measure.upper) - measure.offset) / measure.resolution).round(0)
    summed = units.cast(pl.Int64, strict=False).cast(pl.Int128).sum()
    return summed.clip(*_INT64).cast(pl.Int64).alias("total")
