"""The README's plan (section "Planning a workload within a budget") fits the demo, as the README says.

tests/test_readme.py reads the queries, feeds and monitors the README puts to the demo, not
plans; this test adds the plan's run to what they spend: each of its queries within the
per-query cap, its total as stated (0.3), and the walkthrough with it within every cap.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from datetime import datetime, timezone

import pytest

from civicdp.policies.defaults import PUBLIC_CAP
from civicdp.queries.context import EngineLimits
from civicdp.queries.engine import Engine
from civicdp.queries.metadata import load_metadata
from civicdp.queries.monitoring import parse_monitor, resolve_monitor
from civicdp.queries.plans.planner import plan_workload
from civicdp.server.feeds.schedule import parse_schedule
from civicdp.server.state.ledger import CapDefaults
from tests.test_readme import AGENCY, README, _charge, _defaults, demo_folder, walkthrough  # noqa: F401 - fixture

PLANNER = "ana-health"


def readme_plan() -> dict[str, Any]:
    text = README.read_text()
    section = text[text.index("## Planning a workload within a budget"):]
    body = re.search(r"cat > plan\.json <<'JSON'\n(.*?)\nJSON\n", section, re.DOTALL)
    assert body, "the README's plan section writes plan.json with a heredoc"
    return json.loads(body.group(1))


def test_the_readme_plan_fits_the_demo_as_stated(demo_folder: Path) -> None:
    folder = demo_folder / "data" / "demo"
    metadata = load_metadata(folder)
    settings = _defaults()
    planned = plan_workload(readme_plan(), metadata, folder, EngineLimits(max_epsilon=settings.max_epsilon))
    for group in planned.groups:
        assert float(group.loss.epsilon) <= float(PUBLIC_CAP), group.parts
    cost = metadata.accounting.rule.charge_of(planned.loss)
    assert cost == pytest.approx(300_000, abs=5_000)  # "This plan costs epsilon 0.3"
    assert len(planned.groups) == 3  # "three queries"
    caps = CapDefaults.from_settings(settings)
    engine = Engine(limits=EngineLimits(max_epsilon=settings.max_epsilon, auto_fraction=settings.auto_fraction))
    analyst: dict[str, int] = defaultdict(int)
    answered: set[str] = set()
    walk = walkthrough(README.read_text())
    for question in walk.questions:
        canonical, amount, _ = _charge(engine, metadata, folder, question.spec)
        analyst[question.account] += 0 if canonical in answered else amount
        answered.add(canonical)
    analyst[PLANNER] += cost
    assert analyst[PLANNER] == pytest.approx(700_000, abs=5_000)  # "0.7 of ana-health's 1"
    assert analyst[PLANNER] <= caps.analyst_month_micro
    agency = sum(v for k, v in analyst.items() if AGENCY[k] == AGENCY[PLANNER])
    assert agency <= caps.agency_month_micro
    # The dataset's month and lifetime, with the README's feed and monitor as tests/test_readme.py counts them.
    now = datetime.now(timezone.utc)
    feeds_month = feeds_total = 0
    for definition, _ in walk.feeds:
        loss = sum(_charge(engine, metadata, folder, {**spec, "dataset": definition["dataset"]})[1]
                   for spec in definition["specs"])
        feeds_month += loss * parse_schedule(definition["schedule"], now, definition["releases"]).most_in_one_month()
        feeds_total += loss * definition["releases"]
    monitors = sum(metadata.accounting.rule.charge_of(resolve_monitor(parse_monitor(raw), metadata).loss)
                   for raw in walk.monitors)
    spent = sum(analyst.values())
    assert spent + feeds_month + monitors <= caps.dataset_month_micro, (spent, feeds_month, monitors)
    assert spent + feeds_total + monitors <= caps.lifetime_micro, (spent, feeds_total, monitors)
