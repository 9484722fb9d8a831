"""Answers derived from stored releases (issue 18): what is derivable, the values, the intervals.

The values must be the hand-made roll-up (or subset, or ratio) of the stored rows; any
question that is not a function of them must not be derived; the intervals must cover
at their stated level (statistical test at the end, flake rate stated there).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from civicdp.privacy import accuracy
from civicdp.privacy.mechanisms import GaussianVector, LaplaceVector
from civicdp.queries import derivation
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
        if not services:
            assert half == 0  # no service of the catalogue: nothing released, nothing uncertain
        elif len(services) == 1:  # one stored cell: its own interval
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


def test_a_subset_of_the_keys_is_the_stored_cells_themselves(
        dataset: LocalDataset, releases: list[derivation.StoredRelease]) -> None:
    spec = {**BY_SERVICE_CHANNEL, "filters": [{"column": "service", "op": "in", "values": ["C", "A"]}]}
    answer = _derive(dataset, spec, releases)
    assert answer is not None and answer.sources == (1,) and "subset" in answer.how
    source = [r for r in releases[0].body["rows"] if r["service"] in ("A", "C")]
    assert answer.body["rows"] == source


def test_a_filter_on_a_grouped_column_sums_the_selected_cells(
        dataset: LocalDataset, releases: list[derivation.StoredRelease]) -> None:
    spec = {"aggregate": "count", "group_by": ["channel"], "epsilon": 0.1,
            "filters": [{"column": "service", "op": "in", "values": ["A", "C"]}]}
    answer = _derive(dataset, spec, releases)
    assert answer is not None
    source = _cells(releases[0].body["rows"], "service", "channel")
    for row in answer.body["rows"]:
        assert row["value"] == source["A", row["channel"]]["value"] + source["C", row["channel"]]["value"]


def test_a_filter_on_the_coarser_column_selects_the_services_of_its_departments(
        dataset: LocalDataset, releases: list[derivation.StoredRelease]) -> None:
    spec = {"aggregate": "count", "group_by": ["channel"], "epsilon": 0.1,
            "filters": [{"column": "department", "op": "eq", "value": "D1"}]}
    answer = _derive(dataset, spec, releases)
    assert answer is not None and "service -> department" in answer.how
    source = _cells(releases[0].body["rows"], "service", "channel")
    for row in answer.body["rows"]:
        assert row["value"] == source["A", row["channel"]]["value"] + source["B", row["channel"]]["value"]


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
                             "filters": [{"column": "department", "op": "eq", "value": "D2"}]}, [coarse]) is not None


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
