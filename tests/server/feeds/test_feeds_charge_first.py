"""Feed releases spend before they read, and stay what they were approved for.

Every test here fails on the old flow (compute, then claim and charge in one
transaction): a computation that raised left nothing charged and the absence of the
release free to see; a concurrent producer computed the same period; a dataset version
with a larger contribution bound was released with another sensitivity than approved.
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from sqlalchemy import delete

from civicdp.queries.errors import DatasetUnavailable
from civicdp.server.services import admin
from civicdp.server.state.db import session_scope
from civicdp.server.state.feed_models import Feed, FeedApproval, FeedClaim, FeedRefusal, FeedRelease
from civicdp.server.feeds.outcomes import (
    CLAIM_TIMEOUT, FAILED_REASON, STALE_REASON, FeedBusy, FeedFailed, FeedRefused,
)
from civicdp.server.state.models import LedgerEntry, Release
from tests.conftest import base_metadata
from tests.server.api_fixtures import FEED, OVERSIGHT, STEWARD, Api, make_dataset_folder
from tests.server.api_fixtures import api, dataset_folder  # noqa: F401 - fixtures
from tests.server.feeds.test_feeds import LOSS, NOW, define, rows, service, spent

#: What a failing cast might say: a value from one person's row. It must never come out.
LEAK = "nan in row 17 (person_id 4711)"
ONCE = {"feed": LOSS, "dataset": LOSS, "lifetime": LOSS, "analyst": 0, "agency": 0}
TRIGGER = "/v1/feeds/daily-volumes/releases"


def break_engine(monkeypatch: pytest.MonkeyPatch, api: Api, error: BaseException | None = None) -> list[Any]:
    """Make every computation raise ``error`` (as on data that makes a cast fail); the plans it was given."""
    calls: list[Any] = []

    def execute(plan: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(plan)
        raise error if error is not None else ValueError(LEAK)

    monkeypatch.setattr(api.state.queries.engine, "execute", execute)
    return calls


def no_leak(api: Api, *texts: str) -> None:
    for text in (*texts, *(e.entry_json for e in api.records())):
        # Whole phrases: a bare "4711" also turns up by chance in timestamps and key prefixes.
        assert "row 17" not in text and "person_id 4711" not in text, text


def reregister(api: Api, root: Path, **changes: Any) -> None:
    metadata = {**base_metadata(), **changes}
    folder = make_dataset_folder(root, metadata=metadata)
    with session_scope(api.state.db) as session:
        admin.register_dataset(session, api.state.policies, None, folder)


# -- spend before reading ---------------------------------------------------------------------


def test_a_release_whose_computation_raises_is_charged_recorded_as_failed_and_not_served(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    define(api)
    calls = break_engine(monkeypatch, api)
    answer = api.post(STEWARD, TRIGGER)
    assert answer.status_code == 409, answer.text  # an answer, never a 500
    assert calls, "the engine was asked to compute"
    assert FAILED_REASON in answer.json()["detail"] and "charged epsilon 0.15" in answer.json()["detail"]
    no_leak(api, answer.text)
    assert spent(api) == ONCE, "charged exactly the release's loss, on every scope"
    assert rows(api, FeedRelease) == [] and rows(api, Release) == []
    assert api.get(FEED, "/v1/feeds/daily-volumes/releases/latest").status_code == 404
    assert api.get(FEED, "/v1/feeds/daily-volumes").json()["items"] == []
    (claim,) = rows(api, FeedClaim)
    assert (claim.number, claim.state, claim.attempt, claim.loss_micro) == (1, "failed", 1, LOSS)
    assert claim.reason == FAILED_REASON
    charges = rows(api, LedgerEntry)
    assert len(charges) == 3 and {c.amount_micro for c in charges} == {LOSS}
    assert json.loads(claim.ledger_json) == sorted(c.id for c in charges)
    # The charge was committed before the computation; the failure is recorded against it.
    (charge,) = api.records("feed.charge")
    (failed,) = api.records("feed.failed")
    assert charge.seq < failed.seq and failed.decision == "failed"
    detail = json.loads(failed.entry_json)["detail"]
    assert detail["reason"] == FAILED_REASON and detail["charge_seq"] == charge.seq == claim.charge_seq
    assert detail["charged_micro"] == LOSS and detail["loss_micro"] == 0
    assert json.loads(charge.entry_json)["detail"]["loss_micro"] == LOSS
    overview = api.get(OVERSIGHT, "/v1/feeds/overview").json()[0]
    assert (overview["produced"], overview["failed"], overview["refused"], overview["spent_micro"]) == (0, 1, 0, LOSS)
    assert overview["last_failure"]["reason"] == FAILED_REASON and overview["last_failure"]["number"] == 1
    no_leak(api, json.dumps(overview))


@pytest.mark.parametrize("error", [ValueError(LEAK), ZeroDivisionError(LEAK), KeyError(LEAK), MemoryError(LEAK),
                                   pl.exceptions.InvalidOperationError(LEAK), OSError(LEAK),
                                   DatasetUnavailable("table", LEAK, LEAK), None],
                         ids=["value", "zero-division", "key", "memory", "polars", "os", "unavailable", "clean"])
def test_the_charge_is_the_same_whether_the_data_computes_or_not(
        api: Api, monkeypatch: pytest.MonkeyPatch, error: BaseException | None) -> None:  # noqa: F811
    """D (clean) and D' (one bad row): identical charges and identical charge entries."""
    define(api)
    if error is not None:
        break_engine(monkeypatch, api, error)
    answer = api.post(STEWARD, TRIGGER)
    assert answer.status_code == (409 if error is not None else 201), answer.text
    no_leak(api, answer.text)
    assert spent(api) == ONCE
    assert sorted(c.amount_micro for c in rows(api, LedgerEntry)) == [LOSS] * 3
    (charge,) = api.records("feed.charge")
    detail = json.loads(charge.entry_json)["detail"]
    assert {k: detail[k] for k in ("loss_micro", "number", "period", "attempt")} == {
        "loss_micro": LOSS, "number": 1, "period": rows(api, FeedClaim)[0].period, "attempt": 1}
    assert [(c["before_micro"], c["after_micro"]) for c in detail["ledger"]] == [(0, LOSS)] * 3
    assert len(rows(api, FeedRelease)) == (0 if error is not None else 1)


