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
from typing import Any, Sequence

import numpy as np
import polars as pl

from civicdp.queries.backend import AggregateRequest, Measure, RowFilter, person_column
from civicdp.queries.errors import QueryError
from civicdp.queries.metadata import DatasetMetadata
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
        return self.aggregate_many([request])[0]

    def aggregate_many(self, requests: Sequence[AggregateRequest]) -> list[pl.DataFrame]:
        """One Spark job per table for all its requests (:mod:`civicdp.queries.spark_many`)."""
        from civicdp.queries.spark_many import aggregates

        by_table: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            by_table.setdefault((str(r.dataset_dir), r.metadata.model_dump_json(), r.table), []).append(i)
        out: list[pl.DataFrame | None] = [None] * len(requests)
        for indices in by_table.values():
            first = requests[indices[0]]
            ranked = self.ranked(first.dataset_dir, first.metadata, first.table)
            for i, frame in zip(indices, aggregates(ranked, [requests[i] for i in indices])):
                out[i] = frame
        return out  # type: ignore[return-value]
