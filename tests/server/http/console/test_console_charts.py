"""The shaping of chart data: budgets over time with their caps, refusals per hour, result intervals."""

from __future__ import annotations

from datetime import datetime, timezone

from civicdp.server.http.console import charts
from civicdp.server.services.schemas import BudgetOut


def _budget(scope: str, subject: str, cap_micro: int, unit: str = "epsilon") -> BudgetOut:
    return BudgetOut(dataset="d", scope=scope, subject=subject, period="2026-12", cap_epsilon=cap_micro / 1e6,
                     spent_epsilon=0, remaining_epsilon=cap_micro / 1e6, cap_micro=cap_micro, spent_micro=0,
                     remaining_micro=cap_micro, unit=unit)


def _charge(scope: str, subject: str, after: int, minute: int) -> dict:
    return {"time": datetime(2026, 12, 1, 8, minute, tzinfo=timezone.utc), "dataset": "d", "scope": scope,
            "subject": subject, "period": "2026-12", "amount_micro": 100_000, "before_micro": after - 100_000,
            "after_micro": after}


def test_each_budget_is_a_line_of_its_spending_with_its_cap() -> None:
    budgets = [_budget("analyst", "ana", 1_000_000), _budget("agency", "health", 2_500_000)]
    history = [_charge("analyst", "ana", 100_000, 1), _charge("agency", "health", 100_000, 1),
               _charge("analyst", "ana", 200_000, 2)]
    drawn = charts.budget_charts(budgets, history)
    assert [(c["scope"], c["unit"]) for c in drawn] == [("analyst", "epsilon"), ("agency", "epsilon")]
    [line] = drawn[0]["lines"]
    assert line["label"] == "ana (2026-12)" and line["cap"] == 1.0
    assert [(p["x"], p["y"]) for p in line["points"]] == [("before", 0.0), ("2026-12-01 08:01:00", 0.1), ("2026-12-01 08:02:00", 0.2)]
    assert drawn[1]["lines"][0]["cap"] == 2.5


def test_rho_ledgers_are_drawn_in_rho() -> None:
    drawn = charts.budget_charts([_budget("lifetime", "*", 2_000_000_000, unit="rho")],
                                 [_charge("lifetime", "*", 500_000_000, 3)])
    assert drawn[0]["lines"][0]["cap"] == 2.0 and drawn[0]["lines"][0]["points"][-1]["y"] == 0.5


def test_refusals_are_counted_per_hour_and_decision() -> None:
    at = datetime(2026, 12, 1, 8, 5, tzinfo=timezone.utc)
    chart = charts.refusal_chart([(at, "denied"), (at, "denied"), (at.replace(hour=9), "refused")])
    assert chart["labels"] == ["2026-12-01 08:00", "2026-12-01 09:00"]
    assert {s["label"]: s["values"] for s in chart["series"]} == {"denied": [2, 0], "refused": [0, 1]}


def test_a_results_intervals_become_error_bars() -> None:
    rows = [{"channel": "web", "value": 10.0, "ci_low": 4.0, "ci_high": 16.0}]
    assert charts.interval_chart({"rows": rows}) == {
        "measure": "value", "points": [{"label": "web", "y": 10.0, "yMin": 4.0, "yMax": 16.0}]}
    assert charts.interval_chart({"rows": [{"pairs": 3}]}) is None
