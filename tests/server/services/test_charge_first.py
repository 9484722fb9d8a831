"""The loss is spent before any data is read: failures are charged, answered alike, and audited.

Each test would fail if the charge moved back after the computation (as it was before
issue 11: a failure cost nothing, so a NaN in one person's row was an epsilon = infinity
distinguisher), if a failure's text carried the exception's words, or if a crash left
a question stuck.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from civicdp.queries.engine import Engine
from civicdp.server.services import computations
from civicdp.server.auditlog.append import record
from civicdp.server.services.computations import FAILED_TEXT
from civicdp.server.state.db import session_scope
from civicdp.server.state.caller import Caller
from civicdp.server.state.models import Account, Computation, Release
from tests.server.api_fixtures import ANALYST, Api, api, count_query, dataset_folder, running_api  # noqa: F401

SECRET = "person 4711 has nan at row 17 (3.14159)"


def _fail_with_data(*_: Any, **__: Any) -> Any:
    raise ValueError(SECRET)


def _spent(api: Api) -> int:
    return api.spent_micro(ANALYST)["analyst"]


def test_the_charge_and_its_entry_are_committed_before_the_engine_reads_data(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    real = Engine.execute

    def spying(self: Engine, plan: Any, *args: Any) -> Any:
        # Read through a fresh connection: what is committed when the data is first touched.
        seen["spent"] = _spent(api)
        seen["entries"] = [(e.action, e.decision) for e in api.records() if e.action.startswith("query.")]
        seen["claims"] = api.count(Computation)
        return real(self, plan, *args)

    monkeypatch.setattr(Engine, "execute", spying)
    answer = api.query(ANALYST, count_query(epsilon=0.2))
    assert answer.status_code == 200
    assert seen == {"spent": 200_000, "entries": [("query.run", "allowed")], "claims": 1}
    assert api.count(Computation) == 0  # the claim goes with the release


def test_a_failed_computation_is_charged_recorded_and_answered_with_one_fixed_text(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Engine, "execute", _fail_with_data)
    response = api.query(ANALYST, count_query(epsilon=0.2))
    assert response.status_code == 503
    body = response.json()
    assert FAILED_TEXT in body["detail"]
    for leaked in ("4711", "3.14", "row 17", "nan"):
        assert leaked not in json.dumps(body)
    assert _spent(api) == 200_000  # kept: the attempt read data
    assert api.count(Release) == 0 and api.count(Computation) == 0
    [failed] = api.records("query.failed")
    [charged] = api.records("query.run")
    detail = json.loads(failed.entry_json)["detail"]
    assert failed.decision == "failed" and detail["reason"] == FAILED_TEXT
    assert detail["computation_id"] == json.loads(charged.entry_json)["detail"]["computation_id"]
    assert SECRET not in failed.entry_json

    # Asked again, it is computed (and paid for) again: a failure is not a release.
    monkeypatch.undo()
    again = api.query(ANALYST, count_query(epsilon=0.2))
    assert again.status_code == 200 and again.json()["cached"] is False
    assert _spent(api) == 400_000


def test_failures_of_any_kind_give_the_same_status_body_and_charge(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever breaks, and whatever its message holds, the analyst sees the same thing."""
    outcomes = []
    for error in (ValueError(SECRET), OverflowError("int too large: 9223372036854775808"),
                  KeyError("person_id=12"), ZeroDivisionError(), MemoryError()):
        def failing(*_: Any, error: BaseException = error, **__: Any) -> Any:
            raise error
        monkeypatch.setattr(Engine, "execute", failing)
        before = _spent(api)
        response = api.query(ANALYST, count_query(epsilon=0.05, confidence=0.9 + 0.01 * len(outcomes)))
        outcomes.append((response.status_code, response.json(), _spent(api) - before))
    statuses = {status for status, _, _ in outcomes}
    bodies = {json.dumps(body, sort_keys=True) for _, body, _ in outcomes}
    charges = {charge for _, _, charge in outcomes}
    assert statuses == {503} and len(bodies) == 1 and charges == {50_000}


