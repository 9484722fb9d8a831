"""The engine end to end on small datasets whose every row the tests know.

Noise cannot be seeded (OpenDP's samplers are exact and unseedable), so each
statistical assertion uses many releases or a large epsilon, with bounds that fail
when noise is missing or mis-scaled; each states its flake rate.
"""

from __future__ import annotations

import math
import shutil
from datetime import datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from civicdp.privacy.errors import BudgetExhausted
from civicdp.privacy.loss import PrivacyLoss
from civicdp.queries.backend import AggregateRequest
from civicdp.queries.engine import Engine, LocalDataset, Plan
from civicdp.queries.errors import QueryError
from civicdp.queries.polars_backend import PolarsBackend
from tests.conftest import (CHANNELS, MAX_CONTRIBUTIONS, PERIOD, SERVICES, WAIT_BOUNDS, MakeDataset,
                            events_frame)

# With epsilon 10 and L = 3 a count's discrete Laplace scale is 0.3: P(|noise| >= 6) is
# about 4e-9 per cell, so "within 5 of the truth" is a safe per-cell check.
HIGH_EPSILON = 10.0
TOLERANCE = 5


def counts_by(frame: pl.DataFrame, column: str) -> dict[Any, int]:
    return dict(frame.group_by(column).len().iter_rows())


def exact_aggregate(dataset: LocalDataset, spec: dict[str, Any], contributions: int) -> pl.DataFrame:
    """The backend's exact bounded aggregate for ``spec`` (no noise), via the engine's plan."""
    plan = Engine().plan(spec, dataset.metadata, dataset.path)
    ctx = plan.context
    request = AggregateRequest(dataset.path, dataset.metadata, "events", contributions, ctx.filters,
                               ctx.group_by, plan.kind.measure(ctx))
    return PolarsBackend().aggregate(request)


def heavy_person(frame: pl.DataFrame, events: int, service: str, person: int = 999) -> pl.DataFrame:
    """Rows of one extra person with ``events`` events, all to ``service``."""
    start = int(frame["event_id"].max()) + 1
    return pl.DataFrame({
        "event_id": np.arange(start, start + events, dtype=np.int64),
        "person_id": np.full(events, person, dtype=np.int64),
        "service": [service] * events,
        "channel": ["web"] * events,
        "request_time": pl.Series([datetime(2025, 3, 1, 10) for _ in range(events)], dtype=pl.Datetime("us")),
        "waiting_minutes": np.linspace(1, 99, events),  # distinct rows, so hashes differ
        "satisfaction": np.full(events, 4, dtype=np.int64),
        "remark": ["x"] * events,
        "score": np.zeros(events),
    })


# -- accuracy: the stated intervals -------------------------------------------------------


def test_intervals_cover_the_bounded_truth_about_95_percent_of_the_time(dataset: LocalDataset,
                                                                        frame: pl.DataFrame) -> None:
    """300 releases of a 3-cell count: the 95 % intervals cover the truth 90-99 % of the time.

    Every person has at most L rows, so the bounded truth is the raw count. At epsilon
    0.5 (scale 6) the discrete intervals cover with probability ~0.954; over 900 cells
    the coverage has sd 0.007, so [0.90, 0.99] is > 5 sd from it (flake ~2e-7). Noise
    removed gives 100 % coverage, halved noise ~99.8 %, doubled noise ~79 %: all fail.
    """
    spec = {"aggregate": "count", "group_by": ["service"], "epsilon": 0.5}
    truth = counts_by(frame, "service")
    assert frame.group_by("person_id").len()["len"].max() <= MAX_CONTRIBUTIONS
    exact = exact_aggregate(dataset, spec, MAX_CONTRIBUTIONS)
    assert dict(exact.select("service", "rows").iter_rows()) == truth  # bounded == raw here
    half_width = dataset.estimate(spec).accuracy["half_width"]

    covered, released = 0, []
    for _ in range(300):
        table = dataset.run(spec).table
        assert table["service"].to_list() == list(SERVICES)
        for key, value, low, high in table.select("service", "value", "ci_low", "ci_high").iter_rows():
            covered += low <= truth[key] <= high
            assert high - low == pytest.approx(2 * half_width)
            released.append(value - truth[key])
    coverage = covered / len(released)
    assert 0.90 <= coverage <= 0.99, coverage
    assert np.std(released) > 3  # the released values spread like noise of scale 6 (sd ~8.5)


