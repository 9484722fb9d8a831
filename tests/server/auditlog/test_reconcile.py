"""State that checks itself: budgets against their ledger and audited charges, stored answers against
the hash their release entry records — in the server (refused, 503, an alarm on /v1/ready) and offline
(``civicdp audit reconcile``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import Session, select
from typer.testing import CliRunner

from civicdp.audit.signing import VerifierKey
from civicdp.server.state import ledger
from civicdp.server.state.models import Budget, LedgerEntry, Release
from civicdp.server.auditlog.budgets import fold_ledger, ledger_summaries, reconcile_budgets
from civicdp.server.auditlog.evidence import BudgetRow, Charge, LedgerRow
from civicdp.server.auditlog.reconcile import reconcile_database
from tests.server.api_fixtures import (  # noqa: F401 - fixtures
    ANALYST, DATASET, OTHER_ANALYST, OVERSIGHT, Api, api, count_query, dataset_folder, running_api,
)

FAILED = "failed its integrity check"
FIRST, SECOND = count_query(epsilon=0.5), count_query(epsilon=0.49)


def _sql(api: Api, statement: str, **params: Any) -> None:
    with api.state.db.begin() as connection:
        connection.execute(text(statement), params)


def _analyst_budget(api: Api) -> Budget:
    with Session(api.state.db) as session:
        return session.exec(select(Budget).where(Budget.scope == ledger.ANALYST, Budget.subject == ANALYST)).one()


def _spend_the_month(api: Api) -> Budget:
    """0.99 of the analyst's 1.0 spent, in two charges."""
    for spec in (FIRST, SECOND):
        assert api.query(ANALYST, spec).status_code == 200
    budget = _analyst_budget(api)
    assert budget.spent_micro == 990_000
    return budget


def _ready(api: Api) -> dict[str, Any]:
    response = api.get(None, "/v1/ready")
    assert response.status_code == 200, response.text  # degraded, not down: everything else is served
    return response.json()


def _edit_answer(api: Api, release_id: int, *, rehash: bool) -> None:
    release = api.release(release_id)
    body = json.loads(release.result_json)
    body["rows"][0][body["columns"][-1]] = 123_456  # the kind of edit that changes what an analyst reads
    edited = json.dumps(body, sort_keys=True, separators=(",", ":"))
    assert edited != release.result_json
    if rehash:
        _sql(api, "UPDATE release SET result_json = :t, result_hash = :h WHERE id = :i", t=edited,
             h=hashlib.sha256(edited.encode()).hexdigest(), i=release_id)
    else:
        _sql(api, "UPDATE release SET result_json = :t WHERE id = :i", t=edited, i=release_id)


def _detail(api: Api, action: str) -> list[dict[str, Any]]:
    return [json.loads(r.entry_json) for r in api.records(action)]


# -- budgets --------------------------------------------------------------------------------------------


def test_a_budget_row_reset_to_zero_is_refused_at_the_next_charge(api: Api) -> None:
    """The issue's attack: the analyst's row reset to 0 after spending 0.99 of 1.0; 0.3 more must not pass."""
    budget = _spend_the_month(api)
    _sql(api, "UPDATE budget SET spent_micro = 0 WHERE id = :i", i=budget.id)
    releases = api.count(Release)
    refused = api.query(ANALYST, count_query(epsilon=0.3))
    assert refused.status_code == 503, refused.text
    assert f"the analyst budget of dataset {DATASET}" in refused.json()["detail"] and FAILED in refused.json()["detail"]
    assert _analyst_budget(api).spent_micro == 0 and api.count(Release) == releases  # nothing charged, nothing read
    with Session(api.state.db) as session:
        charged = sum(e.amount_micro for e in session.exec(select(LedgerEntry).where(LedgerEntry.budget_id == budget.id)))
    assert charged == 990_000  # never beyond the cap
    ready = _ready(api)
    assert ready["status"].startswith("degraded")
    [held] = ready["held_budgets"]
    assert (held["budget_id"], held["dataset"], held["scope"]) == (budget.id, DATASET, "analyst")
    assert "differs from its last ledger entry" in held["problem"] and "subject" not in held
    assert ready["audit_log"] == {"ok": True}
    # Other budgets are not held: another agency's analyst is answered.
    assert api.query(OTHER_ANALYST, count_query(epsilon=0.1)).status_code == 200
    assert api.query(ANALYST, count_query(epsilon=0.3)).status_code == 503  # still held
    entry = [e for e in _detail(api, "query.run") if e["detail"].get("status") == 503][-1]
    assert FAILED in entry["detail"]["reason"]

    api.state.audit.tick(force=True)  # the periodic reconciliation records the alarm ...
    [alarm] = _detail(api, "integrity.alarm")
    assert alarm["target"] == f"budget:{budget.id}" and "spent_micro is 0" in alarm["detail"]["found"]
    _sql(api, "UPDATE budget SET spent_micro = 990000 WHERE id = :i", i=budget.id)  # ... and its repair
    api.state.audit.tick(force=True)
    assert _ready(api) == {"status": "ready"}
    assert [e["target"] for e in _detail(api, "integrity.restored")] == [f"budget:{budget.id}"]
    assert api.query(ANALYST, count_query(epsilon=0.3)).status_code == 409  # the real remainder: 0.01