def test_the_scheduler_does_not_retry_a_failed_release_for_free_and_a_steward_pays_again(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    define(api)
    feeds = service(api)
    break_engine(monkeypatch, api)
    outcomes = feeds.run_due(NOW)
    assert [type(o) for o in outcomes] == [FeedFailed] * 3
    assert all(FAILED_REASON in o.reason and "row 17" not in o.reason for o in outcomes)
    assert spent(api)["feed"] == 3 * LOSS
    assert feeds.run_due(NOW) == [] and spent(api)["feed"] == 3 * LOSS, "no free, silent retry"
    assert rows(api, FeedRefusal) == []
    monkeypatch.undo()  # the steward had the data fixed
    retried = api.post(STEWARD, TRIGGER)
    assert retried.status_code == 201 and retried.json()["number"] == 1, retried.text
    assert spent(api)["feed"] == 4 * LOSS, "the second attempt is charged again"
    claim = rows(api, FeedClaim, FeedClaim.number == 1)[0]
    assert (claim.state, claim.attempt) == ("released", 2)
    (release,) = rows(api, FeedRelease)
    linked = rows(api, LedgerEntry, LedgerEntry.release_id == release.release_id)
    assert len(linked) == 3 and {e.id for e in linked} == set(json.loads(claim.ledger_json))
    assert len(rows(api, LedgerEntry, LedgerEntry.release_id.is_(None))) == 9  # the three failed attempts
    overview = api.get(OVERSIGHT, "/v1/feeds/overview").json()[0]
    assert (overview["produced"], overview["failed"], overview["spent_micro"]) == (1, 2, 4 * LOSS)


def test_two_concurrent_producers_of_a_period_charge_once(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    define(api)
    engine = api.state.queries.engine
    real = engine.execute
    computing, loser_done = threading.Event(), threading.Event()
    computed_in: list[int | None] = []

    def slow(plan: Any, *args: Any, **kwargs: Any) -> Any:
        computed_in.append(threading.get_ident())
        computing.set()
        loser_done.wait(20)
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(engine, "execute", slow)
    (feed,) = rows(api, Feed)
    made: dict[str, Any] = {}
    winner = threading.Thread(target=lambda: made.setdefault("view", service(api).produce(feed, 1, None,
                                                                                            "scheduler", NOW)))
    winner.start()
    try:
        assert computing.wait(20), "the first producer never computed"
        assert spent(api) == ONCE, "the charge is committed before the data is read"
        with pytest.raises(FeedBusy, match="being produced"):
            service(api).produce(feed, 1, None, "scheduler", NOW)
        busy = api.post(STEWARD, TRIGGER)  # a steward asking for the same period meanwhile
        assert busy.status_code == 409 and "being produced" in busy.json()["detail"], busy.text
        overview = api.get(OVERSIGHT, "/v1/feeds/overview").json()[0]
        assert (overview["charged_not_released"], overview["produced"]) == (1, 0)
        assert spent(api) == ONCE, "the losers were refused at the claim, before any charge"
    finally:
        loser_done.set()
        winner.join(20)
    assert made["view"].fresh and made["view"].number == 1
    assert set(computed_in) == {winner.ident}, "only the claim's holder read the data"
    assert spent(api) == ONCE and len(rows(api, LedgerEntry)) == 3
    assert len(api.records("feed.charge")) == 1 and len(rows(api, FeedRelease)) == 1
    assert len(api.records("feed.release")) == 1 and api.records("feed.release")[0].decision == "allowed"


# -- a crash between the charge and the release ---------------------------------------------------


class Crash(BaseException):
    """The process dies while computing (nothing below the charge runs)."""


def test_a_crash_after_the_charge_leaves_it_charged_not_released_until_recovered(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    define(api, releases=1)
    feeds = service(api)
    break_engine(monkeypatch, api, Crash())
    with pytest.raises(Crash):
        feeds.run_due(NOW)
    monkeypatch.undo()
    (claim,) = rows(api, FeedClaim)
    assert claim.state == "charged" and spent(api) == ONCE and rows(api, FeedRelease) == []
    overview = api.get(OVERSIGHT, "/v1/feeds/overview").json()[0]
    assert (overview["charged_not_released"], overview["produced"], overview["failed"]) == (1, 0, 0)
    assert overview["planned_micro"] == 0, "the charged release is not planned twice"
    assert feeds.run_due(NOW) == [] and rows(api, FeedClaim)[0].state == "charged", "not stale yet"
    # After the timeout (a new process starting, or the next check) the claim is marked failed.
    assert feeds.run_due(NOW + CLAIM_TIMEOUT + timedelta(minutes=1)) == []
    (claim,) = rows(api, FeedClaim)
    assert (claim.state, claim.reason) == ("failed", STALE_REASON)
    (abandoned,) = api.records("feed.abandoned")
    detail = json.loads(abandoned.entry_json)["detail"]
    assert abandoned.decision == "failed" and detail["charge_seq"] == claim.charge_seq
    assert detail["reason"] == STALE_REASON and detail["charged_micro"] == LOSS
    assert spent(api) == ONCE, "never refunded"
    overview = api.get(OVERSIGHT, "/v1/feeds/overview").json()[0]
    assert (overview["charged_not_released"], overview["failed"]) == (0, 1)
    assert overview["last_failure"]["reason"] == STALE_REASON
    # Trying again would be charged again: the one-release allocation has no room left for it.
    retried = api.post(STEWARD, TRIGGER)
    assert retried.status_code == 409 and retried.json()["scope"] == "feed", retried.text
    assert spent(api) == ONCE and rows(api, FeedClaim)[0].state == "failed"


def test_a_late_result_of_a_timed_out_claim_never_leaves(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    define(api)
    feeds = service(api)
    real = api.state.queries.engine.execute

    def slow(plan: Any, *args: Any, **kwargs: Any) -> Any:
        feeds.recover(NOW + CLAIM_TIMEOUT + timedelta(minutes=1))  # another process took it for dead
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(api.state.queries.engine, "execute", slow)
    (feed,) = rows(api, Feed)
    with pytest.raises(FeedFailed, match="not stored within the claim timeout"):
        feeds.produce(feed, 1, None, "scheduler", NOW)
    assert rows(api, FeedRelease) == [] and rows(api, Release) == [] and spent(api) == ONCE
    assert rows(api, FeedClaim)[0].state == "failed" and len(api.records("feed.abandoned")) == 1


# -- frozen at approval ---------------------------------------------------------------------------


def test_a_dataset_version_with_a_larger_contribution_bound_refuses_the_next_release_without_charge(
        api: Api, tmp_path: Path) -> None:  # noqa: F811
    define(api)
    (approval,) = rows(api, FeedApproval)
    assert (approval.dataset_version, approval.loss_micro) == ("1", LOSS)
    (defined,) = api.records("feed.define")
    assert json.loads(defined.entry_json)["detail"]["approval_fingerprint"] == approval.fingerprint
    reregister(api, tmp_path / "v2", version="2", max_contributions=5)
    outcomes = service(api).run_due(NOW)
    assert len(outcomes) == 3 and all(type(o) is FeedRefused and o.budget is None for o in outcomes)
    reason = outcomes[0].reason
    assert "max_contributions: 3 -> 5" in reason and "version 2" in reason and "(version 1)" in reason
    assert "a new feed definition is needed" in reason
    assert spent(api) == {"feed": 0, "dataset": 0, "lifetime": 0, "analyst": 0, "agency": 0}
    assert rows(api, FeedClaim) == [] and rows(api, LedgerEntry) == [] and api.records("feed.charge") == []
    assert len(rows(api, FeedRefusal)) == 3
    again = api.post(STEWARD, TRIGGER)
    assert again.status_code == 409 and "a new feed definition is needed" in again.json()["detail"]
    assert spent(api)["lifetime"] == 0
    assert api.get(OVERSIGHT, "/v1/feeds/overview").json()[0]["refused"] == 3


@pytest.mark.parametrize("changes, words", [
    ({"tables": {"events": {**base_metadata()["tables"]["events"], "columns": {
        **base_metadata()["tables"]["events"]["columns"],
        "waiting_minutes": {"type": "float", "bounds": [0.0, 500.0], "nullable": True}}}}},
     "columns.events.waiting_minutes.bounds.1: 100.0 -> 500.0"),
    ({"tables": {"events": {**base_metadata()["tables"]["events"], "columns": {
        **base_metadata()["tables"]["events"]["columns"],
        "channel": {"type": "str", "keys": ["counter", "web", "mobile", "kiosk", "hotline"]}}}}},
     'columns.events.channel.keys.4: (none) -> "hotline"'),
], ids=["bounds", "keys"])
def test_changed_bounds_or_keys_of_a_column_read_also_refuse(api: Api, tmp_path: Path, changes: dict[str, Any],
                                                              words: str) -> None:  # noqa: F811
    define(api)
    reregister(api, tmp_path / "v2", version="2", **changes)
    answer = api.post(STEWARD, TRIGGER)
    assert answer.status_code == 409 and words in answer.json()["detail"], answer.text
    assert spent(api)["lifetime"] == 0 and rows(api, FeedClaim) == []


def test_a_new_version_with_the_same_bounds_keeps_the_feed_going(api: Api, tmp_path: Path) -> None:  # noqa: F811
    define(api)
    reregister(api, tmp_path / "v2", version="2", description="corrected description")
    made = api.post(STEWARD, TRIGGER)
    assert made.status_code == 201, made.text
    assert spent(api) == ONCE


def test_a_feed_defined_before_approvals_were_stored_is_approved_only_on_its_own_version(
        api: Api, tmp_path: Path) -> None:  # noqa: F811
    define(api)
    define(api, name="second")
    with session_scope(api.state.db) as session:  # as a database from before approvals were stored
        session.execute(delete(FeedApproval))
    assert api.post(STEWARD, TRIGGER).status_code == 201  # still version 1: approved now, from the audit log
    (approval,) = rows(api, FeedApproval)
    (approved,) = api.records("feed.approve")
    assert json.loads(approved.entry_json)["detail"]["approval_fingerprint"] == approval.fingerprint
    reregister(api, tmp_path / "v2", version="2", description="only the text changed")
    refused = api.post(STEWARD, "/v1/feeds/second/releases")
    assert refused.status_code == 409 and "a new feed definition is needed" in refused.json()["detail"]
    assert spent(api, "second")["feed"] == 0
    assert len(api.records("feed.charge")) == 1
