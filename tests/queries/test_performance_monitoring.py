"""Continual release for monitors: the tree mechanism's loss and error, per-person bounds over a horizon."""

from __future__ import annotations

from datetime import datetime, timedelta

import polars as pl
import pytest

from privacy.continual import TreeCounter, levels_for
from queries.errors import QueryError
from queries.metadata import parse_metadata
from queries.monitoring import parse_monitor, resolve_monitor, step_vectors
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
    from queries.monitoring import step_rows

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
