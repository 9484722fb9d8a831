"""A log that only grows: audit rows deleted, edited or reordered in the database are caught.

Each test tampers with the state database the way an insider with SQL access would, then
starts the server (or asks the running one for a checkpoint): it must refuse to sign a
checkpoint that does not extend the latest one it signed, report the failure on
``/v1/ready``, and answer nothing that needs an audit entry — until the rows are put back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from civicdp.audit.merkle import leaf_hash
from civicdp.server.auditlog.alarms import AuditLogFailed
from civicdp.server.auditlog.log import AuditLog
from civicdp.server.state.db import make_engine
from civicdp.server.state.models import AuditCheckpoint, AuditEntry, Release
from tests.server.api_fixtures import (  # noqa: F401 - fixtures
    ANALYST, OVERSIGHT, Api, count_query, dataset_folder, running_api,
)

FAILED = "the audit log failed its integrity check"


def _signed_log(tmp_path: Path, folder: Path, after: int = 3) -> tuple[dict[str, str], int]:
    """A state with answers, a signed checkpoint, and ``after`` requests after it; the keys and the size."""
    with running_api(tmp_path / "state", folder) as api:
        assert api.query(ANALYST, count_query(epsilon=0.1)).status_code == 200
        assert api.query(ANALYST, count_query(epsilon=0.2)).status_code == 200
        assert api.get(OVERSIGHT, "/v1/audit/checkpoint").status_code == 200
        signed = _max_checkpoint(api.state.db)
        for _ in range(after):
            assert api.get(ANALYST, "/v1/datasets").status_code == 200
        return api.keys, signed


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{(tmp_path / 'state' / 'civicdp.db').resolve()}"


def _sql(tmp_path: Path, *statements: str, **params: Any) -> None:
    db = make_engine(_url(tmp_path))
    try:
        with db.begin() as connection:
            for statement in statements:
                connection.execute(text(statement), params)
    finally:
        db.dispose()


def _row(tmp_path: Path, seq: int) -> dict[str, Any]:
    db = make_engine(_url(tmp_path))
    try:
        with Session(db) as session:
            row = session.get(AuditEntry, seq)
            return row.model_dump() if row else {}
    finally:
        db.dispose()


def _max_checkpoint(db: Any) -> int:
    with Session(db) as session:
        return max(c.size for c in session.exec(select(AuditCheckpoint)))


def _assert_stopped(api: Api, signed: int, problem: str) -> None:
    """Readiness says why; no answer, no checkpoint, no export; nothing new stored."""
    ready = api.get(None, "/v1/ready")
    assert ready.status_code == 503, ready.text
    body = ready.json()
    assert body["status"] == FAILED.replace("the ", "", 1) and not body["audit_log"]["ok"]
    assert problem in body["audit_log"]["problem"]
    releases = api.count(Release)
    entries = api.count(AuditEntry)
    for response in (api.query(ANALYST, count_query(epsilon=0.1)),   # cached before: still not served
                     api.query(ANALYST, count_query(epsilon=0.3)),   # fresh
                     api.get(ANALYST, "/v1/datasets"),
                     api.get(OVERSIGHT, "/v1/audit/checkpoint"),
                     api.get(OVERSIGHT, "/v1/audit/export"),
                     api.get(None, "/v1/datasets")):
        assert response.status_code == 503, response.text
        assert FAILED in response.json()["detail"]
    with pytest.raises(AuditLogFailed):
        api.state.audit.checkpoint()
    assert _max_checkpoint(api.state.db) == signed  # nothing smaller or different was signed
    assert api.count(Release) == releases and api.count(AuditEntry) == entries
    assert api.get(None, "/v1/health").status_code == 200  # alive, not ready


def test_a_deleted_entry_below_the_checkpoint_stops_the_server_at_start(tmp_path: Path, dataset_folder: Path) -> None:
    keys, signed = _signed_log(tmp_path, dataset_folder)
    _sql(tmp_path, "DELETE FROM auditentry WHERE seq = 3")
    with running_api(tmp_path / "state", None, keys=keys) as api:
        _assert_stopped(api, signed, "entry 3 is missing but entries from 4 on are stored")


def test_an_edited_entry_rehashed_below_the_checkpoint_is_a_different_history(
        tmp_path: Path, dataset_folder: Path) -> None:
    keys, signed = _signed_log(tmp_path, dataset_folder)
    row = _row(tmp_path, 2)
    edited = row["entry_json"].replace('"decision":"allowed"', '"decision":"refused"', 1)
    assert edited != row["entry_json"]
    _sql(tmp_path, "UPDATE auditentry SET entry_json = :text, leaf_hash = :leaf WHERE seq = 2",
         text=edited, leaf=leaf_hash(edited.encode()).hex())
    with running_api(tmp_path / "state", None, keys=keys) as api:
        _assert_stopped(api, signed, f"do not match the signed checkpoint of size {signed}")


def test_an_entry_edited_without_its_hash_is_caught(tmp_path: Path, dataset_folder: Path) -> None:
    keys, signed = _signed_log(tmp_path, dataset_folder)
    row = _row(tmp_path, signed + 1)  # after the checkpoint: no signature covers it yet
    _sql(tmp_path, "UPDATE auditentry SET entry_json = :text WHERE seq = :seq",
         text=row["entry_json"].replace('"GET"', '"PUT"'), seq=signed + 1)
    with running_api(tmp_path / "state", None, keys=keys) as api:
        _assert_stopped(api, signed, f"entry {signed + 1} does not hash to its stored leaf hash")


def test_reordered_entries_are_caught(tmp_path: Path, dataset_folder: Path) -> None:
    keys, signed = _signed_log(tmp_path, dataset_folder)
    first, second = _row(tmp_path, 1), _row(tmp_path, 2)
    _sql(tmp_path, "UPDATE auditentry SET seq = -1 WHERE seq = 1", "UPDATE auditentry SET seq = 1 WHERE seq = 2",
         "UPDATE auditentry SET seq = 2 WHERE seq = -1")
    assert _row(tmp_path, 1)["entry_json"] == second["entry_json"] and _row(tmp_path, 2)["leaf_hash"] == first["leaf_hash"]
    with running_api(tmp_path / "state", None, keys=keys) as api:
        _assert_stopped(api, signed, "row 1 holds entry number 2: entries were reordered")


def test_a_gap_after_the_checkpoint_is_an_alarm_not_a_silent_stop(tmp_path: Path, dataset_folder: Path) -> None:
    """Entries after a deleted one are never silently left out of the next checkpoint."""
    keys, signed = _signed_log(tmp_path, dataset_folder, after=4)
    _sql(tmp_path, "DELETE FROM auditentry WHERE seq = :seq", seq=signed + 1)
    with running_api(tmp_path / "state", None, keys=keys) as api:
        _assert_stopped(api, signed, f"entry {signed + 1} is missing")


def test_the_last_entries_deleted_with_the_counter_put_back_is_a_smaller_log(
        tmp_path: Path, dataset_folder: Path) -> None:
    """No gap, a consistent counter: only the comparison with the signed size catches it."""
    keys, signed = _signed_log(tmp_path, dataset_folder)
    kept = signed - 2
    _sql(tmp_path, "DELETE FROM auditentry WHERE seq >= :kept", "UPDATE audithead SET size = :kept", kept=kept)
    with running_api(tmp_path / "state", None, keys=keys) as api:
        _assert_stopped(api, signed, f"signs {signed:,} entries but only {kept:,} are stored")


def test_a_rollback_of_entries_and_checkpoints_is_caught_by_the_checkpoint_kept_beside_the_key(
        tmp_path: Path, dataset_folder: Path) -> None:
    """The database alone looks whole (entries, counter and checkpoints agree): the held checkpoint does not."""
    keys, signed = _signed_log(tmp_path, dataset_folder)
    held = tmp_path / "state" / "audit-latest-checkpoint.txt"
    assert held.is_file() and f"\n{signed}\n" in held.read_text()
    kept = 2
    _sql(tmp_path, "DELETE FROM auditcheckpoint", "DELETE FROM auditentry WHERE seq >= :kept",
         "UPDATE audithead SET size = :kept", kept=kept)
    with running_api(tmp_path / "state", None, keys=keys) as api:
        ready = api.get(None, "/v1/ready").json()
        assert f"this server signed a checkpoint of {signed:,} entries" in ready["audit_log"]["problem"]
        assert api.query(ANALYST, count_query(epsilon=0.1)).status_code == 503
        with pytest.raises(AuditLogFailed):
            api.state.audit.checkpoint()
        with Session(api.state.db) as session:
            assert session.exec(select(AuditCheckpoint)).first() is None


@pytest.mark.parametrize("tampering", ["shorter", "different"])
def test_checkpoint_refuses_to_sign_what_does_not_extend_the_latest(
        tmp_path: Path, dataset_folder: Path, tampering: str) -> None:
    """``AuditLog.checkpoint`` itself, with no check at start: smaller, or another prefix, is never signed."""
    keys, signed = _signed_log(tmp_path, dataset_folder)
    if tampering == "shorter":
        _sql(tmp_path, "DELETE FROM auditentry WHERE seq >= 4", "UPDATE audithead SET size = 4")
        expected = f"signs {signed:,} entries but only 4 are stored"
    else:
        edited = _row(tmp_path, 0)["entry_json"].replace('"decision":"allowed"', '"decision":"denied"', 1)
        _sql(tmp_path, "UPDATE auditentry SET entry_json = :t, leaf_hash = :l WHERE seq = 0",
             t=edited, l=leaf_hash(edited.encode()).hex())
        expected = "do not match the latest signed checkpoint"
    (tmp_path / "state" / "audit-latest-checkpoint.txt").unlink()  # only the stored checkpoint decides here
    db = make_engine(_url(tmp_path))
    try:
        log = AuditLog(db, tmp_path / "state" / "audit-signing.key", "civicdp.local/audit", check_on_start=False)
        with pytest.raises(AuditLogFailed, match=expected):
            log.checkpoint()
        assert log.failed and expected in log.failed
        assert _max_checkpoint(db) == signed
    finally:
        db.dispose()


def test_rows_deleted_under_a_running_server_stop_it_and_putting_them_back_recovers(
        tmp_path: Path, dataset_folder: Path) -> None:
    with running_api(tmp_path / "state", dataset_folder) as api:
        assert api.query(ANALYST, count_query(epsilon=0.1)).status_code == 200
        assert api.get(OVERSIGHT, "/v1/audit/checkpoint").status_code == 200
        signed = _max_checkpoint(api.state.db)
        assert api.get(ANALYST, "/v1/datasets").status_code == 200
        saved = _row(tmp_path, 1)
        _sql(tmp_path, "DELETE FROM auditentry WHERE seq = 1")
        # This process read entry 1 long ago; the count of what it signed tells it is gone.
        refused = api.get(OVERSIGHT, "/v1/audit/checkpoint")
        assert refused.status_code == 503 and "no longer stored" in refused.json()["detail"]
        _assert_stopped(api, signed, "no longer stored")
        api.state.audit.tick(force=True)  # the periodic check: still broken
        assert api.get(None, "/v1/ready").status_code == 503

        _sql(tmp_path, "INSERT INTO auditentry (seq, created_at, account, account_id, agency, action, target, "
                       "dataset, decision, entry_json, leaf_hash) VALUES (:seq, :created_at, :account, :account_id, "
                       ":agency, :action, :target, :dataset, :decision, :entry_json, :leaf_hash)", **saved)
        api.state.audit.tick(force=True)
        assert api.get(None, "/v1/ready").json() == {"status": "ready"}
        [restored] = api.records("audit.integrity_restored")
        detail = json.loads(restored.entry_json)["detail"]
        assert "no longer stored" in detail["problem"] and int(detail["refused_requests"]) >= 6
        assert api.query(ANALYST, count_query(epsilon=0.1)).status_code == 200  # cached, served again
        assert api.get(OVERSIGHT, "/v1/audit/export").status_code == 200
        assert _max_checkpoint(api.state.db) > signed


def test_an_export_stops_at_an_entry_changed_since_it_was_read(tmp_path: Path, dataset_folder: Path) -> None:
    with running_api(tmp_path / "state", dataset_folder) as api:
        assert api.query(ANALYST, count_query(epsilon=0.1)).status_code == 200
        assert api.get(OVERSIGHT, "/v1/audit/checkpoint").status_code == 200
        edited = _row(tmp_path, 0)["entry_json"].replace('"decision":"allowed"', '"decision":"denied"', 1)
        _sql(tmp_path, "UPDATE auditentry SET entry_json = :t, leaf_hash = :l WHERE seq = 0",
             t=edited, l=leaf_hash(edited.encode()).hex())
        export = api.get(OVERSIGHT, "/v1/audit/export")
        assert export.status_code == 503 and "entry 0 is not what this server read" in export.json()["detail"]
        assert api.get(None, "/v1/ready").status_code == 503


def test_an_untampered_log_restarts_ready(tmp_path: Path, dataset_folder: Path) -> None:
    keys, signed = _signed_log(tmp_path, dataset_folder)
    with running_api(tmp_path / "state", None, keys=keys) as api:
        assert api.get(None, "/v1/ready").json() == {"status": "ready"}
        assert api.query(ANALYST, count_query(epsilon=0.1)).json()["cached"] is True
        assert api.get(OVERSIGHT, "/v1/audit/checkpoint").status_code == 200
        assert _max_checkpoint(api.state.db) > signed
        assert not api.records("audit.integrity_restored")


def test_entries_after_a_gap_are_never_left_out_silently(tmp_path: Path, dataset_folder: Path) -> None:
    """Catching up stops at a missing number with later entries stored: that is the alarm, not a smaller tree."""
    keys, signed = _signed_log(tmp_path, dataset_folder, after=4)
    _sql(tmp_path, "DELETE FROM auditentry WHERE seq = :seq", seq=signed + 1)
    db = make_engine(_url(tmp_path))
    try:
        log = AuditLog(db, tmp_path / "state" / "audit-signing.key", "civicdp.local/audit", check_on_start=False)
        with pytest.raises(AuditLogFailed, match=f"entry {signed + 1} is missing but entries from {signed + 2} on"):
            log.checkpoint()
        assert _max_checkpoint(db) == signed
    finally:
        db.dispose()
