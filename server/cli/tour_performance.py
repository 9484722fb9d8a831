"""``civicdp tour``, service performance: the report, lagged points against the planted truth,
department scores with rank ranges, and a month of continual monitoring with alerts."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console

from civicdp.privacy.loss import PrivacyLoss
from civicdp.queries.engine import LocalDataset
from civicdp.queries.monitoring import fired, parse_monitor, resolve_monitor, step_rows, step_vectors

REPORT = {"analysis": "performance_report", "epsilon": 1.0}
LAGGED = {"analysis": "lagged_points", "epsilon": 1.0}
SCORES = {"analysis": "department_scores", "epsilon": 1.0, "contributions": 3}
MONITOR = {"name": "tour-daily-volume", "metric": "count", "group_by": "channel", "step": "day",
           "start": "2025-03-01T00:00:00", "horizon": 31, "epsilon": 0.5, "contributions": 3,
           "rules": [{"op": "above", "value": 1000, "group": "counter", "certain": True}]}


def show_performance(data: Path, dataset: LocalDataset, console: Console) -> PrivacyLoss:
    """Ask the three performance analyses of the demo data and run a monitor over March; their loss."""
    from civicdp.server.cli.output import print_table

    truth = json.loads((data / "ground_truth.json").read_text()) if (data / "ground_truth.json").exists() else {}

    console.rule("Performance report: volume, durations, waiting and satisfaction, one loss for all")
    estimate = dataset.estimate(REPORT)
    console.print(f"estimate (free, reads no data): {estimate.loss} for {len(estimate.accuracy)} parts")
    report = dataset.run(REPORT)
    print_table(report.tables["by_channel"].select(
        "channel", "volume", "duration_mean", "duration_median", "duration_p90", "waiting_median",
        "satisfaction_mean"), "per channel (intervals in --json)", limit=5)
    print_table(report.tables["by_department"].select(
        "department", "volume", "volume_low", "volume_high", "duration_median", "duration_median_low",
        "duration_median_high"), "per department", limit=6)
    console.print(f"report in {report.seconds:.1f} s; privacy loss {report.loss}")

    lagged_spec: dict[str, Any] = dict(LAGGED)
    if "steps_path" not in (dataset.metadata.catalogue or {}):
        lagged_spec["level"] = "services"  # demo data from before step targets were published
    console.rule("Lagged points: services and steps whose median is certainly above 1.5 x target")
    lagged = dataset.run(lagged_spec)
    print_table(lagged.table.select("level", "service_id", *(["step"] if "step" in lagged.table.columns else []),
                                    "target_hours", "share_above", "ci_low", "ci_high"), "flagged, ranked", limit=12)
    planted = {s["service_id"] for s in truth.get("lagged_services", [])}
    flagged = set(lagged.tables["services"].filter(pl.col("flagged"))["service_id"])
    if planted:
        console.print(f"planted lagged services found: {len(flagged & planted)} of {len(planted)}; "
                      f"flagged but not planted: {len(flagged - planted)}")
    if "steps" in lagged.tables and truth.get("lagged_steps"):
        steps = {(s["service_id"], s["step"]) for s in truth["lagged_steps"]}
        found = {tuple(r) for r in lagged.tables["steps"].filter(pl.col("flagged"))
                 .select("service_id", "step").iter_rows()}
        console.print(f"planted lagged steps found: {len(found & steps)} of {len(steps)}; other flagged steps "
                      f"lie in lagged services: {sum(1 for s in found - steps if s[0] in planted)}, "
                      f"elsewhere: {sum(1 for s in found - steps if s[0] not in planted)}")

    console.rule("Department scores: observed / expected duration, with the ranks the noise allows")
    scores = dataset.run(SCORES)
    print_table(scores.table.select("department", "score", "ci_low", "ci_high", "rank", "rank_low", "rank_high"),
                "best first", limit=10)
    for note in scores.notes:
        console.print(f"note: {note}")

    console.rule("Monitoring: daily requests per channel in March, alert when the counter certainly gets > 1,000")
    return report.loss + lagged.loss + scores.loss + _monitor_march(dataset, console)


def _monitor_march(dataset: LocalDataset, console: Console) -> PrivacyLoss:
    """The monitor a steward would define, fed one day at a time (in-process, no server)."""
    spec = parse_monitor({**MONITOR, "dataset": dataset.metadata.name})
    monitor = resolve_monitor(spec, dataset.metadata)
    events = pl.read_parquet(dataset.path / dataset.metadata.tables["events"].path).filter(
        pl.col("request_time").is_between(datetime(2025, 3, 1), datetime(2025, 4, 1), closed="left"))
    used: dict[Any, int] = {}
    nodes: dict[tuple[int, int], dict[str, list[int]]] = {}
    leaves: dict[str, list[list[int]]] = {name: [] for name in monitor.trees}
    alerts = 0
    for day in range(spec.horizon):
        exact, used = step_vectors(monitor, events, day, day, used)
        for name, tree in monitor.trees.items():
            leaves[name].append(exact[name][0].tolist())
            for node in tree.completed_by(day):
                values = [sum(col) for col in zip(*leaves[name][node.first:node.last + 1])]
                nodes.setdefault((node.level, node.index), {})[name] = tree.release(values)
        tree0 = next(iter(monitor.trees.values()))
        running = {name: [sum(v) for v in zip(*(nodes[(n.level, n.index)][name] for n in tree0.prefix(day)))]
                   for name in monitor.trees}
        rows = step_rows(monitor, day, {name: nodes[(0, day)][name] for name in monitor.trees}, running)
        for _, rule, row in fired(monitor, rows):
            alerts += 1
            if alerts <= 6:
                console.print(f"  ALERT {monitor.step_start(day):%Y-%m-%d} {row['group']}: {rule.text('requests')} — "
                              f"{row['value']:,.0f} [{row['ci_low']:,.0f}, {row['ci_high']:,.0f}]")
    last = rows
    console.print(f"{alerts} alerts over {spec.horizon} days; requests in March so far (running): " + ", ".join(
        f"{r['group']} {r['running_value']:,.0f} [{r['running_ci_low']:,.0f}, {r['running_ci_high']:,.0f}]"
        for r in last))
    console.print(f"the whole month cost {monitor.loss} (binary tree, {tree0.levels} levels), "
                  "not a fresh loss per day; alerts are post-processing")
    return monitor.loss