# -- contribution bounding --------------------------------------------------------------


@pytest.mark.parametrize("contributions", [1, 3, 10], ids=["L1", "L3", "L10"])
def test_one_heavy_person_moves_exact_counts_by_at_most_l(make_dataset: MakeDataset, frame: pl.DataFrame,
                                                          contributions: int) -> None:
    """A person with 1,000 events adds exactly L to their key's bounded count and nothing elsewhere."""
    spec = {"aggregate": "count", "group_by": ["service"], "epsilon": 1.0}
    without = make_dataset(frame, name="without")
    with_heavy = make_dataset(pl.concat([frame, heavy_person(frame, 1000, "B")]), name="with")
    before = dict(exact_aggregate(without, spec, contributions).select("service", "rows").iter_rows())
    after = dict(exact_aggregate(with_heavy, spec, contributions).select("service", "rows").iter_rows())
    assert after["B"] - before["B"] == contributions
    assert {k: after[k] - before[k] for k in ("A", "C")} == {"A": 0, "C": 0}  # stable truncation


def test_one_heavy_person_moves_released_counts_by_at_most_l(make_dataset: MakeDataset,
                                                             frame: pl.DataFrame) -> None:
    """Released counts, averaged at high epsilon, move by L (not 1,000) when the heavy person joins.

    The mean of 20 releases at scale 0.3 has sd ~0.06; a tolerance of 1 is 16 sd.
    """
    spec = {"aggregate": "count", "group_by": ["service"], "epsilon": HIGH_EPSILON}
    without = make_dataset(frame, name="without")
    with_heavy = make_dataset(pl.concat([frame, heavy_person(frame, 1000, "B")]), name="with")

    def mean_release(dataset: LocalDataset) -> dict[str, float]:
        tables = [dataset.run(spec).table for _ in range(20)]
        return pl.concat(tables).group_by("service").agg(pl.col("value").mean()).pipe(
            lambda t: dict(t.iter_rows()))

    before, after = mean_release(without), mean_release(with_heavy)
    assert abs(after["B"] - before["B"] - MAX_CONTRIBUTIONS) <= 1
    assert abs(after["A"] - before["A"]) <= 1
    assert abs(after["C"] - before["C"]) <= 1


def test_bounding_keeps_at_most_l_rows_of_every_person(make_dataset: MakeDataset) -> None:
    """With people of 1..12 rows, the bounded total is sum(min(rows, L)) for each L."""
    people = np.repeat(np.arange(12), np.arange(1, 13))
    base = events_frame(people=1)
    frame = pl.concat([heavy_person(base, int(n), "A", person=int(p)).with_columns(
        pl.col("event_id") + 100 * int(p)) for p, n in zip(range(12), range(1, 13))])
    assert frame.height == len(people)
    dataset = make_dataset(frame)
    for contributions in (1, 2, 5, 12, 20):
        exact = exact_aggregate(dataset, {"aggregate": "count", "epsilon": 1.0}, contributions)
        assert exact["rows"].item() == sum(min(n, contributions) for n in range(1, 13))


# -- clipping ------------------------------------------------------------------------


@pytest.fixture
def outlier_frame() -> pl.DataFrame:
    """The default frame with a third of the waiting times far above and some far below bounds."""
    frame = events_frame()
    waits = frame["waiting_minutes"].to_numpy().copy()
    waits[::3] = 10_000.0
    waits[1::7] = -500.0
    return frame.with_columns(pl.Series("waiting_minutes", waits))


def test_sum_equals_the_clipped_sum_exactly_before_noise(make_dataset: MakeDataset,
                                                         outlier_frame: pl.DataFrame) -> None:
    """The backend sums values clipped to the declared (or narrower asked) bounds."""
    dataset = make_dataset(outlier_frame)
    waits = outlier_frame["waiting_minutes"].to_numpy()
    for bounds in (WAIT_BOUNDS, (10.0, 50.0)):
        spec = {"aggregate": "sum", "column": "waiting_minutes", "bounds": list(bounds), "epsilon": 1.0}
        exact = exact_aggregate(dataset, spec, MAX_CONTRIBUTIONS)
        resolution = dataset.metadata.tables["events"].columns["waiting_minutes"].value_resolution
        assert exact["total"].item() * resolution == pytest.approx(np.clip(waits, *bounds).sum(), abs=0.01)


