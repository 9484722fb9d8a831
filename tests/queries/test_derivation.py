"""Answers derived from stored releases (issue 18): what is derivable, the values, the intervals.

The values must be the hand-made roll-up (or ratio) of the stored rows, and equal a fresh
answer when the noise is removed (at a bound of one row per person, people having up to
three); any question that is not a function of them (a subset by an extra filter: filters
apply before bounding) must not be derived; the intervals must cover at their stated level
(statistical test at the end, flake rate stated there).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from civicdp.privacy import accuracy
from civicdp.privacy.mechanisms import GaussianVector, LaplaceVector
from civicdp.queries import derivation, derivation_noise
from civicdp.queries.engine import LocalDataset
from civicdp.queries.spec import parse_spec
from tests.conftest import base_metadata, events_frame, write_dataset
from tests.queries.derivation_data import DEPARTMENT, DEPARTMENTS, stored, write_catalogue_dataset

BY_SERVICE_CHANNEL = {"aggregate": "count", "group_by": ["service", "channel"], "epsilon": 1.0}
WAIT_SUM = {"aggregate": "sum", "column": "waiting_minutes", "group_by": ["service"], "epsilon": 1.0}
WAIT_COUNT = {"aggregate": "count", "column": "waiting_minutes", "group_by": ["service"], "epsilon": 1.0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> LocalDataset:
    return LocalDataset(write_catalogue_dataset(tmp_path_factory.mktemp("derivation") / "ds"))


@pytest.fixture(scope="module")
def releases(dataset: LocalDataset) -> list[derivation.StoredRelease]:
    return [stored(dataset, 1, BY_SERVICE_CHANNEL), stored(dataset, 2, WAIT_SUM), stored(dataset, 3, WAIT_COUNT)]


def _derive(dataset: LocalDataset, spec: dict[str, Any], releases: list[derivation.StoredRelease]
            ) -> derivation.Derived | None:
    plan = dataset.engine.plan(spec, dataset.metadata, dataset.path)
    parents = derivation.catalogue_parents(dataset.metadata, dataset.path)
    answer = derivation.derive(plan, releases, parents)
    # The server's quick test before reading stored answers must keep every release that serves.
    assert answer is None or all(derivation.usable(plan, r.spec, parents) for r in releases if r.id in answer.sources)
    return answer


def _cells(rows: list[dict[str, Any]], *names: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {tuple(r[n] for n in names): r for r in rows}


def test_a_roll_up_is_the_sum_of_the_stored_cells_the_catalogue_assigns(
        dataset: LocalDataset, releases: list[derivation.StoredRelease]) -> None:
    answer = _derive(dataset, {"aggregate": "count", "group_by": ["department", "channel"], "epsilon": 0.1},
                     releases)
    assert answer is not None and answer.sources == (1,)
    source = _cells(releases[0].body["rows"], "service", "channel")
    got = _cells(answer.body["rows"], "department", "channel")
    assert len(got) == len(DEPARTMENTS) * 4
    single = LaplaceVector(3, releases[0].body["mechanisms"][0]["scale"]).accuracy(0.05)
    for (department, channel), row in got.items():
        services = [s for s, d in DEPARTMENT.items() if d == department]
        assert row["value"] == sum(source[s, channel]["value"] for s in services)
        half = row["ci_high"] - row["value"]
        assert row["value"] - row["ci_low"] == pytest.approx(half)
        assert services
        if len(services) == 1:  # one stored cell: its own interval
            assert (row["ci_low"], row["ci_high"]) == (source[services[0], channel]["ci_low"],
                                                       source[services[0], channel]["ci_high"])
        else:  # two independent noises: wider than one, narrower than the union bound of two
            assert single < half < 2 * LaplaceVector(3, 3.0).accuracy(0.025)
    assert "roll-up" in answer.how and "service -> department" in answer.how
    assert answer.body["loss"] == {"epsilon": 0.0, "delta": 0.0}


def test_a_sum_rolls_up_exactly_in_units_of_the_resolution(
        dataset: LocalDataset, releases: list[derivation.StoredRelease]) -> None:
    answer = _derive(dataset, {"aggregate": "sum", "column": "waiting_minutes", "group_by": ["department"],
                               "epsilon": 0.3}, releases)
    assert answer is not None and answer.sources == (2,)
    source = _cells(releases[1].body["rows"], "service")
    resolution = dataset.metadata.tables["events"].columns["waiting_minutes"].value_resolution
    by_department = _cells(answer.body["rows"], "department")
    expected = round(source["A",]["value"] / resolution) + round(source["B",]["value"] / resolution)
    assert by_department["D1",]["value"] == pytest.approx(expected * resolution, abs=1e-9)
    assert by_department["D2",]["value"] == source["C",]["value"]


def test_a_zcdp_sum_rolls_up_with_a_closed_form_bound_where_computing_would_not_fit(tmp_path: Path) -> None:
    zcdp = LocalDataset(write_catalogue_dataset(tmp_path / "zcdp", zcdp=True))
    release = stored(zcdp, 1, WAIT_SUM)
    mechanism = release.body["mechanisms"][0]
    assert mechanism["mechanism"] == "discrete Gaussian" and mechanism["scale"] > 1e6  # far beyond the FFT's reach
    answer = _derive(zcdp, {**WAIT_SUM, "group_by": ["department"], "epsilon": 0.3}, [release])
    assert answer is not None
    resolution = zcdp.metadata.tables["events"].columns["waiting_minutes"].value_resolution
    d1 = _cells(answer.body["rows"], "department")["D1",]
    chernoff = accuracy.chernoff_threshold("gaussian", mechanism["scale"], (1, 1), (2, 0), 0.025) - 1
    assert d1["ci_high"] - d1["value"] == pytest.approx(chernoff * resolution)


def _noiseless(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LaplaceVector, "release", lambda self, values: [int(v) for v in values])


ONE_ROW = {"contributions": 1}  # people have up to 3 rows: bounding keeps one, chosen among the filtered rows


@pytest.mark.parametrize("question", [
    {"aggregate": "count", "group_by": ["department", "channel"]},
    {"aggregate": "count", "group_by": ["department"], "filters": [{"column": "channel", "op": "eq", "value": "web"}]},
    {"aggregate": "sum", "column": "waiting_minutes", "group_by": ["department"]},
    {"aggregate": "mean", "column": "waiting_minutes", "group_by": ["department"]},
], ids=["count by department", "the same filters", "sum", "mean"])
def test_a_derived_answer_is_the_fresh_answer_without_noise(
        dataset: LocalDataset, monkeypatch: pytest.MonkeyPatch, question: dict[str, Any]) -> None:
    _noiseless(monkeypatch)
    finer = {**question, "group_by": [("service" if g == "department" else g) for g in question["group_by"]]}
    aggregates = ("sum", "count") if question["aggregate"] == "mean" else (question["aggregate"],)
    sources = [stored(dataset, i, {**finer, **ONE_ROW, "aggregate": a, "epsilon": 5.0})
               for i, a in enumerate(aggregates, 1)]
    answer = _derive(dataset, {**question, **ONE_ROW, "epsilon": 0.5}, sources)
    assert answer is not None
    names = question["group_by"]
    fresh = _cells(dataset.run({**question, **ONE_ROW, "epsilon": 0.5}).table.to_dicts(), *names)
    got = _cells(answer.body["rows"], *names)
    assert got.keys() == fresh.keys()
    for key, row in got.items():
        assert row["value"] == pytest.approx(fresh[key]["value"], abs=1e-9), key
        assert row["ci_low"] <= fresh[key]["value"] <= row["ci_high"]


SUBSETS = {
    "eq on a grouped column": {"group_by": ["channel"], "filters": [{"column": "service", "op": "eq", "value": "B"}]},
    "in on a grouped column, kept": {"group_by": ["service", "channel"],
                                     "filters": [{"column": "service", "op": "in", "values": ["C", "A"]}]},
    "eq on the coarser column": {"group_by": ["channel"],
                                 "filters": [{"column": "department", "op": "eq", "value": "D1"}]},
}


@pytest.mark.parametrize("question", SUBSETS.values(), ids=SUBSETS.keys())
def test_an_extra_filter_is_not_derived_since_it_changes_which_rows_are_bounded(
        dataset: LocalDataset, monkeypatch: pytest.MonkeyPatch, question: dict[str, Any]) -> None:
    """The release's cells are not the filtered question's answer: the engine filters, then bounds."""
    _noiseless(monkeypatch)
    source = stored(dataset, 1, {"aggregate": "count", "group_by": ["service", "channel"], "epsilon": 10.0,
                                 **ONE_ROW})
    spec = {"aggregate": "count", "epsilon": 1.0, **ONE_ROW, **question}
    # What the release's cells would have given, against the fresh answer: they differ (the reason).
    fresh = dataset.run(spec).table
    selected = [r for r in source.body["rows"] if _passes(r, spec["filters"])]
    total = sum(r["value"] for r in selected)
    assert total < fresh["value"].sum()
    assert _derive(dataset, spec, [source]) is None


def _passes(row: dict[str, Any], filters: list[dict[str, Any]]) -> bool:
    for f in filters:
        value = row.get(f["column"], DEPARTMENT.get(row["service"]))
        if value not in f.get("values", [f.get("value")]):
            return False
    return True


def test_a_coarse_key_without_a_catalogue_member_is_not_derived(tmp_path: Path) -> None:
    """D3 is declared but has no service: no release answers it (a fresh answer counts the data's D3 rows)."""
    empty = LocalDataset(write_catalogue_dataset(tmp_path / "empty", empty_department=True))
    release = stored(empty, 1, BY_SERVICE_CHANNEL)
    assert _derive(empty, {"aggregate": "count", "group_by": ["department", "channel"], "epsilon": 0.1},
                   [release]) is None


def test_a_roll_up_says_it_answers_the_catalogue_grouping(
        dataset: LocalDataset, releases: list[derivation.StoredRelease]) -> None:
    answer = _derive(dataset, {"aggregate": "count", "group_by": ["department", "channel"], "epsilon": 0.1},
                     releases)
    assert answer is not None
    assert any("catalogue's grouping" in note and "disagrees" in note for note in answer.body["notes"])


def test_a_refused_candidate_costs_one_tail_bound_and_bounds_are_memoised(
        dataset: LocalDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1,448-cell roll-up by day: one bound for a refused release, one per distinct size for a served one."""
    calls: list[tuple[Any, ...]] = []
    real = accuracy.sum_tail_threshold

    def counted(*args: Any) -> int:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(accuracy, "sum_tail_threshold", counted)
    derivation_noise._sum.cache_clear()
    by_day = stored(dataset, 1, {"aggregate": "count", "group_by": ["service", "channel", "request_time:day"],
                                 "epsilon": 0.05})
    question = {"aggregate": "count", "group_by": ["department", "channel", "request_time:day"]}
    assert _derive(dataset, {**question, "epsilon": 5.0}, [by_day]) is None  # too accurate: refused
    assert len(calls) == 1
    answer = _derive(dataset, {**question, "epsilon": 0.01}, [by_day])
    assert answer is not None and len(answer.body["rows"]) > 1000
    assert len(calls) == 1  # sizes 1 and 2 only: 2 is memoised, 1 is the mechanism's own half-width


def test_a_mean_is_the_ratio_of_a_released_sum_and_count(
        dataset: LocalDataset, releases: list[derivation.StoredRelease]) -> None:
    answer = _derive(dataset, {"aggregate": "mean", "column": "waiting_minutes", "group_by": ["service"],
                               "epsilon": 1.0}, releases)
    assert answer is not None and answer.sources == (2, 3) and "ratio" in answer.how
    sums, counts = _cells(releases[1].body["rows"], "service"), _cells(releases[2].body["rows"], "service")
    sum_mech, count_mech = (releases[i].body["mechanisms"][0] for i in (1, 2))
    resolution = dataset.metadata.tables["events"].columns["waiting_minutes"].value_resolution
    for row in answer.body["rows"]:
        s, c = sums[row["service"],]["value"], counts[row["service"],]["value"]
        interval = accuracy.ratio(s, LaplaceVector(1, sum_mech["scale"]).accuracy(0.025) * resolution,
                                  c, LaplaceVector(1, count_mech["scale"]).accuracy(0.025), 0.0, 100.0)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((interval.low, interval.high))
        if c > 0:
            assert row["value"] == pytest.approx(min(interval.high, max(interval.low, min(100.0, max(0.0, s / c)))))


NOT_DERIVABLE = {
    "another filter": {**BY_SERVICE_CHANNEL, "filters": [{"column": "channel", "op": "eq", "value": "web"}],
                       "group_by": ["department"]},
    "a subset of the keys": {**BY_SERVICE_CHANNEL, "epsilon": 0.1,
                             "filters": [{"column": "service", "op": "in", "values": ["C", "A"]}]},
    "a filter on a grouped column, summed over": {"aggregate": "count", "group_by": ["channel"], "epsilon": 0.1,
                                                  "filters": [{"column": "service", "op": "in", "values": ["A"]}]},
    "a filter on the coarser column": {"aggregate": "count", "group_by": ["channel"], "epsilon": 0.1,
                                       "filters": [{"column": "department", "op": "eq", "value": "D1"}]},
    "a time range": {"aggregate": "count", "group_by": ["service", "channel"], "epsilon": 0.1, "filters": [
        {"column": "request_time", "op": "between", "start": "2025-02-01T00:00:00"}]},
    "another contribution bound": {**BY_SERVICE_CHANNEL, "contributions": 2, "epsilon": 0.1},
    "auto contributions": {**BY_SERVICE_CHANNEL, "contributions": "auto", "epsilon": 0.1},
    "other clipping bounds": {**WAIT_SUM, "bounds": [0, 50], "epsilon": 0.1},
    "a finer grouping": {"aggregate": "count", "group_by": ["service", "channel", "satisfaction"], "epsilon": 0.1},
    "a grouping summed away": {"aggregate": "count", "group_by": ["channel"], "epsilon": 0.01},
    "another measured column": {"aggregate": "count", "column": "satisfaction", "group_by": ["service"],
                                "epsilon": 0.1},
    "a histogram": {"aggregate": "histogram", "column": "waiting_minutes", "bins": [0, 50, 100],
                    "group_by": ["service"], "epsilon": 0.1},
    "more accurate than derivable": {"aggregate": "count", "group_by": ["department", "channel"], "epsilon": 5.0},
    "the same cells at another confidence": {**BY_SERVICE_CHANNEL, "confidence": 0.9},
    "the same cells in another order at a lower epsilon": {**BY_SERVICE_CHANNEL, "group_by": ["channel", "service"],
                                                           "epsilon": 0.5},
    "a target accuracy tighter than derivable": {"aggregate": "count", "group_by": ["department", "channel"],
                                                 "accuracy": 5},
}


@pytest.mark.parametrize("spec", NOT_DERIVABLE.values(), ids=NOT_DERIVABLE.keys())
def test_questions_that_are_no_function_of_the_stored_cells_are_not_derived(
        dataset: LocalDataset, releases: list[derivation.StoredRelease], spec: dict[str, Any]) -> None:
    assert _derive(dataset, spec, releases) is None


def test_a_coarser_release_does_not_give_a_finer_one(dataset: LocalDataset) -> None:
    coarse = stored(dataset, 7, {"aggregate": "count", "group_by": ["department"], "epsilon": 1.0})
    assert _derive(dataset, {"aggregate": "count", "group_by": ["service"], "epsilon": 0.01}, [coarse]) is None
    assert _derive(dataset, {"aggregate": "count", "group_by": ["department"], "epsilon": 0.5,
                             "filters": [{"column": "department", "op": "eq", "value": "D2"}]}, [coarse]) is None


def test_without_the_catalogue_there_is_no_roll_up(tmp_path: Path) -> None:
    metadata = base_metadata()
    metadata["tables"]["events"]["columns"]["department"] = {"type": "str", "keys": DEPARTMENTS}
    frame = events_frame().with_columns(department=events_frame()["service"].replace_strict(DEPARTMENT))
    plain = LocalDataset(write_dataset(tmp_path / "plain", frame, metadata))
    release = stored(plain, 1, BY_SERVICE_CHANNEL)
    assert _derive(plain, {"aggregate": "count", "group_by": ["department", "channel"], "epsilon": 0.1},
                   [release]) is None


def test_the_oldest_qualifying_release_is_used(dataset: LocalDataset,
                                               releases: list[derivation.StoredRelease]) -> None:
    again = derivation.StoredRelease(9, releases[0].spec, releases[0].body)
    spec = {"aggregate": "count", "group_by": ["department", "channel"], "epsilon": 0.1}
    assert _derive(dataset, spec, [again, *releases]).sources == (1,)  # type: ignore[union-attr]


# -- coverage --------------------------------------------------------------------------------------

DEPARTMENTS_MANY = 40
SERVICES_OF = [1 + d % 6 for d in range(DEPARTMENTS_MANY)]  # 1 to 6 services per department
TRIALS = 300


def _wide_dataset(folder: Path, zcdp: bool) -> tuple[LocalDataset, dict[str, str]]:
    """A catalogue of 140 services in 40 departments (the data is never read: only planned)."""
    parent = {f"S{d:02d}{i}": f"D{d:02d}" for d, n in enumerate(SERVICES_OF) for i in range(n)}
    metadata = base_metadata()
    columns = metadata["tables"]["events"]["columns"]
    columns["service"] = {"type": "str", "keys": list(parent)}
    columns["department"] = {"type": "str", "keys": sorted(set(parent.values()))}
    if zcdp:
        metadata["accounting"] = {"mode": "zcdp", "delta": 1e-9}
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return LocalDataset(folder), parent


@pytest.mark.slow
@pytest.mark.parametrize("zcdp", [False, True], ids=["discrete Laplace", "discrete Gaussian"])
def test_derived_roll_up_intervals_cover_at_their_stated_level(tmp_path: Path, zcdp: bool) -> None:
    """300 releases x 40 departments = 12,000 intervals at 95%, of sums of 1 to 6 independent noises.

    At a true coverage of exactly 95% (the least guaranteed), fewer than 94.1% covering has
    probability below 1e-5 (4.6 binomial standard deviations): the flake rate. Halving the
    half-width (or doubling the noise) brings coverage near 75%, which fails; more than 99%
    covering would mean a vacuous interval (the computed tail gives 95-97% here).
    """
    wide, parent = _wide_dataset(tmp_path / "wide", zcdp)
    spec = parse_spec({"aggregate": "count", "group_by": ["service"], "epsilon": 0.5})
    plan = wide.engine.plan({"aggregate": "count", "group_by": ["department"], "epsilon": 0.001},
                            wide.metadata, wide.path)
    mechanism = wide.engine.plan(spec, wide.metadata, wide.path).calibration.mechanisms["counts"]
    assert isinstance(mechanism, GaussianVector if zcdp else LaplaceVector)
    rng = np.random.default_rng(18)  # the true counts: synthetic input, not noise
    truth = {s: int(rng.integers(0, 500)) for s in parent}
    department_truth = {d: sum(t for s, t in truth.items() if parent[s] == d) for d in set(parent.values())}
    described = [{"role": "counts", "mechanism": mechanism.name, "scale": mechanism.scale,
                  "sensitivity": mechanism.sensitivity, "epsilon": float(mechanism.loss.epsilon)}]
    covered = total = 0
    for trial in range(TRIALS):
        noisy = mechanism.release(list(truth.values()))
        rows = [{"service": s, "value": v} for s, v in zip(truth, noisy)]
        release = derivation.StoredRelease(trial, spec, {"rows": rows, "mechanisms": described, "notes": []})
        answer = derivation.derive(plan, [release], lambda fine, coarse: parent)
        assert answer is not None
        for row in answer.body["rows"]:
            total += 1
            covered += row["ci_low"] <= department_truth[row["department"]] <= row["ci_high"]
    assert total == TRIALS * DEPARTMENTS_MANY
    print(f"coverage {covered / total:.4f}")
    assert 0.941 <= covered / total <= 0.99, f"coverage {covered / total:.4f}"
