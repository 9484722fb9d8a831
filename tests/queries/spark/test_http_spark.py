"""A Spark-backed dataset served over HTTP answers as the same dataset served by Polars.

Two servers, each with the test dataset registered: one declares ``"engine": "spark"``. With
the noise removed, the same requests (an estimate, a run, its cached repeat, a request over
the budget, an analysis Spark does not run) get the same status and the same body apart
from the times and ids of the answer. Readiness reports the Spark session's start-up cost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from civicdp.queries.spark_backend import SparkBackend
from tests.conftest import base_metadata
from tests.privacy.neighbours import NoiseRemoved
from tests.server.api_fixtures import ANALYST, Api, make_dataset_folder, running_api

_VOLATILE = {"seconds", "release_id", "created_at", "computed_at", "id", "request_id", "released_at", "cached"}


def _stable(body: Any) -> Any:
    """The body without its times and identifiers (they differ between any two servers)."""
    if isinstance(body, dict):
        return {k: _stable(v) for k, v in body.items() if k not in _VOLATILE}
    if isinstance(body, list):
        return [_stable(v) for v in body]
    return body


def _conversation(api: Api) -> list[tuple[int, Any]]:
    query = {"dataset": "test-services", "aggregate": "sum", "column": "waiting_minutes", "group_by": ["channel"],
             "epsilon": 0.5, "contributions": 2,
             "filters": [{"column": "service", "op": "in", "values": ["A", "B"]}]}
    api.set_cap("analyst", ANALYST, 1.2)
    answers = [api.post(ANALYST, "/v1/queries/estimate", json=query), api.query(ANALYST, query), api.query(ANALYST, query),
               api.query(ANALYST, {**query, "epsilon": 0.9, "group_by": ["service"]}),
               api.query(ANALYST, {"dataset": "test-services", "analysis": "bundles", "epsilon": 0.1})]
    return [(a.status_code, _stable(a.json())) for a in answers]


def test_spark_dataset_over_http_answers_as_polars(tmp_path: Path, spark_backend: SparkBackend) -> None:
    metadata = base_metadata()
    spark_metadata = {**metadata, "engine": "spark"}
    with NoiseRemoved():
        with running_api(tmp_path / "polars", make_dataset_folder(tmp_path / "p", metadata=metadata)) as api:
            on_polars = _conversation(api)
        with running_api(tmp_path / "spark", make_dataset_folder(tmp_path / "s", metadata=spark_metadata)) as api:
            on_spark = _conversation(api)
            ready = api.get(None, "/v1/ready")
    statuses = [status for status, _ in on_spark]
    assert statuses[:3] == [200, 200, 200] and statuses[3] in (409, 403) and statuses[4] == 422, on_spark
    assert "Spark" in on_spark[4][1]["problem"]
    assert on_spark[:4] == on_polars[:4]
    assert ready.status_code == 200 and ready.json()["spark"]["started"] is True, ready.json()