def test_released_sum_equals_the_clipped_sum_in_expectation(make_dataset: MakeDataset,
                                                            outlier_frame: pl.DataFrame) -> None:
    """The mean of 40 sums at epsilon 10 is near the clipped sum, far from the raw one.

    The sum's noise has scale L * 100 / 10 = 30 minutes; the mean of 40 has sd ~6.7, so
    a tolerance of 35 is > 5 sd (flake ~2e-7). The raw sum is ~300,000 minutes larger.
    """
    dataset = make_dataset(outlier_frame)
    waits = outlier_frame["waiting_minutes"].to_numpy()
    clipped = np.clip(waits, *WAIT_BOUNDS).sum()
    spec = {"aggregate": "sum", "column": "waiting_minutes", "epsilon": HIGH_EPSILON}
    values = [dataset.run(spec).table["value"].item() for _ in range(40)]
    assert abs(np.mean(values) - clipped) < 35
    assert abs(waits.sum() - clipped) > 1000
    assert np.std(values) > 5  # noise is there (sd ~42)


def test_released_mean_equals_the_clipped_mean_in_expectation(make_dataset: MakeDataset,
                                                              outlier_frame: pl.DataFrame) -> None:
    """The mean of 40 means at epsilon 10 is near the clipped mean (sd of that average ~0.3)."""
    dataset = make_dataset(outlier_frame)
    waits = outlier_frame["waiting_minutes"].to_numpy()
    clipped_mean = np.clip(waits, *WAIT_BOUNDS).mean()
    spec = {"aggregate": "mean", "column": "waiting_minutes", "epsilon": HIGH_EPSILON}
    values = [dataset.run(spec).table["value"].item() for _ in range(40)]
    assert abs(np.mean(values) - clipped_mean) < 2.5
    assert abs(waits.mean() - clipped_mean) > 100


def test_mean_and_its_interval_always_lie_within_the_bounds(make_dataset: MakeDataset,
                                                            outlier_frame: pl.DataFrame) -> None:
    """At epsilon 0.05 the noisy sum dwarfs the count, yet every mean stays within [0, 100].

    Groups by channel include "kiosk", which has no rows: its noisy count may be <= 0,
    in which case no value is released (None) and the interval is the whole range.
    """
    dataset = make_dataset(outlier_frame)
    spec = {"aggregate": "mean", "column": "waiting_minutes", "group_by": ["channel"], "epsilon": 0.05}
    lo, hi = WAIT_BOUNDS
    values = []
    for _ in range(50):
        table = dataset.run(spec).table
        for value, low, high in table.select("value", "ci_low", "ci_high").iter_rows():
            assert lo <= low <= high <= hi
            if value is not None:
                assert lo <= value <= hi
                values.append(value)
    assert values.count(lo) + values.count(hi) > 0  # clamping was exercised (noise scale ~1,200)
    assert len(set(values)) > 10


# -- public keys -----------------------------------------------------------------------


@pytest.fixture
def fax_dataset(make_dataset: MakeDataset) -> tuple[LocalDataset, pl.DataFrame]:
    """Data with an undeclared channel "fax" and without the declared channel "kiosk"."""
    frame = events_frame()
    channels = frame["channel"].to_list()
    channels[::4] = ["fax"] * len(channels[::4])
    frame = frame.with_columns(pl.Series("channel", channels))
    return make_dataset(frame), frame


@pytest.mark.parametrize("spec", [
    {"aggregate": "count"},
    {"aggregate": "sum", "column": "waiting_minutes"},
    {"aggregate": "mean", "column": "waiting_minutes"},
    {"aggregate": "histogram", "column": "waiting_minutes", "bins": [0, 50, 100]},
    {"aggregate": "quantiles", "column": "waiting_minutes", "quantiles": [0.5],
     "candidates": {"start": 0, "stop": 100, "step": 10}},
], ids=["count", "sum", "mean", "histogram", "quantiles"])
def test_output_rows_are_exactly_the_declared_keys(fax_dataset: tuple[LocalDataset, pl.DataFrame],
                                                   spec: dict[str, Any]) -> None:
    """Every declared key gets a row (even if absent from the data); undeclared values never appear."""
    dataset, _ = fax_dataset
    table = dataset.run({**spec, "group_by": ["channel"], "epsilon": 1.0}).table
    keys = table["channel"].unique(maintain_order=True).to_list()
    assert keys == list(CHANNELS)
    assert "fax" not in table["channel"].to_list()


