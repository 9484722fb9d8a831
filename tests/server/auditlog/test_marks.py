"""A start checks only what was added since the last check recorded its mark — and still catches tampering.

The mark says how far a check got (:mod:`civicdp.server.auditlog.marks`); it is authenticated
with a key only the holder of the signing key can derive, so someone with write access to
the database but not the key cannot move it. Below the mark a start compares the stored
tree's root with the mark, counts the entries and compares their leaf hashes with the tree
in the database: rows deleted, edited (and re-hashed) or reordered below the mark are still
caught at the start, with the same explanation as before (the whole log is read to give it).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from civicdp.audit.merkle import leaf_hash
from civicdp.audit.signing import SigningKey
from civicdp.server.auditlog.alarms import AuditLogFailed
from civicdp.server.auditlog.marks import LOG_MARK, Mark, ensure_tables, mark_key, read_mark, write_mark
from civicdp.server.state.db import make_engine
from tests.server.api_fixtures import running_api  # noqa: F401 - fixtures
from tests.server.api_fixtures import dataset_folder  # noqa: F401
from tests.server.auditlog.test_log_integrity import _assert_stopped, _row, _signed_log, _sql, _url
from tests.server.auditlog.test_tree_store import ORIGIN, _fill, _log


def _mark_size(tmp_path: Path) -> int:
    db = make_engine(_url(tmp_path))
    try:
        with Session(db) as session:
            return int(session.execute(text("SELECT size FROM auditmark WHERE name = 'log'")).scalar_one())
    finally:
        db.dispose()


def _marked_log(tmp_path: Path, folder: Path) -> tuple[dict[str, str], int]:
    """A signed log, then a restart whose check marks it: tampering below the mark comes next."""
    keys, signed = _signed_log(tmp_path, folder)
    with running_api(tmp_path / "state", None, keys=keys) as api:
        assert api.get(None, "/v1/ready").json() == {"status": "ready"}
    assert _mark_size(tmp_path) >= signed
    return keys, signed


def test_a_deleted_entry_below_the_mark_stops_the_server_at_start(tmp_path: Path, dataset_folder: Path) -> None:
    keys, signed = _marked_log(tmp_path, dataset_folder)
    _sql(tmp_path, "DELETE FROM auditentry WHERE seq = 3")
    with running_api(tmp_path / "state", None, keys=keys) as api:
        _assert_stopped(api, signed, "entry 3 is missing but entries from 4 on are stored")


def test_an_entry_edited_and_rehashed_below_the_mark_is_caught_at_start(tmp_path: Path, dataset_folder: Path) -> None:
    keys, signed = _marked_log(tmp_path, dataset_folder)
    edited = _row(tmp_path, 2)["entry_json"].replace('"decision":"allowed"', '"decision":"refused"', 1)
    _sql(tmp_path, "UPDATE auditentry SET entry_json = :text, leaf_hash = :leaf WHERE seq = 2",
         text=edited, leaf=leaf_hash(edited.encode()).hex())
    with running_api(tmp_path / "state", None, keys=keys) as api:
        _assert_stopped(api, signed, f"do not match the signed checkpoint of size {signed}")


def test_entries_reordered_below_the_mark_are_caught_at_start(tmp_path: Path, dataset_folder: Path) -> None:
    keys, signed = _marked_log(tmp_path, dataset_folder)
    _sql(tmp_path, "UPDATE auditentry SET seq = -1 WHERE seq = 1", "UPDATE auditentry SET seq = 1 WHERE seq = 2",
         "UPDATE auditentry SET seq = 2 WHERE seq = -1")
    with running_api(tmp_path / "state", None, keys=keys) as api:
        _assert_stopped(api, signed, "row 1 holds entry number 2: entries were reordered")


@pytest.mark.parametrize("forgery", ["moved", "deleted", "rooted"])
def test_a_mark_changed_without_the_key_hides_nothing(tmp_path: Path, dataset_folder: Path, forgery: str) -> None:
    """Moving the mark (its size or root) or deleting it only makes the start read the whole log."""
    keys, signed = _marked_log(tmp_path, dataset_folder)
    edited = _row(tmp_path, 2)["entry_json"].replace('"decision":"allowed"', '"decision":"refused"', 1)
    _sql(tmp_path, "UPDATE auditentry SET entry_json = :text, leaf_hash = :leaf WHERE seq = 2",
         text=edited, leaf=leaf_hash(edited.encode()).hex())
    statement = {"moved": "UPDATE auditmark SET size = size + 3 WHERE name = 'log'",
                 "deleted": "DELETE FROM auditmark",
                 "rooted": "UPDATE auditmark SET root = :root WHERE name = 'log'"}[forgery]
    _sql(tmp_path, statement, root="00" * 32)
    with running_api(tmp_path / "state", None, keys=keys) as api:
        _assert_stopped(api, signed, f"do not match the signed checkpoint of size {signed}")


def test_a_mark_verifies_only_under_the_key_that_made_it(sqlite_engine: Engine, tmp_path: Path) -> None:
    ensure_tables(sqlite_engine)
    ours, theirs = SigningKey.generate(ORIGIN), SigningKey.generate(ORIGIN)
    assert mark_key(ours) == mark_key(ours) != mark_key(theirs)  # deterministic, and the key's own
    mark = Mark(LOG_MARK, 12, "ab" * 32, datetime.now(timezone.utc), None, b"digest")
    with Session(sqlite_engine) as session:
        write_mark(session, mark, mark_key(theirs))
        session.commit()
        assert read_mark(session, LOG_MARK, mark_key(ours)) is None  # written without our key: not a mark
        assert read_mark(session, LOG_MARK, mark_key(theirs)) == mark


def test_a_start_reads_only_the_entries_added_since_the_mark(tmp_path: Path, db_engine: Engine) -> None:
    _fill(db_engine, 25_000, per_transaction=5_000)
    _log(db_engine, tmp_path, check_on_start=False).checkpoint()
    first = _log(db_engine, tmp_path)  # nothing marked yet: reads everything
    assert first.failed is None and first.tiles.reads["entries"] == 3  # 2 batches of 20,000, and the read after
    _fill(db_engine, 300)
    again = _log(db_engine, tmp_path)
    assert again.failed is None and again.tiles.reads["entries"] == 2  # the 300 after the mark, and the read after
    assert again.checked_size == 25_000  # what the stored tree holds is verified and marked (the rest next time)


def test_an_entry_text_edited_below_the_mark_is_caught_by_the_next_check_of_the_whole_log(
        tmp_path: Path, db_engine: Engine) -> None:
    """Its leaf hash left as it was: the start does not read it, the check of the whole log does.

    That check runs when none was done within ``verify_every_minutes`` by any process (the
    first periodic check after such a start is then immediate), and whenever the entry is read.
    """
    _fill(db_engine, 600)
    _log(db_engine, tmp_path, check_on_start=False).checkpoint()
    assert _log(db_engine, tmp_path).failed is None  # marks the 600
    with db_engine.begin() as connection:
        connection.execute(text("UPDATE auditentry SET entry_json = replace(entry_json, 'test.entry', "
                                "'test.other') WHERE seq = 17"))
    log = _log(db_engine, tmp_path, verify_every_minutes=0)
    assert log.failed is None  # the start compares leaf hashes, not texts
    log.tick()
    assert log.failed is not None and "entry 17 does not hash to its stored leaf hash" in log.failed


def _alarm_rows(db: Engine) -> list[Any]:
    with Session(db) as session:
        return list(session.execute(text("SELECT key, problem FROM integrityalarm")))


def test_the_log_alarm_is_stored_for_the_other_processes(tmp_path: Path, db_engine: Engine) -> None:
    _fill(db_engine, 300)
    log = _log(db_engine, tmp_path, check_on_start=False)
    log.checkpoint()
    with db_engine.begin() as connection:
        connection.execute(text("DELETE FROM auditentry WHERE seq = 5"))
    with pytest.raises(AuditLogFailed, match="entry 5 is missing"):
        log.verify()
    log.alarms.flush()
    [(key, problem)] = _alarm_rows(db_engine)
    assert key == "log" and "entry 5 is missing" in problem
