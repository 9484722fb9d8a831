"""Spark column expressions of the Spark backend: the Polars backend's (:mod:`civicdp.queries.polars_exprs`) in Spark.

Each one computes, row for row, what its Polars counterpart computes, so that both backends
give the same exact aggregates (tests/queries/spark/ checks it). Every expression is total:
casts are ``try_cast`` (null where a value cannot be read; the session runs ANSI SQL, so a
plain cast could raise on a row's value, and an error would reveal that such a row exists),
non-finite floats are made missing before any of these sees them, and sums run in 38-digit
decimals, saturated to Int64 on the driver.
"""

from __future__ import annotations

from typing import Any

from pyspark.sql import Column
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, FloatType

from civicdp.queries.backend import GroupKey, Measure, RowFilter

_INT64 = (-(2**63), 2**63 - 1)
_SPARK_TYPE = {"int": "bigint", "bool": "boolean", "str": "string"}


def finite(frame: Any) -> Any:
    """``frame`` with NaN and infinities in its float columns read as missing (the Polars scan's rule)."""
    out = []
    for field in frame.schema.fields:
        column = F.col(field.name)
        if isinstance(field.dataType, (DoubleType, FloatType)):
            bad = F.isnan(column) | (column == float("inf")) | (column == float("-inf"))
            column = F.when(bad, F.lit(None)).otherwise(column).alias(field.name)
        out.append(column)
    return frame.select(*out)


def _try_cast(column: Column, spark_type: str) -> Column:
    return column.try_cast(spark_type)


def _keys_type(keys: tuple[int | str | bool, ...]) -> str:
    """The Spark type of the cells' keys, inferred as Polars infers a Series of them (context._cells)."""
    if all(isinstance(k, bool) for k in keys):
        return "boolean"
    if all(isinstance(k, int) and not isinstance(k, bool) for k in keys):
        return "bigint"
    return "string"


def as_keys(column: Column, column_type: str, keys: tuple[int | str | bool, ...]) -> Column:
    """The column in its public keys' representation; a value that cannot be read as one is null."""
    column = _try_cast(column, _SPARK_TYPE.get(column_type, "string"))
    wanted = _keys_type(keys)
    return column if wanted == _SPARK_TYPE.get(column_type, "string") else _try_cast(column, wanted)


def bucket_expr(column: Column, bucket: str) -> Column:
    """Hour (0-23), ISO weekday (1 = Monday), or the day, ISO week's Monday or month's first day as a date."""
    if bucket == "hour":
        return F.hour(column).cast("bigint")
    if bucket == "weekday":
        return (F.weekday(column) + 1).cast("bigint")
    if bucket == "day":
        return F.to_date(column)
    if bucket == "week":
        return F.to_date(F.date_trunc("week", column))
    return F.to_date(F.date_trunc("month", column))


def row_condition(row_filter: RowFilter, column_type: str | None = None) -> Column:
    """As :func:`civicdp.queries.polars_exprs.row_condition`; null (not met) where the value is missing."""
    column = F.col(row_filter.column)
    if row_filter.bucket:
        column = bucket_expr(column, row_filter.bucket)
    elif column_type is not None and row_filter.values is not None:
        column = as_keys(column, column_type, row_filter.values)
    if row_filter.values is not None:
        return column.isin(list(row_filter.values))
    condition = F.lit(True)
    if row_filter.start is not None:
        condition = condition & (column >= F.lit(row_filter.start))
    if row_filter.end is not None:
        condition = condition & (column < F.lit(row_filter.end))
    return condition


def group_expr(group: GroupKey, column_type: str) -> Column:
    if group.bucket:
        return bucket_expr(F.col(group.column), group.bucket).alias(group.name)
    return as_keys(F.col(group.column), column_type, group.keys).alias(group.name)


def measured(measure: Measure) -> Column | None:
    """A sum or a grid reads a number or nothing; a row count any value."""
    if measure.column is None:
        return None
    if measure.kind == "rows":
        return F.col(measure.column)
    return _try_cast(F.col(measure.column), "double")


def units(value: Column, measure: Measure) -> Column:
    """``round((clip(x) - offset) / resolution)`` as a 38-digit decimal, half to even as Polars rounds."""
    clipped = F.least(F.greatest(value, F.lit(measure.lower)), F.lit(measure.upper))
    # NaN (only from text read as a number) is greatest in Spark and clips to the upper bound;
    # in Polars it stays NaN and its units are missing: made missing here too.
    clipped = F.when(F.isnan(value), F.lit(None)).otherwise(clipped)
    scaled = F.bround((clipped - F.lit(measure.offset)) / F.lit(measure.resolution), 0)
    return _try_cast(scaled, "bigint").cast("decimal(38,0)")


def saturate(total: Any) -> int:
    """A decimal sum clamped to Int64 (clamping is 1-Lipschitz: the sum's sensitivity holds)."""
    if total is None:
        return 0
    return int(min(max(int(total), _INT64[0]), _INT64[1]))