def test_a_budget_and_its_ledger_edited_together_are_caught_by_the_audited_charges_at_start(
        tmp_path: Path, dataset_folder: Path) -> None:
    """The row and its ledger agree with each other after the edit; only the audit log remembers the charges."""
    with running_api(tmp_path / "state", dataset_folder) as first:
        budget = _spend_the_month(first)
        keys = first.keys
        _sql(first, "DELETE FROM ledgerentry WHERE budget_id = :i", i=budget.id)
        _sql(first, "UPDATE budget SET spent_micro = 0 WHERE id = :i", i=budget.id)
    with running_api(tmp_path / "state", None, keys=keys) as api:
        [held] = _ready(api)["held_budgets"]
        assert held["budget_id"] == budget.id and held["problem"] == "spent amount differs from its audited charges"
        refused = api.query(ANALYST, count_query(epsilon=0.3))
        assert refused.status_code == 503 and FAILED in refused.json()["detail"]
        assert _analyst_budget(api).spent_micro == 0
        [alarm] = _detail(api, "integrity.alarm")
        assert "the audit log's 2 charges end at 990000" in alarm["detail"]["found"]


def test_charges_whose_before_goes_back_disagree() -> None:
    """Monotonicity: each audited charge starts where the previous one ended."""
    key = (DATASET, "analyst", ANALYST, "2026-11")
    budget = BudgetRow(1, *key, 1_000_000, 1_300_000)
    ledger_rows = [LedgerRow(1, 1, 1_000_000, 0, 1_000_000), LedgerRow(2, 1, 300_000, 1_000_000, 1_300_000)]
    good = [Charge(5, 0, 1_000_000, 1_000_000, key), Charge(9, 1_000_000, 1_300_000, 300_000, key)]
    assert reconcile_budgets([budget], ledger_rows, good) == []
    backwards = [Charge(5, 0, 1_000_000, 1_000_000, key), Charge(9, 0, 300_000, 300_000, key)]
    [found] = reconcile_budgets([BudgetRow(1, *key, 1_000_000, 300_000)],
                                [LedgerRow(1, 1, 1_000_000, 0, 1_000_000), LedgerRow(2, 1, 300_000, 0, 300_000)],
                                backwards)
    assert "audit log: charge 2 (entry 9) starts at 0 but the one before ended at 1000000 (the spent amount " \
           "went back)" in found.detail
    assert "ledger: charge 2 starts at 0" in found.detail
    # Same count, same end, other steps: the ledger does not tell the audit log's story.
    steps = [LedgerRow(1, 1, 400_000, 0, 400_000), LedgerRow(2, 1, 900_000, 400_000, 1_300_000)]
    [found] = reconcile_budgets([budget], steps, good)
    assert found.problem == "its ledger entries differ from its audited charges" and "different steps" in found.detail