def test_a_refused_budget_reads_no_data(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    api.set_cap("analyst", ANALYST, 0.1)
    monkeypatch.setattr(Engine, "execute", _fail_with_data)  # would turn into a 503 if reached
    assert api.query(ANALYST, count_query(epsilon=0.2)).status_code == 409
    assert _spent(api) == 0 and api.records("query.failed") == []


def test_concurrent_identical_questions_are_charged_once(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    started, release = threading.Event(), threading.Event()
    real = Engine.execute

    def slow(self: Engine, plan: Any, *args: Any) -> Any:
        started.set()
        assert release.wait(20)
        return real(self, plan, *args)

    monkeypatch.setattr(Engine, "execute", slow)
    answers: list[dict[str, Any]] = []

    def ask() -> None:
        answers.append(api.query(ANALYST, count_query(epsilon=0.3)).json())

    first = threading.Thread(target=ask)
    first.start()
    assert started.wait(20)
    second = threading.Thread(target=ask)
    second.start()
    second.join(0.5)
    assert second.is_alive()  # it waits for the release instead of charging
    release.set()
    first.join(20)
    second.join(20)
    assert sorted(a["cached"] for a in answers) == [False, True]
    assert answers[0]["rows"] == answers[1]["rows"]
    assert _spent(api) == 300_000
    assert len(api.records("query.run")) == 2  # one charge, one cached answer
    assert [e.decision for e in api.records("query.run")].count("allowed") == 1


@pytest.fixture
def stale_claim(api: Api) -> Computation:
    """A claim as a crash between charge and release leaves it: charged, no release, old."""
    service = api.state.queries
    spec, plan, row = service._plan(count_query(epsilon=0.25))
    _, query_hash = service._query_key(spec)
    caller = _caller(api)
    with session_scope(api.state.db) as session:
        claimed = computations.claim(session, caller, row.name, row.version, query_hash, plan.loss.micro_epsilon,
                                     service._scopes(caller, row.name), service.caps)
        record(session, caller, "query.run", row.name, dataset=row.name, dataset_version=row.version,
               computation_id=claimed.id, query_hash=query_hash, loss_micro=plan.loss.micro_epsilon,
               ledger=list(claimed.changes))
        stored = session.get(Computation, claimed.id)
        stored.started_at = stored.started_at - timedelta(hours=2)
        session.add(stored)
        session.flush()
        session.expunge(stored)
    return stored


def _caller(api: Api) -> Caller:
    with Session(api.state.db) as session:
        account = session.exec(select(Account).where(Account.name == ANALYST)).one()
        return Caller(account_id=account.id or 0, name=account.name, agency=account.agency)


def test_a_crash_between_charge_and_release_keeps_the_charge_and_is_abandoned_on_start(
        tmp_path: Path, dataset_folder: Path) -> None:  # noqa: F811
    with running_api(tmp_path / "state", dataset_folder) as first:
        keys = first.keys
        service = first.state.queries
        spec, plan, row = service._plan(count_query(epsilon=0.25))
        _, query_hash = service._query_key(spec)
        caller = _caller(first)
        with session_scope(first.state.db) as session:
            claimed = computations.claim(session, caller, row.name, row.version, query_hash,
                                         plan.loss.micro_epsilon, service._scopes(caller, row.name), service.caps)
            # The charge's audit entry, written with it as QueryService._charge does.
            record(session, caller, "query.run", row.name, dataset=row.name, dataset_version=row.version,
                   computation_id=claimed.id, query_hash=query_hash, loss_micro=plan.loss.micro_epsilon,
                   ledger=list(claimed.changes))
    # "The server stopped while computing": restarted with a timeout the claim is older than.
    with running_api(tmp_path / "state", None, keys=keys, computation_timeout_minutes=1e-9) as second:
        assert second.count(Computation) == 0
        [abandoned] = second.records("query.abandoned")
        assert json.loads(abandoned.entry_json)["detail"]["computation_id"] == claimed.id
        assert abandoned.decision == "failed"
        assert _spent(second) == 250_000  # the charge stays
        answer = second.query(ANALYST, count_query(epsilon=0.25))
        assert answer.status_code == 200 and answer.json()["cached"] is False
        assert _spent(second) == 500_000


def test_a_waiter_takes_over_a_claim_older_than_the_timeout(api: Api, stale_claim: Computation) -> None:
    api.state.queries.computation_timeout = timedelta(minutes=30)
    answer = api.query(ANALYST, count_query(epsilon=0.25))
    assert answer.status_code == 200 and answer.json()["cached"] is False
    assert [json.loads(e.entry_json)["detail"]["computation_id"] for e in api.records("query.abandoned")] == [
        stale_claim.id]
    assert _spent(api) == 500_000


def test_each_charge_has_its_own_computation_id_and_one_outcome(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The id ties a charge's entry to its outcome's: never handed out again (SQLite reused a deleted row's id)."""
    assert api.query(ANALYST, count_query(epsilon=0.11)).status_code == 200
    monkeypatch.setattr(Engine, "execute", _fail_with_data)
    assert api.query(ANALYST, count_query(epsilon=0.12)).status_code == 503
    monkeypatch.undo()
    assert api.query(ANALYST, count_query(epsilon=0.13)).status_code == 200
    ids = [json.loads(e.entry_json)["detail"]["computation_id"] for e in api.records("query.run")
           if e.decision == "allowed"]
    outcomes = [json.loads(e.entry_json)["detail"]["computation_id"]
                for e in api.records("query.release") + api.records("query.failed")]
    assert len(set(ids)) == 3 and sorted(outcomes) == sorted(ids)


def test_a_waiter_for_a_live_claim_is_answered_within_the_wait_limit_and_not_charged(
        api: Api, stale_claim: Computation) -> None:
    """A claim younger than the timeout (its process may have died a minute ago): the identical
    question waits at most the wait limit, then gets the 503 that says to ask again, uncharged."""
    api.state.queries.computation_timeout = timedelta(hours=3)  # the claim (2 h old) is not stale
    api.state.queries.wait_limit = timedelta(seconds=0.3)
    started = time.monotonic()
    answer = api.query(ANALYST, count_query(epsilon=0.25))
    assert answer.status_code == 503 and "still being computed" in answer.json()["detail"]
    assert 0.3 <= time.monotonic() - started < 10
    assert _spent(api) == 250_000  # only the claim's own charge
    assert api.count(Computation) == 1 and api.records("query.abandoned") == []