def test_absent_key_gets_a_noisy_zero_and_undeclared_rows_are_not_counted(
        fax_dataset: tuple[LocalDataset, pl.DataFrame]) -> None:
    """"kiosk" is released near 0 and "fax" rows do not leak into any declared key."""
    dataset, frame = fax_dataset
    truth = counts_by(frame, "channel")
    assert "kiosk" not in truth and truth["fax"] > 10
    spec = {"aggregate": "count", "group_by": ["channel"], "epsilon": HIGH_EPSILON}
    released = dict(dataset.run(spec).table.select("channel", "value").iter_rows())
    assert abs(released["kiosk"]) <= TOLERANCE
    for key in ("counter", "web", "mobile"):
        assert abs(released[key] - truth[key]) <= TOLERANCE


def test_absent_keys_are_noisy_not_zero(make_dataset: MakeDataset) -> None:
    """At a small epsilon the absent key's count is noise: not always 0 over 30 releases.

    At scale 30 a released 0 has probability ~0.017, so 30 zeros in a row never happen.
    """
    dataset = make_dataset(events_frame())
    spec = {"aggregate": "count", "group_by": ["channel"], "epsilon": 0.1}
    kiosk = [dict(dataset.run(spec).table.select("channel", "value").iter_rows())["kiosk"] for _ in range(30)]
    assert any(v != 0 for v in kiosk)


# -- quantiles ---------------------------------------------------------------------------


@pytest.mark.parametrize("candidates", [
    {"start": 0, "stop": 100, "step": 2.5},
    [0, 10.5, 33, 77.7, 100],
], ids=["grid", "list"])
def test_quantiles_are_always_candidates(dataset: LocalDataset, candidates: Any) -> None:
    """Every released quantile is one of the public candidates, even at a tiny epsilon."""
    spec = {"aggregate": "quantiles", "column": "waiting_minutes", "quantiles": [0.1, 0.5, 0.9],
            "candidates": candidates, "group_by": ["service"], "epsilon": 0.01}
    grid = ([round(i * 2.5, 4) for i in range(41)] if isinstance(candidates, dict)
            else [float(c) for c in candidates])
    values, interval_ends = [], []
    for _ in range(20):
        table = dataset.run(spec).table
        assert table.height == len(SERVICES) * 3
        values += table["value"].to_list()
        interval_ends += [v for v in table["ci_low"].to_list() + table["ci_high"].to_list() if v is not None]
    assert set(values) <= set(grid)
    assert set(interval_ends) <= set(grid)  # interval ends, when given, are candidates too
    assert len(set(values)) > 2  # noise spreads the choice across candidates


def test_quantiles_are_near_the_truth_at_large_epsilon(make_dataset: MakeDataset) -> None:
    """At epsilon 10 on 3,000 evenly spread values the quantiles land within 3 of the truth.

    With 30 values per minute, 3 minutes is 90 rows of rank; the exponential mechanism's
    rank error at 95 % is ~20-40 rows here (even if part of the loss goes to intervals),
    and missing by 90 rows has probability below 1e-9 per release.
    """
    frame = events_frame(people=1500)
    dataset = make_dataset(frame)
    levels = [0.25, 0.5, 0.75]
    spec = {"aggregate": "quantiles", "column": "waiting_minutes", "quantiles": levels,
            "candidates": {"start": 0, "stop": 100, "step": 0.5}, "epsilon": HIGH_EPSILON}
    waits = frame["waiting_minutes"].to_numpy()
    truth = {level: float(np.quantile(waits, level)) for level in levels}
    for _ in range(5):
        table = dataset.run(spec).table
        assert table["quantile"].to_list() == levels
        for level, value in table.select("quantile", "value").iter_rows():
            assert abs(value - truth[level]) <= 3, (level, value, truth[level])


# -- histograms ----------------------------------------------------------------------------


