"""Many exact aggregates of one table in one Spark job (the Spark backend's ``aggregate`` and ``aggregate_many``).

A report asks ~24 aggregates of one table; a Spark job has a fixed cost of its own
(scheduling, a shuffle), so they are computed together:

1. each bounding variant (its filters, and for a nullable measured column its missing
   values dropped) is a condition ``ok``; the rank among a person's rows meeting it is a
   running count over the person's rows in rank order (one window: all variants share
   its sort), and a request keeps its rows with ``ok`` and that rank <= its L;
2. every row becomes one row ``(request, cell, value, units)`` per request that keeps it
   (an array of them, exploded: one pass over the data for all requests): the cell is the request's group columns as JSON, the value the measured number
   (grid measures), the units the clipped, rounded value (sums);
3. one aggregation per (request, cell, value), the grid position placed on the
   aggregated rows (numpy's binary search, as Polars), one per (request, cell, position).

Only those aggregates reach the driver; they are turned into the frames
:meth:`civicdp.queries.polars_backend.PolarsBackend.aggregate` returns.
"""

from __future__ import annotations

import json
from datetime import date
from typing import Any, Iterator, Sequence

import numpy as np
import polars as pl

from civicdp.queries.backend import AggregateRequest, person_column
from civicdp.queries.polars_exprs import check_units, format_groups
from civicdp.queries.spark_rank import RANK

_REQ, _CELL, _VALUE, _UNITS, _POS = "__req", "__cell", "__value", "__units", "__position"


