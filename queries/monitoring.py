"""Monitors: a metric per group and time step, released continually within one fixed loss.

A monitor is defined by a data steward (``MonitorSpec``, :mod:`civicdp.queries.monitor_spec`):
a metric — ``count`` of events, ``mean`` of a bounded column, or ``share_above`` a
threshold — per public group and per time step (hour, day or week) from ``start`` for
``horizon`` steps, a total privacy loss for the whole horizon, and alert rules ("above /
below a preset value") evaluated on the released values (post-processing, no extra loss).

This module validates a spec against the public metadata (errors name the field and
never depend on data), bounds new events per person **across the whole horizon** (each
person's first ``L`` rows in arrival order, then in a hash order of the row; the count of
rows a person has used is carried from batch to batch), computes each step's exact
vector (:mod:`civicdp.queries.monitor_batches`), and turns released tree nodes into values with
intervals. What a monitor is calibrated on is frozen when it is defined
(:mod:`civicdp.queries.monitor_calibration`). The noise is drawn by
:class:`civicdp.privacy.continual.TreeCounter` (binary-tree mechanism) through
:mod:`civicdp.privacy.mechanisms`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from civicdp.privacy import accuracy
from civicdp.privacy.continual import MAX_HORIZON, TreeCounter
from civicdp.queries.errors import QueryError
from civicdp.queries.metadata import DatasetMetadata
# check_batch and step_vectors live in civicdp.queries.monitor_batches and are re-exported here.
from civicdp.queries.monitor_batches import check_batch, step_vectors, sum_unit
from civicdp.queries.monitor_spec import AlertRule, MonitorSpec, ResolvedMonitor, naive_utc

MAX_GROUPS = 10_000


def parse_monitor(raw: Any) -> MonitorSpec:
    """Validate a monitor document; errors name the field and how to fix it."""
    if isinstance(raw, MonitorSpec):
        return raw
    if not isinstance(raw, dict):
        raise QueryError("monitor", "a monitor must be a JSON object", "See the README's monitor example")
    try:
        return MonitorSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-", "literal")))
        raise QueryError(where or "monitor", first["msg"].rstrip("."),
                         _FIXES.get(str(first["loc"][0]) if first["loc"] else "", "")) from None


_FIXES = {
    "metric": "Use count, mean or share_above",
    "step": "Use hour, day or week",
    "horizon": f"Give the number of steps to watch, 1 to {MAX_HORIZON}",
    "epsilon": "Give the total privacy loss for the whole horizon, e.g. 1",
    "rules": 'Write rules like {"op": "above", "value": 100}',
}


def resolve_monitor(spec: MonitorSpec, metadata: DatasetMetadata) -> ResolvedMonitor:
    """Check the spec against the public metadata and calibrate the trees (no data read)."""
    if spec.dataset != metadata.name:
        raise QueryError("dataset", f"this dataset is '{metadata.name}', not '{spec.dataset}'", "Name it")
    table = metadata.tables.get(spec.table)
    if table is None:
        raise QueryError("table", f"no table '{spec.table}'", f"Use one of {sorted(metadata.tables)}")
    if table.privacy_unit_via is not None:
        raise QueryError("table", f"'{spec.table}' has no person column of its own",
                         "Monitor a table that holds the privacy unit, e.g. events")
    time = table.columns.get(spec.time)
    if time is None or time.type != "datetime":
        raise QueryError("time", f"'{spec.time}' is not a time column of '{spec.table}'", "Name the request time")
    keys: tuple[Any, ...] = ("all",)
    if spec.group_by is not None:
        group = table.columns.get(spec.group_by)
        if group is None:
            raise QueryError("group_by", f"unknown column '{spec.group_by}'", f"Use one of {sorted(table.columns)}")
        if group.keys is None:
            raise QueryError("group_by", f"'{spec.group_by}' has no public key set",
                             "Group by a column with declared keys, e.g. department")
        keys = tuple(group.keys)
        if len(keys) > MAX_GROUPS:
            raise QueryError("group_by", f"more than {MAX_GROUPS} groups", "Group by a coarser column")
    contributions = spec.contributions or metadata.max_contributions
    if contributions > metadata.max_contributions_limit:
        raise QueryError("contributions", f"must be at most {metadata.max_contributions_limit}", "Choose fewer")
    lo_t, hi_t = (naive_utc(b if isinstance(b, datetime) else datetime.fromisoformat(str(b)))  # type: ignore[arg-type]
                  for b in time.bounds)  # type: ignore[union-attr]
    start = naive_utc(spec.start)
    if start < lo_t - timedelta(days=366 * 50) or start.year > 9000:
        raise QueryError("start", "the start is not a plausible time", "Give an ISO time such as 2026-01-01T00:00")
    trees: dict[str, TreeCounter] = {}
    lower = upper = 0.0
    resolution = 1.0
    unit = 1
    if spec.metric == "count":
        if spec.column is not None or spec.threshold is not None:
            raise QueryError("column", "a count monitor takes no column or threshold", "Remove them")
        trees["counts"] = TreeCounter.for_epsilon(spec.horizon, contributions, spec.epsilon)
    else:
        if spec.column is None:
            raise QueryError("column", f"a {spec.metric} monitor needs a numeric column", "Name it, e.g. duration_hours")
        column = table.columns.get(spec.column)
        if column is None:
            raise QueryError("column", f"unknown column '{spec.column}'", f"Use one of {sorted(table.columns)}")
        if column.identifier or column.type not in ("int", "float") or column.bounds is None:
            raise QueryError("column", f"'{spec.column}' is not a numeric column with declared bounds",
                             "Name a measured column with public bounds")
        lower, upper = float(column.bounds[0]), float(column.bounds[1])  # type: ignore[arg-type]
        if spec.metric == "share_above":
            if spec.threshold is None:
                raise QueryError("threshold", "a share_above monitor needs a threshold", "E.g. 48 (hours)")
            if not lower <= spec.threshold < upper:
                raise QueryError("threshold", f"{spec.threshold:g} is outside the column's bounds "
                                 f"[{lower:g}, {upper:g})", "Choose a threshold inside the bounds")
            trees["above"] = TreeCounter.for_epsilon(spec.horizon, contributions, spec.epsilon)
        else:
            if spec.threshold is not None:
                raise QueryError("threshold", "a mean monitor takes no threshold", "Remove it")
            resolution = column.value_resolution
            unit = sum_unit(spec.column, lower, upper, resolution, contributions)
            trees["sums"] = TreeCounter.for_epsilon(spec.horizon, contributions, spec.epsilon / 2, unit)
            trees["counts"] = TreeCounter.for_epsilon(spec.horizon, contributions, spec.epsilon / 2)
    for index, rule in enumerate(spec.rules):
        if rule.group is not None and not any(same_key(rule.group, k) for k in keys):
            raise QueryError(f"rules.{index}.group", f"{rule.group!r} is not a group of this monitor",
                             f"Use one of {list(keys)[:12]} or leave 'group' out")
        if spec.metric == "share_above" and not 0 <= rule.value <= 1:
            raise QueryError(f"rules.{index}.value", "a share lies between 0 and 1", "Give e.g. 0.3")
    return ResolvedMonitor(spec, table, _unit(metadata), keys, contributions, trees, lower, upper, resolution, unit)


def same_key(a: Any, b: Any) -> bool:
    """Keys of one type and value (``True`` is not the group ``1``)."""
    return type(a) is type(b) and a == b


def _unit(metadata: DatasetMetadata) -> str:
    return metadata.privacy_unit


def step_rows(monitor: ResolvedMonitor, step: int, leaves: dict[str, list[int]],
              running: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Released values of one step per group: its own value and the running value, with intervals.

    ``leaves`` are the step's noisy leaf vectors, ``running`` the noisy totals of steps
    ``0 .. step`` (sums of at most ``levels`` nodes). Pure post-processing.
    """
    spec = monitor.spec
    alpha = 1 - spec.confidence
    rows = []
    for index, key in enumerate(monitor.keys):
        row: dict[str, Any] = {"group": key}
        for label, source, half in (("", leaves, lambda tree, a: tree.leaf_half_width(a)),
                                    ("running_", running, lambda tree, a: tree.prefix_half_width(step, a))):
            value, low, high = _value(monitor, index, source, lambda name, a: half(monitor.trees[name], a), alpha)
            row.update({f"{label}value": value, f"{label}ci_low": low, f"{label}ci_high": high})
        rows.append(row)
    return rows


