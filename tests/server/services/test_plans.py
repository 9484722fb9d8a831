"""Workload plans through the API: free estimates, one charge per run with its audit entry, no double charge.

The test dataset has 50 people with at most 3 rows each; targets are loose enough that
the plan's loss is modest, and the analyst's cap (1 epsilon) holds one run (about 0.9) and each group is within the
per-query cap of 0.5.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlmodel import Session, select

from civicdp.queries.metadata import load_metadata
from civicdp.server.auditlog.reconcile import reconcile_database
from civicdp.server.state import ledger
from civicdp.server.state.models import AuditEntry, Computation, LedgerEntry, Release
from tests.server.api_fixtures import ANALYST, DATASET, OTHER_ANALYST, STEWARD, Api
from tests.server.api_fixtures import api, dataset_folder  # noqa: F401 - fixtures

GRID = {"start": 0, "stop": 100, "step": 5}
PLAN: dict[str, Any] = {"dataset": DATASET, "parts": [
    {"name": "by_channel", "aggregate": "count", "group_by": ["channel"], "accuracy": {"half_width": 40}},
    {"name": "by_service", "aggregate": "count", "group_by": ["service"], "accuracy": {"half_width": 40}},
    {"name": "wait_median", "aggregate": "quantiles", "column": "waiting_minutes", "quantiles": [0.5],
     "candidates": GRID, "accuracy": {"rank_half_width": 200}},
    {"name": "wait_p90", "aggregate": "quantiles", "column": "waiting_minutes", "quantiles": [0.9],
     "candidates": GRID, "accuracy": {"rank_half_width": 200}},
]}


def create(api: Api, plan: dict[str, Any] = PLAN, who: str = ANALYST) -> dict[str, Any]:
    response = api.post(who, "/v1/plans", json=plan)
    assert response.status_code == 200, response.text
    return response.json()


def test_estimate_is_free_and_shares_the_quantile_tree(api: Api) -> None:
    before = api.spent_micro(ANALYST)
    body = create(api)
    assert api.spent_micro(ANALYST) == before  # storing and estimating spend nothing
    assert body["fit"]["fits"] is True
    groups = [g["parts"] for g in body["groups"]]
    assert ["wait_median", "wait_p90"] in groups  # both levels in one query, one tree of counts
    assert len(body["groups"]) == 3
    assert all(p["predicted"]["target_met"] for p in body["parts"])
    assert body["id"].startswith("plan_")
    again = api.get(ANALYST, f"/v1/plans/{body['id']}").json()
    assert again["total"] == body["total"] and again["groups"] == body["groups"]


def test_a_run_charges_the_planned_total_once_with_one_entry(api: Api) -> None:
    body = create(api)
    planned = body["to_charge_amount"]
    before = api.spent_micro(ANALYST)
    runs_before = len(api.records("plan.run"))
    response = api.post(ANALYST, f"/v1/plans/{body['id']}/run")
    assert response.status_code == 200, response.text
    answer = response.json()
    moved = {k: v - before[k] for k, v in api.spent_micro(ANALYST).items()}
    assert moved == {kind: planned for kind in ledger.KINDS}  # every scope, exactly the planned total
    assert answer["charged_amount"] == planned
    entries = api.records("plan.run")[runs_before:]
    assert len(entries) == 1
    detail = json.loads(entries[0].entry_json)["detail"]
    assert detail["loss_micro"] == planned
    assert [p["name"] for p in detail["parts"]] == [p["name"] for p in PLAN["parts"]]
    assert {c["after_micro"] - c["before_micro"] for c in detail["ledger"]} == {planned}
    with Session(api.state.db) as session:  # the charge's ledger rows are one charge, linked to a release
        charges = session.exec(select(LedgerEntry).where(LedgerEntry.amount_micro == planned)).all()
        assert len(charges) == len(ledger.KINDS)
        assert session.exec(select(Computation)).first() is None
    names = [p["name"] for p in answer["parts"]]
    assert names == [p["name"] for p in PLAN["parts"]]
    for part in answer["parts"]:
        assert part["rows"] and all(r["ci_low"] <= r["value"] <= r["ci_high"] for r in part["rows"])
    # A rerun on the same version is answered from the stored releases: free.
    again = api.post(ANALYST, f"/v1/plans/{body['id']}/run").json()
    assert again["charged_amount"] == 0 and all(p["cached"] for p in again["parts"])
    assert api.spent_micro(ANALYST) == {k: before[k] + planned for k in before}
    assert [p["rows"] for p in again["parts"]] == [p["rows"] for p in answer["parts"]]
    # The ledger and the stored answers agree with the log (what a start and `audit reconcile` check).
    assert reconcile_database(api.state.db) == []


def test_concurrent_runs_of_one_plan_never_double_charge(api: Api) -> None:
    assert api.dataset_folder is not None  # build the rank cache first (known bug of first queries)
    api.state.queries.engine.backend.scan(api.dataset_folder, load_metadata(api.dataset_folder), "events")
    body = create(api)
    before = api.spent_micro(ANALYST)
    start = threading.Barrier(8)

    def run(_: int) -> Any:
        start.wait()
        return api.post(ANALYST, f"/v1/plans/{body['id']}/run")

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(run, range(8)))
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    charged = [r.json()["charged_amount"] for r in responses]
    assert sorted(charged) == [0] * 7 + [body["to_charge_amount"]]
    moved = {k: v - before[k] for k, v in api.spent_micro(ANALYST).items()}
    assert moved == {kind: body["to_charge_amount"] for kind in ledger.KINDS}
    first = [p["rows"] for p in responses[0].json()["parts"]]
    assert all([p["rows"] for p in r.json()["parts"]] == first for r in responses)


def test_a_plan_over_the_budget_says_what_to_loosen(api: Api) -> None:
    groupings = [["channel"], ["service"], ["satisfaction"], ["request_time:month"], []]
    tight = {"dataset": DATASET, "parts": [{"name": f"p{i}", "aggregate": "count", "group_by": g,
                                            "accuracy": {"half_width": 20}} for i, g in enumerate(groupings)]}
    body = create(api, tight)
    fit = body["fit"]
    assert fit["fits"] is False and fit["uniform_factor"] > 1
    assert set(fit["best_reachable"]) == {f"p{i}" for i in range(5)}
    assert fit["required"] > fit["available"] == 1.0
    relaxed = {**tight, "parts": [{**p, "accuracy": {"half_width": 20 * fit["uniform_factor"] * 1.001}}
                                  for p in tight["parts"]]}
    assert create(api, relaxed)["fit"]["fits"] is True  # the stated relaxation does fit
    response = api.post(ANALYST, f"/v1/plans/{body['id']}/run")
    assert response.status_code == 409, response.text
    assert api.spent_micro(ANALYST)[ledger.ANALYST] == 0


@pytest.mark.parametrize("plan, field", [
    ({"dataset": DATASET, "parts": []}, "parts"),
    ({"dataset": DATASET, "parts": [{"name": "a", "aggregate": "count", "epsilon": 0.1}]}, "parts.0.epsilon"),
    ({"dataset": DATASET, "parts": [{"name": "a", "aggregate": "count"}]}, "parts.0"),
    ({"dataset": DATASET, "parts": [{"name": "a", "aggregate": "mean", "column": "waiting_minutes",
                                     "accuracy": {"half_width": 5}}]}, "parts.0.accuracy"),
    ({"dataset": DATASET, "parts": [{"name": "a", "aggregate": "count", "weight": 1}]}, "total"),
    ({"dataset": DATASET, "parts": [{"name": "a", "aggregate": "count", "group_by": ["remark"],
                                     "accuracy": {"half_width": 5}}]}, "parts.0.group_by.0"),
], ids=["no-parts", "epsilon", "neither", "mean-without-min-rows", "weights-without-total", "private-keys"])
def test_bad_plans_are_refused_naming_the_field(api: Api, plan: dict[str, Any], field: str) -> None:
    response = api.post(ANALYST, "/v1/plans", json=plan)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field


def test_plans_are_authorised_part_by_part_and_kept_to_their_agency(api: Api) -> None:
    assert api.post(STEWARD, "/v1/plans", json=PLAN).status_code == 403  # stewards may not query
    body = create(api)
    assert api.get(OTHER_ANALYST, f"/v1/plans/{body['id']}").status_code == 404
    assert api.post(OTHER_ANALYST, f"/v1/plans/{body['id']}/run").status_code == 404
    with Session(api.state.db) as session:
        assert session.exec(select(Release)).first() is None
        assert session.exec(select(AuditEntry).where(AuditEntry.action == "plan.create")).first() is not None


def test_a_group_released_meanwhile_by_another_plan_does_not_lose_the_run(api: Api, monkeypatch: Any) -> None:
    """Two plans share a group; the other plan's run charges and stores it after this run was charged and
    before it stored its own. This run still answers every part, stores its other groups (a later run is
    free) and keeps the one release of the shared group."""
    from civicdp.server.services import plan_runs

    by_channel = {"name": "by_channel", "aggregate": "count", "group_by": ["channel"], "accuracy": {"half_width": 40}}
    by_service = {"name": "by_service", "aggregate": "count", "group_by": ["service"], "accuracy": {"half_width": 40}}
    mine = api.post(ANALYST, "/v1/plans", json={"dataset": DATASET, "parts": [by_channel, by_service]}).json()
    theirs = api.post(OTHER_ANALYST, "/v1/plans", json={"dataset": DATASET, "parts": [by_channel]}).json()
    original = plan_runs._compute
    interleaved: list[Any] = []

    def compute_after_theirs(*args: Any) -> Any:
        if not interleaved:  # mine is charged: theirs runs to the end before mine reads (theirs calls this too)
            interleaved.append(None)
            interleaved[0] = api.post(OTHER_ANALYST, f"/v1/plans/{theirs['id']}/run")
        return original(*args)

    monkeypatch.setattr(plan_runs, "_compute", compute_after_theirs)
    answer = api.post(ANALYST, f"/v1/plans/{mine['id']}/run")
    assert interleaved[0].status_code == 200, interleaved[0].text
    assert answer.status_code == 200, answer.text
    parts = {p["name"]: p for p in answer.json()["parts"]}
    assert set(parts) == {"by_channel", "by_service"}
    assert parts["by_channel"]["release_id"] == interleaved[0].json()["parts"][0]["release_id"]  # the one release
    monkeypatch.setattr(plan_runs, "_compute", original)
    spent = api.spent_micro(ANALYST)["analyst"]
    again = api.post(ANALYST, f"/v1/plans/{mine['id']}/run")
    assert again.status_code == 200 and api.spent_micro(ANALYST)["analyst"] == spent  # every group stored: free