def test_the_ledger_folded_in_sql_is_the_ledger_folded_in_python(api: Api) -> None:
    _spend_the_month(api)
    api.query(OTHER_ANALYST, count_query(epsilon=0.2))
    with Session(api.state.db) as session:
        rows = [LedgerRow(e.id, e.budget_id, e.amount_micro, e.spent_before_micro, e.spent_after_micro)
                for e in session.exec(select(LedgerEntry))]
        assert ledger_summaries(session) == fold_ledger(rows)
    assert len(rows) == 12
    _sql(api, "UPDATE ledgerentry SET spent_before_micro = 1 WHERE id = :i", i=rows[-1].id)
    with Session(api.state.db) as session:
        broken = ledger_summaries(session)[rows[-1].budget_id]
    assert broken.problem and broken.problem[0] == "do not follow on from each other"
    assert fold_ledger([*rows[:-1], LedgerRow(rows[-1].id, rows[-1].budget_id, rows[-1].amount_micro, 1,
                                              rows[-1].after_micro)])[rows[-1].budget_id].problem[0] == \
        broken.problem[0]


def test_a_clean_state_reconciles(api: Api) -> None:
    """No false alarm: queries, a cached answer, a refusal, another agency — everything agrees."""
    _spend_the_month(api)
    assert api.query(ANALYST, FIRST).json()["cached"] is True
    assert api.query(ANALYST, count_query(epsilon=0.3)).status_code == 409
    assert api.query(OTHER_ANALYST, count_query(epsilon=0.2)).status_code == 200
    api.state.audit.tick(force=True)
    assert _ready(api) == {"status": "ready"}
    assert not api.records("integrity.alarm")


# -- stored answers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rehash", [False, True], ids=["bytes-only", "bytes-and-hash"])
def test_an_edited_stored_answer_is_not_served(api: Api, rehash: bool) -> None:
    answer = api.query(ANALYST, FIRST).json()
    assert api.query(ANALYST, FIRST).json()["cached"] is True  # served, and checked, before the edit
    _edit_answer(api, answer["release_id"], rehash=rehash)
    for who in (ANALYST, OTHER_ANALYST):
        refused = api.query(who, FIRST)
        assert refused.status_code == 503, refused.text
        assert f"the stored answer (release {answer['release_id']}) {FAILED}" in refused.json()["detail"]
        assert "123456" not in refused.text
    expected = ("differs from the one its audit entry records" if rehash
                else "do not hash to its stored result hash")
    [listed] = _ready(api)["refused_releases"]
    assert listed["release_id"] == answer["release_id"] and expected in listed["problem"]
    refusals = [e for e in _detail(api, "query.run") if e["decision"] == "refused"]
    assert len(refusals) == 2 and all(e["detail"]["release_id"] == answer["release_id"] for e in refusals)
    assert api.spent_micro(OTHER_ANALYST)["analyst"] == 0  # nothing charged for the refusal


def test_an_edited_answer_nobody_asked_for_is_found_by_the_periodic_check_and_recovers(api: Api) -> None:
    answer = api.query(ANALYST, FIRST).json()
    original = api.release(answer["release_id"])
    _edit_answer(api, answer["release_id"], rehash=True)
    api.state.audit.tick(force=True)
    assert [r["release_id"] for r in _ready(api)["refused_releases"]] == [answer["release_id"]]
    [alarm] = _detail(api, "integrity.alarm")
    assert alarm["target"] == f"release:{answer['release_id']}"
    assert api.query(ANALYST, FIRST).status_code == 503
    _sql(api, "UPDATE release SET result_json = :t, result_hash = :h WHERE id = :i", t=original.result_json,
         h=original.result_hash, i=answer["release_id"])
    api.state.audit.tick(force=True)
    assert _ready(api) == {"status": "ready"}
    assert [e["target"] for e in _detail(api, "integrity.restored")] == [f"release:{answer['release_id']}"]
    again = api.query(ANALYST, FIRST).json()
    assert again["cached"] is True and again["rows"] == answer["rows"]


def test_a_release_moved_to_another_question_is_not_served(api: Api) -> None:
    """The answer's bytes and hash untouched, its question changed: the release entry names another question."""
    first = api.query(ANALYST, FIRST).json()
    other = count_query(epsilon=0.3)
    second = api.query(ANALYST, other).json()
    query_hash = api.release(second["release_id"]).query_hash
    _sql(api, "UPDATE release SET query_hash = :h WHERE id = :i", h="0" * 64, i=second["release_id"])
    _sql(api, "UPDATE release SET query_hash = :h WHERE id = :i", h=query_hash, i=first["release_id"])
    refused = api.query(ANALYST, other)
    assert refused.status_code == 503 and FAILED in refused.json()["detail"]