def test_histogram_counts_per_bin_are_correct_in_expectation(make_dataset: MakeDataset) -> None:
    """Bins are left-closed, the outer bins take values beyond the edges; 20 releases average to the truth.

    The mean of 20 releases at scale 0.3 has sd ~0.06 per bin: a tolerance of 0.5 is 8 sd.
    """
    frame = events_frame()
    waits = frame["waiting_minutes"].to_numpy().copy()
    waits[:6] = [25.0, 50.0, 75.0, -5.0, 150.0, 0.0]  # edges, and values beyond the outer edges
    frame = frame.with_columns(pl.Series("waiting_minutes", waits))
    dataset = make_dataset(frame)
    edges = [0, 25, 50, 75, 100]
    inner = np.asarray(edges[1:-1], dtype=float)
    truth = np.bincount(np.searchsorted(inner, waits, side="right"), minlength=4)
    spec = {"aggregate": "histogram", "column": "waiting_minutes", "bins": edges, "epsilon": HIGH_EPSILON}
    tables = [dataset.run(spec).table for _ in range(20)]
    assert tables[0]["bin"].to_list() == ["[0, 25)", "[25, 50)", "[50, 75)", "[75, 100)"]
    means = np.mean([t["value"].to_numpy() for t in tables], axis=0)
    assert np.abs(means - truth).max() <= 0.5, (means, truth)


# -- time buckets ------------------------------------------------------------------------


@pytest.mark.parametrize("bucket, keys", [
    ("hour", list(range(24))),
    ("weekday", list(range(1, 8))),
    ("month", ["2025-01", "2025-02", "2025-03", "2025-04", "2025-05", "2025-06"]),
    ("week", [f"2025-W{w:02d}" for w in range(1, 28)]),  # Mon 30 Dec 2024 .. Mon 30 Jun 2025
    ("day", None),
], ids=["hour", "weekday", "month", "week", "day"])
def test_time_buckets_give_the_declared_period_keys_and_right_counts(dataset: LocalDataset, frame: pl.DataFrame,
                                                                     bucket: str, keys: list | None) -> None:
    """Grouping by a time bucket gives one row per key of the declared period, with correct counts."""
    name = f"request_time:{bucket}"
    bucketed = frame.select(
        pl.col("request_time").dt.hour().cast(pl.Int64).alias("hour"),
        pl.col("request_time").dt.weekday().cast(pl.Int64).alias("weekday"),
        pl.col("request_time").dt.strftime("%Y-%m").alias("month"),
        pl.col("request_time").dt.strftime("%Y-%m-%d").alias("day"),
        pl.col("request_time").dt.strftime("%G-W%V").alias("week"),
    )
    truth = counts_by(bucketed, bucket)
    if keys is None:  # 1 January to 30 June 2025
        keys = [str(d) for d in pl.date_range(PERIOD[0].date(), datetime(2025, 6, 30).date(), eager=True)]
        assert len(keys) == 181
    table = dataset.run({"aggregate": "count", "group_by": [name], "epsilon": HIGH_EPSILON}).table
    assert table[name].to_list() == keys
    for key, value in table.select(name, "value").iter_rows():
        assert abs(value - truth.get(key, 0)) <= TOLERANCE, key


# -- filters ---------------------------------------------------------------------------


@pytest.mark.parametrize("row_filter, keep", [
    ({"column": "service", "op": "eq", "value": "A"}, pl.col("service") == "A"),
    ({"column": "channel", "op": "in", "values": ["counter", "web"]}, pl.col("channel").is_in(["counter", "web"])),
    ({"column": "satisfaction", "op": "in", "values": [4, 5]}, pl.col("satisfaction") >= 4),
    ({"column": "request_time", "op": "between", "start": "2025-02-01T00:00:00", "end": "2025-04-01T00:00:00"},
     pl.col("request_time").is_between(datetime(2025, 2, 1), datetime(2025, 4, 1), closed="left")),
    ({"column": "request_time", "op": "between", "start": "2025-05-15T00:00:00"},
     pl.col("request_time") >= datetime(2025, 5, 15)),
    ({"column": "request_time:hour", "op": "in", "values": list(range(0, 12))},
     pl.col("request_time").dt.hour() < 12),
], ids=["eq", "in", "in-int", "between", "open-ended-between", "hour-in"])
def test_filters_restrict_rows(dataset: LocalDataset, frame: pl.DataFrame, row_filter: dict,
                               keep: pl.Expr) -> None:
    """A filtered count at epsilon 10 matches the filtered truth, which is well below the total."""
    truth = frame.filter(keep).height
    assert truth < frame.height - 3 * TOLERANCE  # the filter matters
    spec = {"aggregate": "count", "filters": [row_filter], "epsilon": HIGH_EPSILON}
    assert abs(dataset.run(spec).table["value"].item() - truth) <= TOLERANCE


