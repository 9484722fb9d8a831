"""The Polars backend reads any data the same way: no value in a row can make it raise.

An error that happens only when some row holds NaN, infinity or unreadable text would
tell, without noise, that such a row exists. So non-finite floats are missing values
(dropped like nulls), values that cannot be read as a key fall outside the keys, and
integer sums neither raise nor wrap.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pytest

from civicdp.queries.backend import AggregateRequest, GroupKey, Measure, RowFilter
from civicdp.queries.engine import Engine, LocalDataset
from civicdp.queries.kinds.base import aligned
from civicdp.queries.polars_backend import PolarsBackend
from tests.conftest import CHANNELS, MakeDataset, base_metadata, events_frame

NON_FINITE = [float("nan"), float("inf"), float("-inf")]
HUGE = 3e38  # finite even as Float32: kept, and clipped to the bounds like any large value
FLOATS = ("waiting_minutes", "score")
BY_CHANNEL = (GroupKey("channel", None, CHANNELS),)
MEASURES = {
    "rows": Measure("rows", "waiting_minutes"),
    "sum": Measure("sum", "waiting_minutes", lower=0.0, upper=100.0, resolution=0.01),
    "grid": Measure("grid", "waiting_minutes", grid=(10.0, 25.0, 50.0, 75.0)),
    "sum-not-nullable": Measure("sum", "score", lower=-3.0, upper=3.0, resolution=0.001),
    "grid-not-nullable": Measure("grid", "score", grid=(-1.0, 0.0, 1.0)),
}


def aggregate(dataset: LocalDataset, measure: Measure, group_by: tuple[GroupKey, ...] = (),
              filters: tuple[RowFilter, ...] = (), contributions: int = 3) -> pl.DataFrame:
    request = AggregateRequest(dataset.path, dataset.metadata, "events", contributions, filters,
                               group_by, measure)
    out = PolarsBackend().aggregate(request)
    return out.sort(out.columns)


def poisoned(dtype: pl.DataType) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Events with NaN, +-inf and huge values in both float columns, and the same with nulls.

    Every person has at most 3 rows (the bound), so both versions keep the same rows.
    """
    frame = events_frame()
    n = frame.height
    huge, bad = np.arange(n) % 7 == 3, np.arange(n) % 5 == 0
    clean = frame.with_columns(
        pl.Series("waiting_minutes", np.where(huge, HUGE, frame["waiting_minutes"])).cast(dtype),
        pl.Series("score", np.where(huge, -HUGE, frame["score"])).cast(dtype))
    mask = pl.lit(pl.Series(bad))
    non_finite = pl.lit(pl.Series(np.resize(NON_FINITE, n))).cast(dtype)
    broken = clean.with_columns(pl.when(mask).then(non_finite).otherwise(pl.col(c)).alias(c) for c in FLOATS)
    nulled = clean.with_columns(pl.when(mask).then(None).otherwise(pl.col(c)).alias(c) for c in FLOATS)
    assert broken["waiting_minutes"].is_nan().sum() > 0 and broken["score"].is_infinite().sum() > 0
    return broken, nulled


@pytest.mark.parametrize("dtype", [pl.Float64, pl.Float32], ids=["f64", "f32"])
@pytest.mark.parametrize("measure", MEASURES.values(), ids=MEASURES.keys())
@pytest.mark.parametrize("shape", ["plain", "grouped", "filtered"])
def test_non_finite_floats_are_read_as_missing_values(make_dataset: MakeDataset, dtype: pl.DataType,
                                                     measure: Measure, shape: str) -> None:
    bad, nulled = poisoned(dtype)
    group_by = BY_CHANNEL if shape == "grouped" else ()
    filters = (RowFilter("channel", values=("web", "counter")),) if shape == "filtered" else ()
    results = [aggregate(make_dataset(frame, base_metadata(), name=name), measure, group_by, filters)
               for name, frame in (("bad", bad), ("nulled", nulled))]
    assert results[0].equals(results[1])
    assert results[0]["rows"].sum() > 0


def test_scan_keeps_the_names_and_dtypes_of_float_columns(make_dataset: MakeDataset) -> None:
    bad, _ = poisoned(pl.Float32)
    dataset = make_dataset(bad, base_metadata())
    scanned = PolarsBackend().scan(dataset.path, dataset.metadata, "events").collect()
    assert scanned.schema["waiting_minutes"] == pl.Float32 and scanned.schema["score"] == pl.Float32
    assert scanned["waiting_minutes"].is_finite().fill_null(True).all()
    assert scanned["waiting_minutes"].null_count() == bad["waiting_minutes"].is_finite().not_().sum()


def test_huge_values_are_clipped_to_the_bounds(make_dataset: MakeDataset) -> None:
    frame = events_frame().with_columns(pl.lit(HUGE).alias("waiting_minutes"))
    out = aggregate(make_dataset(frame, base_metadata()), MEASURES["sum"])
    assert out["total"].item() == frame.height * 100 * 100  # every row at the upper bound, in 0.01s


