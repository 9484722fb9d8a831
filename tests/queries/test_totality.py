"""Computations that are total on any data: sums that cannot overflow, keys that are not dropped.

A sum whose worst case does not fit an exact 64-bit total is refused while planning, from
public numbers, so no data can make it wrap or fail; boolean keys match in every path
(the report's one-pass path and department scores compared ``str(True)`` with Polars'
``"true"`` and dropped them); NaN and infinities never reach an integer cast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from civicdp.privacy.bounding import MAX_ROW_UNITS, MAX_SUM_ROWS, fits_exact_sum
from civicdp.queries.backend import AggregateRequest, Backend
from civicdp.queries.engine import LocalDataset
from civicdp.queries.errors import QueryError
from civicdp.queries.kinds.base import aligned
from civicdp.queries.metadata import ColumnMeta
from civicdp.queries.polars_one_pass import fits_one_pass
from tests.queries import perf_data


def exact_aggregates(backend: Backend, plans: list) -> list[pl.DataFrame]:
    """The report's one-pass exact aggregates of its parts' plans (what ReportPlan.execute asks)."""
    requests = [plan.request() for plan in plans]
    assert fits_one_pass(requests)  # the one-pass path, not one aggregate each
    return backend.aggregate_many(requests)


def test_the_exact_sum_limit_leaves_room_for_noise() -> None:
    assert MAX_ROW_UNITS * MAX_SUM_ROWS <= 2**62  # and as much again for the noise below 2**63


@pytest.mark.parametrize("bounds", [(0.0, 720.0), (0.0, 9000.0), (1e6, 1e6 + 1), (-1e12, 1e12), (0.0, 1e-9)],
                         ids=["hours", "wide", "far-from-zero", "huge", "tiny"])
def test_the_default_resolution_always_fits_an_exact_sum(bounds: tuple[float, float]) -> None:
    column = ColumnMeta(type="float", bounds=bounds)
    assert fits_exact_sum(*bounds, column.value_resolution)


@pytest.mark.parametrize("spec", [
    {"aggregate": "sum", "column": "duration_hours", "epsilon": 0.5},
    {"aggregate": "mean", "column": "duration_hours", "epsilon": 0.5, "group_by": ["department"]},
    {"analysis": "department_scores", "epsilon": 1.0},
], ids=["sum", "mean", "department-scores"])
def test_a_resolution_whose_sums_could_overflow_is_refused_when_estimating(tmp_path: Path, spec: dict) -> None:
    folder = perf_data.write(tmp_path / "fine", people=50)
    metadata = perf_data.metadata()
    metadata["tables"]["events"]["columns"]["duration_hours"]["resolution"] = 1e-9
    (folder / "metadata.json").write_text(__import__("json").dumps(metadata))
    for path in folder.glob("*.parquet"):
        if path.name.startswith(("events", "steps")):
            path.unlink()  # refused from metadata alone: the data is never needed
    with pytest.raises(QueryError, match=r"could overflow.*resolution of at least 0\.0001") as caught:
        LocalDataset(folder).estimate(spec)
    assert caught.value.field == "resolution" and "duration_hours" in caught.value.problem


def _with_flag(folder: Path) -> LocalDataset:
    """The perf dataset with a boolean column ``online`` (public keys true/false) grouped by the report."""
    events = pl.read_parquet(folder / "events.parquet")
    events = events.with_columns((pl.col("channel") == "web").alias("online"))
    events.write_parquet(folder / "events.parquet")
    metadata = perf_data.metadata()
    metadata["tables"]["events"]["columns"]["online"] = {"type": "bool", "keys": [True, False]}
    (folder / "metadata.json").write_text(__import__("json").dumps(metadata))
    return LocalDataset(folder)


def test_boolean_keys_are_counted_in_the_reports_one_pass_path(tmp_path: Path) -> None:
    local = _with_flag(perf_data.write(tmp_path / "flag", people=300))
    plan = local.engine.plan({"analysis": "performance_report", "epsilon": 1.0, "by": ["online"]},
                             local.metadata, local.path)
    plans = [part.plan for part in plan.parts]
    events = pl.read_parquet(local.path / "events.parquet")
    for sub, fast in zip(plans, exact_aggregates(local.engine.backend, plans)):
        if sub.kind.name == "count":
            assert sorted(fast["rows"].to_list()) == sorted(events["online"].value_counts()["count"].to_list())
        slow = local.engine.backend.aggregate(AggregateRequest(
            sub.context.dataset_dir, sub.context.metadata, sub.context.spec.table, sub.calibration.contributions,
            sub.context.filters, sub.context.group_by, sub.kind.measure(sub.context)))
        if "position" not in slow.columns:
            cols = [c for c in ("rows", "total") if c in slow.columns]
            assert aligned(sub.context, slow, cols).equals(aligned(sub.context, fast, cols)), sub.spec


def test_boolean_groups_get_department_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = _with_flag(perf_data.write(tmp_path / "flag", people=300))
    monkeypatch.setattr("civicdp.privacy.mechanisms.LaplaceVector.release", lambda self, values: list(values))
    result = local.run({"analysis": "department_scores", "epsilon": 1.0, "group": "online"})
    frame = result.table
    observed = frame["observed_hours"] if "observed_hours" in frame.columns else frame[frame.columns[1]]
    assert frame.height == 2 and (observed.to_numpy() > 0).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_one_pass_sums_never_cast_a_non_finite_value(tmp_path: Path, value: float) -> None:
    folder = perf_data.write(tmp_path / "odd", people=200)
    events = pl.read_parquet(folder / "events.parquet")
    odd = events.with_columns(pl.when(pl.col("event_id") % 7 == 0).then(pl.lit(value))
                              .otherwise(pl.col("duration_hours")).alias("duration_hours"))
    odd.write_parquet(folder / "events.parquet")
    local = LocalDataset(folder)
    plan = local.engine.plan({"analysis": "performance_report", "epsilon": 1.0}, local.metadata, local.path)
    plans = [part.plan for part in plan.parts]
    for sub, fast in zip(plans, exact_aggregates(local.engine.backend, plans)):
        if "total" in fast.columns:
            totals = fast["total"].to_numpy()
            assert (totals > np.iinfo(np.int64).min).all()
            bound = sub.calibration.mechanisms["sums"].sensitivity / sub.calibration.contributions
            assert (np.abs(totals) <= fast["rows"].to_numpy() * bound).all()


@pytest.mark.parametrize("spec, clipped", [
    ({"aggregate": "count", "group_by": ["channel"], "epsilon": 1.0}, None),
    ({"aggregate": "mean", "column": "duration_hours", "epsilon": 1.0}, "[0, 720]"),
    ({"aggregate": "histogram", "column": "duration_hours", "bins": [0, 10, 100], "epsilon": 1.0}, None),
], ids=["count", "mean", "histogram"])
def test_every_answer_says_that_its_interval_covers_the_bounded_data(tmp_path: Path, spec: dict,
                                                                     clipped: str | None) -> None:
    local = LocalDataset(perf_data.write(tmp_path / "notes", people=50))
    notes = " ".join(local.run(spec).notes)
    assert f"at most {perf_data.MAX_CONTRIBUTIONS} rows per person were kept" in notes
    assert "intervals cover the answer on these bounded data" in notes
    assert (f"clipped to {clipped}" in notes) if clipped else ("clipped" not in notes)