def test_filters_combine_with_grouping(dataset: LocalDataset, frame: pl.DataFrame) -> None:
    """Filters apply before grouping: counts per service among web requests."""
    truth = counts_by(frame.filter(pl.col("channel") == "web"), "service")
    spec = {"aggregate": "count", "group_by": ["service"], "epsilon": HIGH_EPSILON,
            "filters": [{"column": "channel", "op": "eq", "value": "web"}]}
    for key, value in dataset.run(spec).table.select("service", "value").iter_rows():
        assert abs(value - truth.get(key, 0)) <= TOLERANCE


# -- "auto" contributions -----------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.1, 1.0, 3.0], ids=["0.1", "1", "3"])
def test_auto_contributions_choose_a_bound_in_range_and_charge_epsilon(dataset: LocalDataset,
                                                                       epsilon: float) -> None:
    """The bound chosen privately lies in 1..limit; the total loss is the spec's epsilon."""
    limit = dataset.metadata.max_contributions_limit
    # 181 days: enough groups for a private choice of the bound (see queries/auto_bound.py)
    spec = {"aggregate": "count", "group_by": ["request_time:day"], "epsilon": epsilon, "contributions": "auto"}
    for _ in range(5):
        result = dataset.run(spec)
        assert 1 <= result.contributions <= limit
        assert float(result.loss.epsilon) == pytest.approx(epsilon, rel=1e-9)
        described = sum(m["epsilon"] for m in result.mechanisms)
        assert described == pytest.approx(epsilon, rel=1e-9)
        chosen = [m for m in result.mechanisms if m["role"] == "contribution bound"]
        assert chosen and chosen[0]["chosen"] == result.contributions
        counts = [m for m in result.mechanisms if m["role"] == "counts"]
        assert counts[0]["sensitivity"] == result.contributions
    assert dataset.estimate(spec).loss == dataset.run(spec).loss


def test_auto_contributions_fall_back_to_the_fixed_bound_when_too_coarse(dataset: LocalDataset) -> None:
    """Three groups: a private choice could not be safely better, so the whole loss answers at the fixed bound."""
    spec = {"aggregate": "count", "group_by": ["service"], "epsilon": 0.5, "contributions": "auto"}
    estimate, result = dataset.estimate(spec), dataset.run(spec)
    fixed = dataset.metadata.max_contributions
    assert estimate.contributions == result.contributions == fixed
    assert float(result.loss.epsilon) == pytest.approx(0.5, rel=1e-9)
    assert [m["role"] for m in result.mechanisms] == ["counts"]
    assert result.mechanisms[0]["epsilon"] == pytest.approx(0.5, rel=1e-9)
    for notes in (estimate.notes, result.notes):
        assert any(note.startswith("contributions 'auto' kept the dataset's bound") for note in notes)


def test_auto_contributions_refuse_a_target_accuracy(dataset: LocalDataset) -> None:
    """A target accuracy needs a fixed bound (noise is calibrated before data is read)."""
    with pytest.raises(QueryError, match="contributions: a target accuracy needs a fixed contribution bound"):
        dataset.estimate({"aggregate": "count", "accuracy": 10, "contributions": "auto"})


# -- cost before data ---------------------------------------------------------------------


class ExplodingBackend:
    """A backend that fails the test if the engine touches data."""

    def aggregate(self, request: AggregateRequest) -> pl.DataFrame:
        raise AssertionError("the data was read")

    def contribution_profile(self, *args: object) -> np.ndarray:
        raise AssertionError("the data was read")


