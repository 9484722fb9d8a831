"""Polars and Spark give identical exact bounded aggregates for every query kind and the performance report.

The requests are those the engine's own plans make (tests.privacy.neighbours.QUERIES: count,
sum, mean, quantiles, histogram, a filtered count by month; the performance report's ~24
parts), each also at L = 1 and at the dataset's largest L, plus time buckets (hour, weekday,
day, week). Every cell of every frame is compared (group keys, grid positions, rows, sums),
on the demo data and on the harness's D with many adversarial people added. Then whole
queries with the noise removed: the exact input of every mechanism and the released answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from civicdp.queries.backend import AggregateRequest
from civicdp.queries.engine import Engine
from civicdp.queries.metadata import load_metadata
from civicdp.queries.polars_backend import PolarsBackend
from civicdp.queries.spark_backend import SparkBackend
from tests.privacy.neighbours import QUERIES, record_run, released

KINDS = ["count", "sum", "mean", "quantiles", "histogram", "count_filtered_by_month"]
BUCKETS = [{"aggregate": "count", "group_by": ["request_time:week", "request_time:weekday"], "epsilon": 0.3},
           {"aggregate": "sum", "column": "waiting_minutes", "group_by": ["request_time:hour"], "epsilon": 0.3,
            "filters": [{"column": "request_time", "op": "between", "start": "2025-02-01", "end": "2025-05-01"}]},
           {"aggregate": "count", "group_by": ["request_time:day"], "epsilon": 0.3, "contributions": 1},
           {"aggregate": "mean", "column": "satisfaction", "epsilon": 0.3}]
CELLS: dict[str, int] = {}


def _requests(folder: Path) -> list[AggregateRequest]:
    metadata, engine = load_metadata(folder), Engine()
    requests = []
    for spec in [QUERIES[k] for k in KINDS] + BUCKETS:
        plan = engine.plan({k: v for k, v in spec.items() if k != "contributions"} | {"contributions": 3}, metadata,
                           folder)
        for contributions in (1, 3, metadata.max_contributions_limit):
            requests.append(plan.request(contributions))  # type: ignore[union-attr]
    report = engine.plan(QUERIES["performance_report"], metadata, folder)
    requests += [part.plan.request() for part in report.parts]  # type: ignore[union-attr]
    return requests


def _sorted(frame: pl.DataFrame) -> pl.DataFrame:
    keys = [c for c in frame.columns if c not in ("rows", "total")]
    return frame.sort(keys, nulls_last=True) if keys else frame


@pytest.mark.parametrize("name", ["demo", "adversarial"])  # (the harness's D is in the adversarial set)
def test_every_aggregate_is_identical(name: str, spark_folders: dict[str, Path], spark_backend: SparkBackend) -> None:
    folder = spark_folders[name]
    requests = _requests(folder)
    polars = [PolarsBackend().aggregate(r) for r in requests]
    spark = spark_backend.aggregate_many(requests)  # one Spark job for them all
    cells = 0
    for request, expected, got in zip(requests, polars, spark):
        assert_frame_equal(_sorted(got), _sorted(expected))
        cells += expected.height * expected.width
    assert cells > 1000
    CELLS[name] = cells
    print(f"\nPolars/Spark parity on {name}: {len(requests)} aggregates, {cells} cells compared, every cell equal")


@pytest.mark.parametrize("name", ["demo", "adversarial"])
def test_contribution_profiles_are_identical(name: str, spark_folders: dict[str, Path],
                                             spark_backend: SparkBackend) -> None:
    folder = spark_folders[name]
    metadata = load_metadata(folder)
    request = _requests(folder)[len(KINDS) * 3 + 3]  # the filtered sum by hour: its filter re-ranks
    for filters, measure in (((), None), (request.filters, request.measure)):
        expected = PolarsBackend().contribution_profile(folder, metadata, "events", 20, filters, measure)
        got = spark_backend.contribution_profile(folder, metadata, "events", 20, filters, measure)
        assert got.tolist() == expected.tolist()
        assert expected[0] > 0


@pytest.mark.parametrize("query", ["count", "performance_report"])
def test_whole_queries_release_the_same_without_noise(query: str, spark_folders: dict[str, Path],
                                                      spark_backend: SparkBackend) -> None:
    """The "auto" count (a private choice of L from the profile) and the report, noise removed."""
    folder = spark_folders["adversarial"]
    on_polars = record_run(QUERIES[query], folder)
    on_spark = record_run(QUERIES[query], folder, engine=Engine(backend=spark_backend))
    assert on_polars.error is None and on_spark.error is None, (on_polars.error, on_spark.error)
    assert [(c.label, c.kind, c.values) for c in on_spark.calls] == [(c.label, c.kind, c.values)
                                                                        for c in on_polars.calls]
    assert released(on_spark.result) == released(on_polars.result)
    print(f"\n{query} on Spark, noise removed: {sum(len(c.values) for c in on_polars.calls)} mechanism inputs "
          "equal to Polars'")


def test_analyses_reading_rows_are_refused_when_planned(spark_folders: dict[str, Path],
                                                        spark_backend: SparkBackend) -> None:
    from civicdp.queries.errors import DatasetUnavailable, QueryError

    folder = spark_folders["perf"]
    engine = Engine(backend=spark_backend)
    for query in ("bundles", "lagged_points", "department_scores", "bundle_changes"):
        with pytest.raises(QueryError, match="not available on datasets served by Spark") as refused:
            engine.plan(QUERIES[query], load_metadata(folder), folder)
        assert not isinstance(refused.value, DatasetUnavailable)  # a 422 naming the engine, not a 503