def aggregates(ranked: Any, requests: Sequence[AggregateRequest]) -> list[pl.DataFrame]:
    """Exact bounded aggregates of ``requests`` (one table's) from its ranked rows, in one job."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType, StructField, StructType

    from civicdp.queries.spark_exprs import group_expr, measured, row_condition, saturate, units

    first = requests[0]
    metadata, table = first.metadata, first.table
    meta = metadata.tables[table]
    for request in requests:
        if request.measure.kind == "sum":
            check_units(request.measure)
    # 1. bounding variants: their condition and the rank among the rows that meet it
    variants: dict[tuple, int] = {}
    keeps, frame = [], ranked
    person = Window.partitionBy(person_column(metadata, table)).orderBy(RANK).rowsBetween(
        Window.unboundedPreceding, Window.currentRow)
    for request in requests:
        value = measured(request.measure)
        column = request.measure.column
        nullable = value is not None and meta.columns[column].nullable  # type: ignore[index]
        key = (request.filters, column if nullable else None)
        if key not in variants:
            variants[key] = len(variants)
            conditions = [row_condition(f, meta.columns[f.column].type) for f in request.filters]
            if nullable:
                conditions.append(value.isNotNull())  # type: ignore[union-attr]
            if conditions:
                ok = conditions[0]
                for condition in conditions[1:]:
                    ok = ok & condition
                ok = F.coalesce(ok, F.lit(False))
                frame = frame.withColumn(f"__ok{variants[key]}", ok).withColumn(
                    f"__rank{variants[key]}", F.sum(F.col(f"__ok{variants[key]}").cast("int")).over(person))
        v = variants[key]
        if f"__ok{v}" in frame.columns:
            keep = F.col(f"__ok{v}") & (F.col(f"__rank{v}") <= request.contributions)
        else:
            keep = F.col(RANK) <= request.contributions
        if value is not None and not nullable:
            keep = keep & value.isNotNull()  # declared without nulls: a stray null dropped after bounding
        keeps.append(keep)
    # 2. each row once per request that keeps it: (request, cell, value, units), in one pass
    entries = []
    for i, (request, keep) in enumerate(zip(requests, keeps)):
        measure = request.measure
        groups = [group_expr(g, meta.columns[g.column].type) for g in request.group_by]
        value = measured(measure)
        entries.append(F.when(keep, F.struct(
            F.lit(i).alias(_REQ), (F.to_json(F.struct(*groups)) if groups else F.lit("{}")).alias(_CELL),
            (value if measure.kind == "grid" else F.lit(None).cast("double")).alias(_VALUE),  # type: ignore[union-attr]
            (units(value, measure) if measure.kind == "sum" else F.lit(None).cast("decimal(38,0)")).alias(_UNITS))))
    kept = F.filter(F.array(*entries), lambda entry: entry.isNotNull())
    union = frame.select(F.explode(kept).alias("entry")).select("entry.*")
    # 3. per (request, cell, value), the grid position, per (request, cell, position)
    distinct = union.groupBy(_REQ, _CELL, _VALUE).agg(F.count(F.lit(1)).alias("rows"), F.sum(_UNITS).alias("total"))
    grids = {i: r.measure.grid for i, r in enumerate(requests) if r.measure.kind == "grid"}
    if grids:
        schema = StructType([*distinct.schema.fields, StructField(_POS, LongType())])
        distinct = distinct.mapInArrow(_positions(grids), schema)
    else:
        distinct = distinct.withColumn(_POS, F.lit(None).cast("bigint"))
    out = distinct.groupBy(_REQ, _CELL, _POS).agg(F.sum("rows").alias("rows"), F.sum("total").alias("total"))
    collected: dict[int, list[Any]] = {i: [] for i in range(len(requests))}
    for row in out.collect():
        collected[int(row[_REQ])].append(row)
    return [_frame(request, collected[i], saturate) for i, request in enumerate(requests)]


def _positions(grids: dict[int, tuple[float, ...]]):  # type: ignore[no-untyped-def]
    """The ``mapInArrow`` function placing each grid request's values on its sorted grid: 2i strictly
    between grid[i-1] and grid[i], 2i + 1 on grid[i]; null for the other requests."""
    import pyarrow as pa

    points = {i: np.asarray(grid, dtype=np.float64) for i, grid in grids.items()}

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            req = batch.column(_REQ).to_numpy(zero_copy_only=False)
            x = batch.column(_VALUE).to_numpy(zero_copy_only=False).astype(np.float64)
            position = np.zeros(len(x), dtype=np.int64)
            has = np.zeros(len(x), dtype=bool)
            for i, grid in points.items():
                mine = req == i
                position[mine] = (np.searchsorted(grid, x[mine], side="left")
                                  + np.searchsorted(grid, x[mine], side="right"))
                has |= mine
            yield pa.RecordBatch.from_arrays([*batch.columns, pa.array(position, mask=~has)],
                                             names=[*batch.schema.names, _POS])

    return run


def _frame(request: AggregateRequest, rows: list[Any], saturate: Any) -> pl.DataFrame:
    """One request's collected aggregates as the Polars backend's frame (group columns in the keys' types)."""
    cells = [json.loads(row[_CELL]) for row in rows]
    columns = []
    for group in request.group_by:
        values = [cell.get(group.name) for cell in cells]
        if group.bucket in ("hour", "weekday"):
            columns.append(pl.Series(group.name, values, dtype=pl.Int64))
        elif group.bucket:
            columns.append(pl.Series(group.name, [None if v is None else date.fromisoformat(v) for v in values],
                                     dtype=pl.Date))
        else:
            dtype = pl.Series(list(group.keys), strict=False).dtype  # as polars_exprs.as_keys casts
            columns.append(pl.Series(group.name, values, dtype=dtype, strict=False))
    if request.measure.kind == "grid":
        columns.append(pl.Series("position", [int(row[_POS]) for row in rows], dtype=pl.Int64))
    counts = [int(row["rows"]) for row in rows]
    if not request.group_by and not rows:
        counts = [0]  # an aggregate without groups has its one row, as Polars' select gives
    columns.append(pl.Series("rows", counts, dtype=pl.Int64))
    if request.measure.kind == "sum":
        totals = [saturate(row["total"]) for row in rows]
        columns.append(pl.Series("total", totals if request.group_by or rows else [0], dtype=pl.Int64))
    return format_groups(pl.DataFrame(columns), request.group_by)