def test_a_sum_saturates_instead_of_wrapping(make_dataset: MakeDataset) -> None:
    # 2**62 units per row at the upper bound: four rows already pass the Int64 range.
    frame = events_frame().with_columns(pl.lit(100.0).alias("waiting_minutes"))
    measure = Measure("sum", "waiting_minutes", lower=0.0, upper=100.0, resolution=100.0 / 2**62)
    out = aggregate(make_dataset(frame, base_metadata()), measure)
    assert frame.height > 4
    assert out["total"].item() == 2**63 - 1


def test_units_beyond_int64_are_refused_whatever_the_data(make_dataset: MakeDataset) -> None:
    """A per-row bound that cannot fit is the request's fault, and refused even on empty data."""
    dataset = make_dataset(events_frame().head(0), base_metadata())
    measure = Measure("sum", "waiting_minutes", lower=0.0, upper=100.0, resolution=1e-30)
    with pytest.raises(ValueError, match="do not fit in Int64"):
        aggregate(dataset, measure)


def test_an_int_column_stored_as_garbage_text_does_not_raise(make_dataset: MakeDataset) -> None:
    frame = events_frame()
    text = [str(v) if i % 4 else "n/a" for i, v in enumerate(frame["satisfaction"])]
    dataset = make_dataset(frame.with_columns(pl.Series("satisfaction", text)), base_metadata())
    readable = frame.filter(pl.int_range(pl.len()) % 4 != 0)
    by_satisfaction = (GroupKey("satisfaction", None, (1, 2, 3, 4, 5)),)
    counts = aggregate(dataset, Measure("rows"), by_satisfaction).drop_nulls("satisfaction")
    assert dict(counts.iter_rows()) == dict(readable.group_by("satisfaction").len().iter_rows())
    total = aggregate(dataset, Measure("sum", "satisfaction", lower=1.0, upper=5.0))
    assert total["total"].item() == readable["satisfaction"].sum()
    assert total["rows"].item() == readable.height  # the unreadable rows are dropped, like nulls


def exact_cells(dataset: LocalDataset, spec: dict[str, Any]) -> pl.DataFrame:
    """What the kinds see: the backend's exact counts aligned on every public cell."""
    plan = Engine().plan(spec, dataset.metadata, dataset.path)
    ctx = plan.context
    request = AggregateRequest(dataset.path, dataset.metadata, "events", 3, ctx.filters,
                               ctx.group_by, plan.kind.measure(ctx))
    return aligned(ctx, PolarsBackend().aggregate(request), ["rows"])


def test_boolean_keys_match_their_cells(make_dataset: MakeDataset) -> None:
    frame = events_frame().with_columns((pl.col("event_id") % 3 == 0).alias("online"))
    metadata = base_metadata()
    metadata["tables"]["events"]["columns"]["online"] = {"type": "bool", "keys": [True, False]}
    cells = exact_cells(make_dataset(frame, metadata),
                        {"aggregate": "count", "epsilon": 1.0, "group_by": ["online"]})
    truth = dict(frame.group_by("online").len().iter_rows())
    assert dict(cells.select("online", "rows").iter_rows()) == truth
    assert set(truth) == {True, False}


def test_text_stored_under_integer_keys_does_not_raise(make_dataset: MakeDataset) -> None:
    """A str column with int keys: the backend answers in the keys' representation, so the
    kinds' alignment on cells never casts (and fails on) unreadable text."""
    frame = events_frame()
    office = [str(1 + i % 3) if i % 5 else "closed" for i in range(frame.height)]
    metadata = base_metadata()
    metadata["tables"]["events"]["columns"]["office"] = {"type": "str", "keys": [1, 2, 3]}
    dataset = make_dataset(frame.with_columns(pl.Series("office", office)), metadata)
    cells = exact_cells(dataset, {"aggregate": "count", "epsilon": 1.0, "group_by": ["office"]})
    truth = {k: office.count(str(k)) for k in (1, 2, 3)}
    assert dict(cells.select("office", "rows").iter_rows()) == truth
    filtered = exact_cells(dataset, {"aggregate": "count", "epsilon": 1.0, "group_by": ["office"],
                                     "filters": [{"column": "office", "op": "in", "values": [1, 3]}]})
    assert dict(filtered.select("office", "rows").iter_rows()) == {1: truth[1], 3: truth[3]}


@pytest.mark.parametrize("filters", [(), (RowFilter("channel", values=CHANNELS),)], ids=["cached", "re-ranked"])
def test_rows_without_a_person_count_for_no_one(make_dataset: MakeDataset, filters: tuple) -> None:
    """Both bounding paths drop rows without a person.

    Bounded together as one "person", they would let one more such row push another out:
    a change of 2L where the sensitivity says L; kept each on its own, they are unbounded.
    """
    frame = events_frame()
    unknown = pl.col("person_id") < 20
    dataset = make_dataset(frame.with_columns(pl.when(unknown).then(None).otherwise(pl.col("person_id"))
                                              .alias("person_id")), base_metadata())
    out = aggregate(dataset, Measure("rows"), filters=filters)
    assert out["rows"].item() == frame.filter(~unknown).height