def _value(monitor: ResolvedMonitor, i: int, vectors: dict[str, list[int]], half: Any,
           alpha: float) -> tuple[float | None, float, float]:
    metric = monitor.spec.metric
    n = len(monitor.keys)
    if metric == "count":
        value = float(vectors["counts"][i])
        h = half("counts", alpha)
        return value, value - h, value + h
    if metric == "share_above":
        a, b = float(vectors["above"][i]), float(vectors["above"][n + i])
        h = half("above", alpha / 2)
        a_lo, a_hi, b_lo, b_hi = max(a - h, 0), max(a + h, 0), max(b - h, 0), max(b + h, 0)
        share = max(a, 0) / (max(a, 0) + max(b, 0)) if max(a, 0) + max(b, 0) > 0 else None
        low = a_lo / (a_lo + b_hi) if a_lo + b_hi > 0 else 0.0
        high = a_hi / (a_hi + b_lo) if a_hi + b_lo > 0 else 1.0
        return share, low, high
    middle = (monitor.lower + monitor.upper) / 2
    s = float(vectors["sums"][i]) * monitor.resolution
    c = float(vectors["counts"][i])
    interval = accuracy.ratio(s, half("sums", alpha / 2) * monitor.resolution, c, half("counts", alpha / 2),
                              monitor.lower - middle, monitor.upper - middle)
    value = min(monitor.upper, max(monitor.lower, middle + s / c)) if c > 0 else None
    return value, middle + interval.low, middle + interval.high


def fired(monitor: ResolvedMonitor, rows: list[dict[str, Any]]) -> list[tuple[int, AlertRule, dict[str, Any]]]:
    """The rules that fire on one step's released rows: (rule index, rule, row)."""
    out = []
    for index, rule in enumerate(monitor.spec.rules):
        for row in rows:
            if rule.group is not None and not same_key(row["group"], rule.group):
                continue
            prefix = "" if rule.on == "step" else "running_"
            value = row[f"{prefix}value"]
            if value is None:
                continue
            if rule.certain:  # the interval's far end must be beyond the preset value too
                above, below = row[f"{prefix}ci_low"] > rule.value, row[f"{prefix}ci_high"] < rule.value
            else:
                above, below = value > rule.value, value < rule.value
            if (rule.op == "above" and above) or (rule.op == "below" and below):
                out.append((index, rule, row))
    return out


__all__ = ["AlertRule", "MonitorSpec", "ResolvedMonitor", "check_batch", "fired", "parse_monitor", "resolve_monitor",
           "same_key", "step_rows", "step_vectors"]
