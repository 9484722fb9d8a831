"""Each dataset to the backend of its declared engine (``"engine"`` in metadata.json).

:class:`DatasetBackends` is itself a :class:`civicdp.queries.backend.Backend`: every call
names its dataset's metadata, and is sent to the engine's default backend (Polars) or to
the Spark backend, which is made on the first Spark dataset (its session on its first query).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl

from civicdp.queries.backend import AggregateRequest, Backend, Measure, RowFilter
from civicdp.queries.metadata import DatasetMetadata
from civicdp.queries.spark_backend import SparkBackend, not_on_spark


class DatasetBackends:
    """Routes by ``metadata.engine``: ``default`` serves "polars" datasets, a :class:`SparkBackend` "spark" ones."""

    def __init__(self, default: Backend, spark: Backend | None = None) -> None:
        self.default = default
        self._spark = spark
        self._guard = threading.Lock()

    def for_metadata(self, metadata: DatasetMetadata) -> Backend:
        if metadata.engine != "spark":
            return self.default
        if isinstance(self.default, SparkBackend):
            return self.default
        with self._guard:
            if self._spark is None:
                self._spark = SparkBackend()
        return self._spark

    def aggregate(self, request: AggregateRequest) -> pl.DataFrame:
        return self.for_metadata(request.metadata).aggregate(request)

    def aggregate_many(self, requests: Sequence[AggregateRequest]) -> list[pl.DataFrame]:
        if not requests:
            return []
        return self.for_metadata(requests[0].metadata).aggregate_many(requests)

    def contribution_profile(self, dataset_dir: Path, metadata: DatasetMetadata, table: str, limit: int,
                             filters: tuple[RowFilter, ...] = (), measure: Measure | None = None) -> np.ndarray:
        return self.for_metadata(metadata).contribution_profile(dataset_dir, metadata, table, limit, filters, measure)

    def scan(self, dataset_dir: Path, metadata: DatasetMetadata, table: str) -> pl.LazyFrame:
        return self.for_metadata(metadata).scan(dataset_dir, metadata, table)

    def row_condition(self, row_filter: RowFilter, column_type: str | None = None) -> pl.Expr:
        # Conditions on rows of scan(): only the default backend serves rows.
        return self.default.row_condition(row_filter, column_type)

    def bound(self, rows: pl.LazyFrame, metadata: DatasetMetadata, table: str, contributions: int,
              conditions: Sequence[pl.Expr] = ()) -> pl.LazyFrame:
        return self.for_metadata(metadata).bound(rows, metadata, table, contributions, conditions)


def check_supported(backends: DatasetBackends, metadata: DatasetMetadata, analysis: str) -> None:
    """Refuse, when it is planned (before any charge), an analysis the dataset's backend does not run."""
    backend: Any = backends.for_metadata(metadata)
    runs = getattr(backend, "analyses", None)  # a backend without the attribute runs every analysis
    if runs is not None and analysis not in runs:
        raise not_on_spark(f"the analysis '{analysis}'")
