"""The data behind the console's charts, shaped for Chart.js (drawn by ``static/charts.js``).

Only shaping happens here: the numbers come from the same ledger and audit reads as ``/v1``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from typing import Any

from civicdp.server.services.schemas import BudgetOut

SCOPES = ("analyst", "agency", "dataset", "lifetime", "feed")
#: The first category of every budget chart: before the first charge it shows.
START = "before"


def _scale(unit: str) -> float:
    return 1e9 if unit == "rho" else 1e6  # the ledger counts nano-rho or micro-epsilon


def budget_charts(budgets: list[BudgetOut], history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset and kind of scope: spending over time of each budget, with its cap as a dashed line."""
    units = {b.dataset: b.unit for b in budgets}
    caps = {(b.dataset, b.scope, b.subject, b.period): b.cap_micro for b in budgets}
    series: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for charge in history:
        key = (charge["dataset"], charge["scope"])
        label = f"{charge['subject']} ({charge['period']})"
        scale = _scale(units.get(charge["dataset"], "epsilon"))
        points = series[key][label]
        if not points:  # where the budget stood before its first charge shown, so every line has a start
            points.append({"x": START, "y": charge["before_micro"] / scale})
        points.append({"x": _iso(charge["time"]), "y": charge["after_micro"] / scale})
    charts = []
    for (dataset, scope), lines in sorted(series.items(), key=lambda item: (item[0][0], _order(item[0][1]))):
        scale = _scale(units.get(dataset, "epsilon"))
        drawn = []
        for label, points in sorted(lines.items()):
            subject, period = label.rsplit(" (", 1)
            cap = caps.get((dataset, scope, subject, period.rstrip(")")))
            drawn.append({"label": label, "points": points, "cap": None if cap is None else cap / scale})
        charts.append({"dataset": dataset, "scope": scope, "unit": units.get(dataset, "epsilon"), "lines": drawn})
    return charts


def refusal_chart(rows: list[tuple[datetime, str]]) -> dict[str, Any]:
    """Refusals and denials per hour (UTC), one bar series per decision."""
    counts: Counter[tuple[str, str]] = Counter()
    for created, decision in rows:
        counts[(created.strftime("%Y-%m-%d %H:00"), decision)] += 1
    hours = sorted({hour for hour, _ in counts})
    decisions = sorted({decision for _, decision in counts})
    return {"labels": hours, "series": [{"label": d, "values": [counts[(h, d)] for h in hours]} for d in decisions]}


def interval_chart(result: dict[str, Any]) -> dict[str, Any] | None:
    """A query result's values with their 95% intervals (error bars), when it has rows of them."""
    rows = result.get("rows") if isinstance(result, dict) else None
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
        return None
    first = rows[0]
    value = next((k for k in ("value", "count", "sum", "mean") if isinstance(first.get(k), (int, float))), None)
    if value is None or "ci_low" not in first or "ci_high" not in first:
        return None
    keys = [k for k in first if k not in (value, "ci_low", "ci_high") and not isinstance(first[k], (dict, list))]
    points = [{"label": " / ".join(str(row.get(k)) for k in keys) or "all", "y": row[value],
               "yMin": row["ci_low"], "yMax": row["ci_high"]} for row in rows[:200]]
    return {"measure": value, "points": points}


def _order(scope: str) -> int:
    return SCOPES.index(scope) if scope in SCOPES else len(SCOPES)


def _iso(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if isinstance(value, datetime) else str(value)