# -- offline -------------------------------------------------------------------------------------------------


def _reconcile(api: Api, bundle: Path) -> Any:
    from civicdp.server.entry import app

    key = VerifierKey.parse(api.client.get("/v1/audit/public-key").text.split()[0]).encode()
    return CliRunner().invoke(app, ["audit", "reconcile", str(bundle), "--public-key", key,
                                    "--database-url", api.settings.state_url])


def test_civicdp_audit_reconcile_finds_an_edited_budget_and_an_edited_answer_offline(api: Api, tmp_path: Path) -> None:
    budget = _spend_the_month(api)
    answer = api.query(OTHER_ANALYST, count_query(epsilon=0.2)).json()
    bundle = tmp_path / "audit.zip"
    bundle.write_bytes(api.get(OVERSIGHT, "/v1/audit/export").content)
    clean = _reconcile(api, bundle)
    assert clean.exit_code == 0, clean.output
    assert "OK: every budget's spent amount" in clean.output and "came after the export" in clean.output

    _sql(api, "DELETE FROM ledgerentry WHERE budget_id = :i", i=budget.id)  # the database agrees with itself ...
    _sql(api, "UPDATE budget SET spent_micro = 0 WHERE id = :i", i=budget.id)
    _edit_answer(api, answer["release_id"], rehash=True)
    found = _reconcile(api, bundle)  # ... not with the export
    assert found.exit_code == 1, found.output
    out = " ".join(found.output.split())
    assert f"DISAGREES: budget analyst/{ANALYST}/" in out and "the audit log's 2 charges end at 990000" in out
    assert f"DISAGREES: release {answer['release_id']}: audit entry" in out
    assert "TAMPERING" not in out


def test_civicdp_audit_reconcile_finds_entries_changed_since_the_export(api: Api, tmp_path: Path) -> None:
    api.query(ANALYST, FIRST)
    bundle = tmp_path / "audit.zip"
    bundle.write_bytes(api.get(OVERSIGHT, "/v1/audit/export").content)
    _sql(api, "DELETE FROM auditentry WHERE seq = 1")
    found = _reconcile(api, bundle)
    assert found.exit_code == 1 and "entry 1 is missing from the database" in " ".join(found.output.split())


@pytest.mark.postgres
def test_reconciliation_on_postgresql(tmp_path: Path, dataset_folder: Path, pg_url: str) -> None:
    with running_api(tmp_path / "state", dataset_folder, database_url=pg_url) as api:
        budget = _spend_the_month(api)
        answer = api.query(ANALYST, FIRST).json()
        api.state.audit.tick(force=True)
        assert _ready(api) == {"status": "ready"}
        _sql(api, "UPDATE budget SET spent_micro = 0 WHERE id = :i", i=budget.id)
        assert api.query(ANALYST, count_query(epsilon=0.3)).status_code == 503
        _edit_answer(api, answer["release_id"], rehash=False)
        assert api.query(ANALYST, FIRST).status_code == 503
        api.state.audit.tick(force=True)
        ready = _ready(api)
        assert [b["budget_id"] for b in ready["held_budgets"]] == [budget.id]
        assert [r["release_id"] for r in ready["refused_releases"]] == [answer["release_id"]]


def test_periodic_reconciliation_reads_only_the_entries_since_the_last(api: Api) -> None:
    """The audited charges are folded once: each check reads the entries added since the one before."""
    _spend_the_month(api)
    api.state.audit.tick(force=True)
    folds = api.state.audit.alarms.evidence
    assert folds is not None and folds.upto == api.records()[-1].seq
    seen = folds.upto
    assert api.query(OTHER_ANALYST, count_query(epsilon=0.2)).status_code == 200
    api.state.audit.tick(force=True)
    assert api.state.audit.alarms.evidence is folds and folds.upto > seen
    assert _ready(api) == {"status": "ready"} and reconcile_database(api.state.db) == []
    budget = _analyst_budget(api)
    _sql(api, "DELETE FROM ledgerentry WHERE budget_id = :i", i=budget.id)
    _sql(api, "UPDATE budget SET spent_micro = 0 WHERE id = :i", i=budget.id)
    api.state.audit.tick(force=True)  # still caught from the folded charges
    assert [b["budget_id"] for b in _ready(api)["held_budgets"]] == [budget.id]
