"""Continual release for monitors: the tree mechanism's loss and error, per-person bounds over a horizon."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from civicdp.privacy.continual import TreeCounter, levels_for
from civicdp.privacy.errors import InvalidLoss
from civicdp.queries.errors import QueryError
from civicdp.queries.metadata import parse_metadata
from civicdp.queries.monitor_batches import SUM_LIMIT, add_vectors, cell_sums, exact_total, group_codes
from civicdp.queries.monitor_calibration import Calibration
from civicdp.queries.monitoring import fired, parse_monitor, resolve_monitor, step_vectors
from tests.conftest import base_metadata


@pytest.mark.parametrize("horizon", [1, 2, 7, 8, 365, 1000], ids=str)
def test_tree_loss_is_the_declared_total_for_the_whole_horizon(horizon: int) -> None:
    tree = TreeCounter.for_epsilon(horizon, contributions=5, epsilon=0.7)
    assert tree.mechanism.sensitivity == levels_for(horizon) * 5
    assert 0.7 - 1e-9 < float(tree.loss.epsilon) <= 0.7
    # Every step lies in exactly one released node per level, and each node is released once.
    released = [node for step in range(horizon) for node in tree.completed_by(step)]
    assert len(set(released)) == len(released)
    for step in range(horizon):
        assert sum(1 for n in released if n.first <= step <= n.last) <= tree.levels
        covered = sorted(s for n in tree.prefix(step) for s in range(n.first, n.last + 1))
        assert covered == list(range(step + 1))
        assert all(n.last <= step for n in tree.prefix(step))


def test_tree_error_grows_with_the_log_of_the_horizon_not_linearly() -> None:
    halves = {t: TreeCounter.for_epsilon(t, 1, 1.0).prefix_half_width(t - 1, 0.05) for t in (16, 256, 4096)}
    # 16x more steps: at most (log ratio)^2 ~ 2.25-4x wider, far from 16x.
    assert halves[256] / halves[16] < 4 and halves[4096] / halves[256] < 4


def test_tree_noise_is_present_and_within_its_stated_error() -> None:
    horizon = 64
    tree = TreeCounter.for_epsilon(horizon, 2, 1.0)
    nodes: dict = {}
    errors, misses = [], 0
    for step in range(horizon):
        for node in tree.completed_by(step):
            nodes[node] = tree.release([0])[0]
        running = sum(nodes[n] for n in tree.prefix(step))
        errors.append(abs(running))
        misses += abs(running) > tree.prefix_half_width(step, 0.05)
    assert max(errors) > 0  # noise was drawn
    # Each running value misses its 95% bound with probability at most 5% (union bound, conservative):
    # 64 correlated checks; more than 12 misses has probability well below 1%.
    assert misses <= 12


def _monitor(**changes):
    metadata = parse_metadata(base_metadata())
    spec = parse_monitor({"name": "m", "dataset": metadata.name, "metric": "count", "step": "day",
                          "start": "2025-01-01T00:00:00", "horizon": 10, "epsilon": 1.0, "contributions": 3,
                          **changes})
    return resolve_monitor(spec, metadata)


def _events(person: int, days: list[int]) -> pl.DataFrame:
    start = datetime(2025, 1, 1, 12)
    return pl.DataFrame({"event_id": list(range(len(days))), "person_id": [person] * len(days),
                         "service": ["A"] * len(days), "channel": ["web"] * len(days),
                         "request_time": [start + timedelta(days=d) for d in days],
                         "waiting_minutes": [1.0] * len(days), "satisfaction": [3] * len(days),
                         "remark": ["r"] * len(days), "score": [0.0] * len(days)})


def test_a_person_counts_at_most_L_times_across_batches() -> None:
    monitor = _monitor()
    used: dict = {}
    total = 0
    for first in range(0, 10, 2):  # five batches of two days, two events a day for one person
        rows = _events(7, [first, first, first + 1, first + 1])
        exact, used = step_vectors(monitor, rows, first, first + 1, used)
        total += int(exact["counts"].sum())
    assert total == 3 and used == {7: 3}


def test_share_above_splits_each_kept_row_into_one_of_two_cells() -> None:
    monitor = _monitor(metric="share_above", column="waiting_minutes", threshold=0.5, contributions=10)
    exact, _ = step_vectors(monitor, _events(1, [0, 0, 1]), 0, 1, {})
    assert exact["above"].tolist() == [[2, 0], [1, 0]]


@pytest.mark.parametrize(("changes", "field"), [
    ({"metric": "max"}, "metric"), ({"group_by": "nope"}, "group_by"),
    ({"metric": "share_above", "column": "waiting_minutes", "threshold": 100}, "threshold"),
    ({"metric": "share_above", "column": "waiting_minutes"}, "threshold"),
    ({"horizon": 0}, "horizon"), ({"step": "minute"}, "step"), ({"contributions": 50}, "contributions"),
], ids=["metric", "group", "threshold-at-upper-bound", "threshold-missing", "horizon", "step", "contributions"])
def test_monitor_spec_errors_name_their_field(changes: dict, field: str) -> None:
    with pytest.raises(QueryError) as caught:
        _monitor(**changes)
    assert caught.value.field == field and caught.value.fix


def test_mean_monitor_releases_values_and_running_values_with_intervals() -> None:
    from civicdp.queries.monitoring import step_rows

    monitor = _monitor(metric="mean", column="waiting_minutes", contributions=10, epsilon=1000.0, horizon=2,
                       confidence=0.999)
    rows = _events(1, [0, 0, 1]).with_columns(pl.Series("waiting_minutes", [10.0, 30.0, 50.0]))
    exact, _ = step_vectors(monitor, rows, 0, 1, {})
    nodes = {}
    for step in (0, 1):
        for name, tree in monitor.trees.items():
            for node in tree.completed_by(step):
                nodes.setdefault(node, {})[name] = tree.release(exact[name][node.first:node.last + 1].sum(axis=0).tolist())
    tree = monitor.trees["counts"]
    running = {name: [sum(v) for v in zip(*(nodes[n][name] for n in tree.prefix(1)))] for name in monitor.trees}
    (row,) = step_rows(monitor, 1, {name: nodes[tree.completed_by(1)[0]][name] for name in monitor.trees}, running)
    assert row["ci_low"] <= row["value"] <= row["ci_high"]
    assert row["running_ci_low"] <= row["running_value"] <= row["running_ci_high"]
    # The running mean of 10, 30 and 50 lies in its 99.9% interval: flake rate below 0.1%.
    assert row["running_ci_low"] <= 30.0 <= row["running_ci_high"]
    assert row["running_ci_high"] - row["running_ci_low"] < 100  # and the interval is informative


# -- total on the data: non-finite values, boolean keys, exact integer sums (issue 11) ----------


@pytest.mark.parametrize("metric", [{"metric": "mean"}, {"metric": "share_above", "threshold": 0.5}],
                         ids=["mean", "share-above"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "+inf", "-inf"])
def test_non_finite_measured_values_are_left_out_like_missing_ones(metric: dict, value: float) -> None:
    monitor = _monitor(column="waiting_minutes", contributions=3, **metric)
    rows = _events(1, [0, 0, 0, 1, 1])
    waiting = [10.0, 30.0, 70.0, 20.0, 90.0]
    odd = rows.with_columns(pl.Series("waiting_minutes", [value, 30.0, value, 20.0, value]))
    missing = rows.with_columns(pl.Series("waiting_minutes", [None, 30.0, None, 20.0, None], dtype=pl.Float64))
    exact_odd, used_odd = step_vectors(monitor, odd, 0, 1, {})
    exact_missing, used_missing = step_vectors(monitor, missing, 0, 1, {})
    assert used_odd == used_missing == {1: 2}  # only the two finite rows count against L
    assert {k: v.tolist() for k, v in exact_odd.items()} == {k: v.tolist() for k, v in exact_missing.items()}
    assert all(int(v.min()) > np.iinfo(np.int64).min for v in exact_odd.values())
    finite, _ = step_vectors(monitor, rows.with_columns(pl.Series("waiting_minutes", waiting)), 0, 1, {})
    assert int(finite["counts" if "counts" in finite else "above"].sum()) == 3  # L = 3 of five finite rows


def test_boolean_group_keys_match_their_values() -> None:
    metadata = base_metadata()
    metadata["tables"]["events"]["columns"]["online"] = {"type": "bool", "keys": [True, False]}
    spec = parse_monitor({"name": "m", "dataset": metadata["name"], "metric": "count", "group_by": "online",
                          "step": "day", "start": "2025-01-01T00:00:00", "horizon": 2, "epsilon": 1.0,
                          "contributions": 10, "rules": [{"op": "above", "value": 0.5, "group": True}]})
    monitor = resolve_monitor(spec, parse_metadata(metadata))
    rows = _events(1, [0, 0, 0, 1]).with_columns(pl.Series("online", [True, False, None, True]))
    exact, _ = step_vectors(monitor, rows, 0, 1, {})
    assert exact["counts"].tolist() == [[1, 1], [1, 0]]  # a null key is dropped, as a key outside the set
    assert group_codes(pl.Series([True, False, None]), (True, False)).tolist() == [0, 1, -1]
    hits = fired(monitor, [{"group": True, "value": 1.0}, {"group": 1, "value": 1.0}])
    assert [row["group"] for _, _, row in hits] == [True]  # the rule's True is not the group 1


def test_sums_are_exact_integers_and_clamped_never_wrapped() -> None:
    cell = np.array([0, 0, 1, 1, 1])
    big = np.array([2**40, 2**40 + 1, -(2**40), -1, 3], dtype=np.int64)
    assert cell_sums(cell, big, 2, 2**41).tolist() == [2**41 + 1, -(2**40) + 2]
    huge = np.array([SUM_LIMIT] * 4, dtype=np.int64)
    assert cell_sums(np.zeros(4, dtype=np.int64), huge, 1, SUM_LIMIT).tolist() == [SUM_LIMIT]  # clamped
    leaves = np.array([[SUM_LIMIT, -SUM_LIMIT, 5]] * 3, dtype=np.int64)
    assert exact_total(leaves) == [SUM_LIMIT, -SUM_LIMIT, 15]
    assert add_vectors([[2**62, 1], [2**62, 2]]) == [2**63, 3]  # Python integers: no int64 wrap-around


def test_a_mean_monitor_whose_worst_case_sum_overflows_is_refused_naming_the_fields() -> None:
    metadata = base_metadata()
    metadata["tables"]["events"]["columns"]["waiting_minutes"].update(bounds=[0.0, 1e9], resolution=1e-6)
    spec = parse_monitor({"name": "m", "dataset": metadata["name"], "metric": "mean", "column": "waiting_minutes",
                          "step": "day", "start": "2025-01-01T00:00:00", "horizon": 10, "epsilon": 1.0})
    with pytest.raises(QueryError, match=r"bounds \[0, 1e\+09\] at resolution 1e-06 and 3 contributions") as caught:
        resolve_monitor(spec, parse_metadata(metadata))
    assert caught.value.field == "column" and "resolution" in caught.value.fix


def test_a_calibration_round_trips_and_rebuilds_the_same_trees() -> None:
    monitor = _monitor(metric="mean", column="waiting_minutes")
    metadata = parse_metadata(base_metadata())
    calibration = Calibration.of(monitor, metadata)
    again = Calibration.from_json(calibration.to_json())
    assert again.fingerprint == calibration.fingerprint and again.differences(calibration) == []
    rebuilt = again.monitor(monitor.spec, monitor.table, monitor.loss.micro_epsilon)
    assert rebuilt.trees == monitor.trees and rebuilt.unit == monitor.unit and rebuilt.keys == monitor.keys
    with pytest.raises(QueryError, match="would spend more"):
        again.monitor(monitor.spec, monitor.table, monitor.loss.micro_epsilon - 1)
    with pytest.raises(InvalidLoss, match="sensitivity"):
        TreeCounter.restore(10, 3, 1, 5, 1.0)  # 5 is not 5 levels x 3 x 1
