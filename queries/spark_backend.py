"""The Spark backend: filtering, contribution bounding, clipping and per-key aggregation inside Spark.

It answers the aggregate operations of :class:`civicdp.queries.backend.Backend` —
``aggregate``, ``aggregate_many`` and ``contribution_profile`` — with the same exact values
as :class:`civicdp.queries.polars_backend.PolarsBackend`: every query kind (counts, sums,
means, quantiles, histograms) and the analyses built from them (the performance report).
Only the aggregates (one row per group, or per group and grid position; a vector of L
counts for the profile) come back to the driver; noise, accounting and intervals stay in
``privacy/`` and ``queries/query_plan.py``, shared with Polars.

Bounding is the Polars backend's: each table's rows are ranked within their person in the
order of the same keyed hash (:mod:`civicdp.queries.spark_rank`); filters (and, for a
nullable measured column, missing values) are applied first and the remaining rows of each
person re-ranked in that order; at most L are kept.

Analyses that read rows their own way (bundles, bundle changes, lagged points, department
scores) take Polars frames of rows (:meth:`scan`, :meth:`bound`): they are not run on Spark.
:data:`ANALYSES` names those that are; the engine refuses the others when it plans them,
before any budget is charged (:func:`civicdp.queries.spark_routing.check_supported`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import polars as pl

from civicdp.queries.backend import AggregateRequest, Measure, RowFilter, person_column
from civicdp.queries.errors import QueryError
from civicdp.queries.metadata import DatasetMetadata
from civicdp.queries.polars_exprs import check_units, format_groups
from civicdp.queries.spark_rank import RANK, RankedTables

#: The analyses this backend runs: those built from aggregates alone.
ANALYSES = frozenset({"performance_report"})
_KEPT_RANK = "__civicdp_kept_rank"


def not_on_spark(what: str) -> QueryError:
    return QueryError("analysis", f"{what} is not available on datasets served by Spark (engine \"spark\")",
                      f"Ask for an aggregate query or one of {sorted(ANALYSES)}, or ask the data steward to "
                      "serve the dataset with the default engine; docs/spark.md lists what runs on Spark")


class SparkBackend:
    """Exact bounded aggregates computed by Spark; see :class:`civicdp.queries.backend.Backend`.

    ``spark``: a session to use (tests); by default the process's one session
    (:func:`civicdp.queries.spark_session.session`), created at the first query.
    """

    analyses = ANALYSES

    def __init__(self, spark: Any = None) -> None:
        self._spark = spark
        self._ranked = RankedTables()

    @property
    def spark(self) -> Any:
        if self._spark is None:
            from civicdp.queries.spark_session import session

            self._spark = session()
        return self._spark

    # -- rows: not served (analyses that need them are refused when planned) ---------------

    def scan(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> pl.LazyFrame:
        raise not_on_spark("this analysis")

    def row_condition(self, row_filter: RowFilter, column_type: str | None = None) -> pl.Expr:
        raise not_on_spark("this analysis")

    def bound(self, rows: pl.LazyFrame, metadata: DatasetMetadata, table: str, contributions: int,
              conditions: Sequence[pl.Expr] = ()) -> pl.LazyFrame:
        raise not_on_spark("this analysis")

    # -- the bounded rows, in Spark ------------------------------------------------------

    def ranked(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> Any:
        """The table's ranked rows (persisted in the cluster), non-finite floats read as missing."""
        from civicdp.queries.spark_exprs import finite

        return finite(self._ranked.get(self.spark, Path(dataset_dir), metadata, table))

    def _kept(self, dataset_dir: Path, metadata: DatasetMetadata, table: str, filters: tuple[RowFilter, ...],
              measure: Measure | None) -> tuple[Any, Any, Any]:
        """The rows bounding applies to, the rank that bounds them, and the measured value (as Polars' ``_kept``)."""
        from pyspark.sql import Window
        from pyspark.sql import functions as F

        from civicdp.queries.spark_exprs import measured, row_condition

        meta = metadata.tables[table]
        frame = self.ranked(dataset_dir, metadata, table)
        value = measured(measure) if measure is not None else None
        conditions = [row_condition(f, meta.columns[f.column].type) for f in filters]
        if value is not None and meta.columns[measure.column].nullable:  # type: ignore[union-attr]
            conditions.append(value.isNotNull())
        if not conditions:
            return frame, F.col(RANK), value
        keep = conditions[0]
        for condition in conditions[1:]:
            keep = keep & condition
        # Filter, then bound: the remaining rows of each person re-ranked in the same order.
        frame = frame.filter(F.coalesce(keep, F.lit(False)))
        rerank = F.row_number().over(Window.partitionBy(person_column(metadata, table)).orderBy(RANK))
        return frame.withColumn(_KEPT_RANK, rerank), F.col(_KEPT_RANK), value

    def contribution_profile(self, dataset_dir: Path, metadata: DatasetMetadata, table: str, limit: int,
                             filters: tuple[RowFilter, ...] = (), measure: Measure | None = None) -> np.ndarray:
        """People with at least r kept rows, r = 1..limit: the rows of rank r, counted in Spark."""
        from pyspark.sql import functions as F

        frame, rank, _ = self._kept(dataset_dir, metadata, table, filters, measure)
        counts = (frame.select(rank.alias("r")).filter(F.col("r") <= limit).groupBy("r").count().collect())
        profile = np.zeros(limit, dtype=np.int64)
        for row in counts:
            profile[int(row["r"]) - 1] = int(row["count"])
        return profile

    def aggregate(self, request: AggregateRequest) -> pl.DataFrame:
        from pyspark.sql import functions as F

        from civicdp.queries.spark_exprs import group_expr, saturate, units

        meta = request.metadata.tables[request.table]
        measure = request.measure
        if measure.kind == "sum":
            check_units(measure)
        frame, rank, value = self._kept(request.dataset_dir, request.metadata, request.table, request.filters,
                                        measure)
        frame = frame.filter(rank <= request.contributions)
        if value is not None and not meta.columns[measure.column].nullable:  # type: ignore[index]
            frame = frame.filter(value.isNotNull())  # declared without nulls: a stray null dropped after bounding
        groups = [group_expr(g, meta.columns[g.column].type) for g in request.group_by]
        names = [g.name for g in request.group_by]
        if measure.kind == "grid":
            return self._grid(frame, groups, value, request)
        aggs = [F.count(F.lit(1)).alias("rows")]
        if measure.kind == "sum":
            aggs.append(F.sum(units(value, measure)).alias("total"))
        out = (frame.groupBy(*groups) if groups else frame).agg(*aggs).collect()
        data: dict[str, list[Any]] = {name: [row[name] for row in out] for name in names}
        data["rows"] = [int(row["rows"]) for row in out]
        if measure.kind == "sum":
            data["total"] = [saturate(row["total"]) for row in out]
        if not groups and not out:
            data["rows"] = [0]
        return format_groups(_frame(data, request), request.group_by)

    def aggregate_many(self, requests: Sequence[AggregateRequest]) -> list[pl.DataFrame]:
        """``[aggregate(r) for r in requests]``; each is one Spark job over the persisted ranked table."""
        return [self.aggregate(request) for request in requests]

    def _grid(self, frame: Any, groups: list[Any], value: Any, request: AggregateRequest) -> pl.DataFrame:
        """Rows per group and grid position: distinct values counted first, then placed on the grid in Spark."""
        from pyspark.sql import functions as F
        from pyspark.sql.types import LongType, StructField, StructType

        names = [g.name for g in request.group_by]
        distinct = frame.groupBy(*groups, value.alias("__value")).agg(F.count(F.lit(1)).alias("rows"))
        schema = StructType([*distinct.schema.fields, StructField("position", LongType())])
        placed = distinct.mapInArrow(_positions(request.measure.grid), schema)
        out = placed.groupBy(*names, "position").agg(F.sum("rows").alias("rows")).collect()
        data: dict[str, list[Any]] = {name: [row[name] for row in out] for name in names}
        data["position"] = [int(row["position"]) for row in out]
        data["rows"] = [int(row["rows"]) for row in out]
        return format_groups(_frame(data, request), request.group_by)