SPECS = [
    {"aggregate": "count", "group_by": ["service", "request_time:month"], "epsilon": 0.3},
    {"aggregate": "count", "epsilon": 0.3, "contributions": "auto"},
    {"aggregate": "count", "accuracy": 20},
    {"aggregate": "sum", "column": "waiting_minutes", "epsilon": 0.7, "contributions": 5},
    {"aggregate": "sum", "column": "waiting_minutes", "accuracy": 500},
    {"aggregate": "mean", "column": "waiting_minutes", "group_by": ["channel"], "epsilon": 0.4},
    {"aggregate": "histogram", "column": "waiting_minutes", "bins": [0, 10, 100], "epsilon": 0.2},
    {"aggregate": "quantiles", "column": "waiting_minutes", "quantiles": [0.5, 0.9], "epsilon": 0.6},
]
SPEC_IDS = ["count", "count-auto", "count-accuracy", "sum", "sum-accuracy", "mean", "histogram", "quantiles"]


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_estimate_needs_only_the_metadata(tmp_path: Path, dataset: LocalDataset, spec: dict[str, Any]) -> None:
    """Estimating works on a folder holding only metadata.json, and costs what the run costs."""
    bare = tmp_path / "metadata-only"
    bare.mkdir()
    shutil.copy(dataset.path / "metadata.json", bare / "metadata.json")
    assert [p.name for p in bare.iterdir()] == ["metadata.json"]
    estimate = LocalDataset(bare).estimate(spec)
    assert estimate.loss.epsilon > 0
    assert LocalDataset(bare, Engine(ExplodingBackend())).estimate(spec).loss == estimate.loss
    assert dataset.run(spec).loss == estimate.loss
    assert [p.name for p in bare.iterdir()] == ["metadata.json"]  # not even a cache was written


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_run_charges_the_plan_before_reading_data(dataset: LocalDataset, spec: dict[str, Any]) -> None:
    """``before_release`` sees the full loss first; if it refuses, no data is read and nothing is released."""
    seen: list[PrivacyLoss] = []

    def refuse(plan: Plan) -> None:
        seen.append(plan.loss)
        raise BudgetExhausted(requested=plan.loss.epsilon, remaining=Fraction(0))

    engine = Engine(ExplodingBackend())
    with pytest.raises(BudgetExhausted, match="exceeding the remaining budget"):
        engine.run(spec, dataset.metadata, dataset.path, before_release=refuse)
    assert seen == [dataset.estimate(spec).loss]

    charged: list[PrivacyLoss] = []
    result = Engine().run(spec, dataset.metadata, dataset.path, before_release=lambda p: charged.append(p.loss))
    assert charged == [result.loss]  # exactly one charge, of the loss the answer reports


@pytest.mark.parametrize("spec", [s for s in SPECS if "epsilon" in s], ids=[i for s, i in zip(SPECS, SPEC_IDS)
                                                                             if "epsilon" in s])
def test_loss_charged_is_the_asked_epsilon(dataset: LocalDataset, spec: dict[str, Any]) -> None:
    """Whatever the kind, a run reports (and a caller charges) the spec's epsilon, never less."""
    result = dataset.run(spec)
    assert float(result.loss.epsilon) == pytest.approx(spec["epsilon"], rel=1e-9)
    assert result.loss.delta == 0


# -- target accuracy ----------------------------------------------------------------------


@pytest.mark.parametrize("target", [50.0, 10.0, 2.5], ids=["50", "10", "2.5"])
def test_target_accuracy_is_met_and_costs_a_positive_epsilon(dataset: LocalDataset, target: float) -> None:
    """A count asked at ±target gets a predicted half-width of at most target, for some epsilon > 0."""
    estimate = dataset.estimate({"aggregate": "count", "group_by": ["service"], "accuracy": target})
    assert 0 < estimate.accuracy["half_width"] <= target
    assert estimate.accuracy["half_width"] == pytest.approx(target, rel=1e-6)
    assert 0 < estimate.loss.epsilon < math.inf
    result = dataset.run({"aggregate": "count", "group_by": ["service"], "accuracy": target})
    assert result.loss == estimate.loss
    widths = (result.table["ci_high"] - result.table["ci_low"]).to_numpy()
    assert np.all(widths <= 2 * target)


def test_a_smaller_target_costs_more(dataset: LocalDataset) -> None:
    """Halving the target accuracy roughly doubles the privacy loss."""
    costs = [dataset.estimate({"aggregate": "count", "accuracy": a}).loss.epsilon for a in (100, 50, 10)]
    assert costs[0] < costs[1] < costs[2]
    assert float(costs[1] / costs[0]) == pytest.approx(2, rel=0.05)


def test_target_accuracy_for_a_sum_is_in_the_column_unit(dataset: LocalDataset) -> None:
    """A sum asked at ±500 minutes is predicted at ±500 minutes or better."""
    estimate = dataset.estimate({"aggregate": "sum", "column": "waiting_minutes", "accuracy": 500})
    assert 0 < estimate.accuracy["half_width"] <= 500
    assert estimate.accuracy["half_width"] == pytest.approx(500, rel=1e-6)