def _positions(grid: tuple[float, ...]):  # type: ignore[no-untyped-def]
    """The ``mapInArrow`` function placing each value on the sorted grid: 2i strictly between
    grid[i-1] and grid[i], 2i + 1 on grid[i] (numpy's binary search, as the Polars backend's)."""
    import pyarrow as pa

    points = np.asarray(grid, dtype=np.float64)

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            x = batch.column("__value").to_numpy(zero_copy_only=False).astype(np.float64)
            position = np.searchsorted(points, x, side="left") + np.searchsorted(points, x, side="right")
            yield pa.RecordBatch.from_arrays([*batch.columns, pa.array(position.astype(np.int64))],
                                             names=[*batch.schema.names, "position"])

    return run


def _frame(data: dict[str, list[Any]], request: AggregateRequest) -> pl.DataFrame:
    """The collected aggregates as the Polars backend's frame: group columns in the keys' types, Int64 counts."""
    columns = []
    for group in request.group_by:
        values = data[group.name]
        if group.bucket in ("hour", "weekday"):
            columns.append(pl.Series(group.name, values, dtype=pl.Int64))
        elif group.bucket:
            columns.append(pl.Series(group.name, values, dtype=pl.Date))
        else:
            dtype = pl.Series(list(group.keys), strict=False).dtype  # as polars_exprs.as_keys casts
            columns.append(pl.Series(group.name, values, dtype=dtype, strict=False))
    for name in ("position", "rows", "total"):
        if name in data:
            columns.append(pl.Series(name, data[name], dtype=pl.Int64))
    return pl.DataFrame(columns)
