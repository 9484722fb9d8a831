"""The audit log's Merkle tree stored as tiles: one tree for every process, nothing rebuilt at a restart.

Entries are appended straight into the state database (as the server's requests do, many
per transaction); the tree is integrated by whichever log needs it, under the log's lock.
Each test runs on SQLite and on PostgreSQL where it concerns processes sharing one database.
"""

from __future__ import annotations

import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from civicdp.audit.checkpoint import Checkpoint
from civicdp.audit.merkle import MerkleTree, verify_consistency, verify_inclusion
from civicdp.server.auditlog.alarms import AuditLogFailed
from civicdp.server.auditlog.append import append_many, ensure_head
from civicdp.server.auditlog.log import AuditLog
from civicdp.server.state.db import make_engine
from civicdp.server.state.models import AuditCheckpoint, AuditEntry, AuditTile
from civicdp.server.auditlog.tree_store import TileStore

ORIGIN = "civicdp.local/audit"


def _fill(db: Engine, count: int, per_transaction: int = 1000, tag: str = "") -> None:
    """``count`` entries, ``per_transaction`` in each transaction (like the group-committed cached answers)."""
    ensure_head(db)
    done = 0
    while done < count:
        n = min(per_transaction, count - done)
        with db.begin() as connection:
            append_many(connection, [{"caller": None, "action": "test.entry", "target": f"{tag}{done + i}",
                                      "decision": "allowed", "detail": {"n": done + i}} for i in range(n)])
        done += n


def _leaves(db: Engine) -> list[bytes]:
    with Session(db) as session:
        return [bytes.fromhex(h) for (h,) in session.execute(select(AuditEntry.leaf_hash).order_by(AuditEntry.seq))]


def _log(db: Engine, folder: Path, **kwargs: Any) -> AuditLog:
    return AuditLog(db, folder / "audit-signing.key", ORIGIN, **kwargs)


class Statements:
    """The SQL statements an engine runs while counting."""

    def __init__(self, db: Engine) -> None:
        self.db = db
        self.seen: list[str] = []

    def __enter__(self) -> Statements:
        event.listen(self.db, "after_cursor_execute", self._after)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.db, "after_cursor_execute", self._after)

    def _after(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        self.seen.append(statement)


@pytest.mark.slow
def test_a_restart_with_a_large_log_answers_its_first_proof_without_reading_the_log(tmp_path: Path,
                                                                                     sqlite_engine: Engine) -> None:
    """20,000 entries: the first proof after a restart reads a few tiles, no entry and no whole tree."""
    _fill(sqlite_engine, 20_000, per_transaction=2_000)
    first = _log(sqlite_engine, tmp_path, check_on_start=False)
    signed = first.checkpoint()
    assert signed.size == 20_000
    url = sqlite_engine.url.render_as_string(hide_password=False)
    sqlite_engine.dispose()

    restarted = make_engine(url)  # a new process: nothing cached
    try:
        log = _log(restarted, tmp_path, check_on_start=False)
        log._verified = True  # the whole-log check at start is measured apart (it streams; see below)
        tracemalloc.start()
        with Statements(restarted) as statements:
            proof = log.inclusion(12_345)
            consistency = log.consistency(10_000, 20_000)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        leaves = _leaves(restarted)
        assert verify_inclusion(leaves[12_345], 12_345, 20_000, [bytes.fromhex(h) for h in proof["path"]],
                                Checkpoint.parse(signed.note).root)
        assert verify_consistency(10_000, 20_000, MerkleTree.from_leaves(leaves[:10_000]).root(),
                                  Checkpoint.parse(signed.note).root, [bytes.fromhex(h) for h in consistency["path"]])
        assert not [s for s in statements.seen if "FROM auditentry" in s], statements.seen  # no entry read
        tiles = [s for s in statements.seen if "FROM audittile" in s]
        assert len(tiles) <= 8, tiles  # O(log n) tiles: 20,000 entries have 79 of level 0 and 1 of level 1
        assert peak < 1_000_000, f"the first proof allocated {peak:,} bytes"  # the old in-memory tree: ~4 MB here

        # The check of the whole log at a start reads every entry once, in batches, against the stored tiles.
        tracemalloc.start()
        checked = _log(restarted, tmp_path)  # check_on_start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert checked.failed is None and checked._verified
        assert peak < 40_000_000, f"the check at start allocated {peak:,} bytes"
    finally:
        restarted.dispose()


def test_processes_integrating_at_once_build_one_tree(db_engine: Engine, tmp_path: Path) -> None:
    """Four appenders, each with its own tile cache (as separate processes), integrating as they go."""
    ensure_head(db_engine)
    errors: list[BaseException] = []

    def process(tag: str) -> None:
        store = TileStore(db_engine, lambda seq, text_, hex_hash: bytes.fromhex(hex_hash))
        try:
            for _ in range(12):
                _fill(db_engine, 37, per_transaction=37, tag=tag)
                store.integrate()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=process, args=(f"p{i}-",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    store = TileStore(db_engine, lambda seq, text_, hex_hash: bytes.fromhex(hex_hash))
    size = store.integrate()
    leaves = _leaves(db_engine)
    assert size == len(leaves) == 4 * 12 * 37
    memory = MerkleTree.from_leaves(leaves)
    tree = store.tree(size)
    for n in (1, 255, 256, 257, 1000, size):
        assert tree.root(n) == memory.root(n)
    assert tree.inclusion_proof(777, size) == memory.inclusion_proof(777, size)


def test_a_changed_tile_is_caught_by_the_check_of_the_whole_log(tmp_path: Path, sqlite_engine: Engine) -> None:
    _fill(sqlite_engine, 600)
    log = _log(sqlite_engine, tmp_path, check_on_start=False)
    log.checkpoint()
    with sqlite_engine.begin() as connection:
        data = connection.execute(text("SELECT hashes FROM audittile WHERE level = 0 AND idx = 1")).scalar_one()
        connection.execute(text("UPDATE audittile SET hashes = :h WHERE level = 0 AND idx = 1"),
                           {"h": data[:64] + bytes([data[64] ^ 1]) + data[65:]})
    with pytest.raises(AuditLogFailed, match="entry 258 is not what this server read earlier"):
        _log(sqlite_engine, tmp_path, check_on_start=False).verify()
    with sqlite_engine.begin() as connection:  # put it back, and change a hash of the next level instead
        connection.execute(text("UPDATE audittile SET hashes = :h WHERE level = 0 AND idx = 1"), {"h": data})
        high = connection.execute(text("SELECT hashes FROM audittile WHERE level = 1 AND idx = 0")).scalar_one()
        connection.execute(text("UPDATE audittile SET hashes = :h WHERE level = 1 AND idx = 0"),
                           {"h": bytes([high[0] ^ 1]) + high[1:]})
    fresh = _log(sqlite_engine, tmp_path, check_on_start=False)
    with pytest.raises(AuditLogFailed, match=r"the stored Merkle tree \(tile 1/0\) does not match the entries"):
        fresh.verify()


def test_a_log_stored_before_the_tree_was_is_integrated_from_its_entries(tmp_path: Path,
                                                                        sqlite_engine: Engine) -> None:
    """A database of an earlier civicdp (entries and checkpoints, no tiles): the tree is built once, the same."""
    _fill(sqlite_engine, 700)
    signed = _log(sqlite_engine, tmp_path, check_on_start=False).checkpoint()
    with sqlite_engine.begin() as connection:
        connection.execute(text("DELETE FROM audittile"))
        connection.execute(text("UPDATE audittree SET size = 0"))
    _fill(sqlite_engine, 50)
    log = _log(sqlite_engine, tmp_path)
    assert log.failed is None
    newer = log.checkpoint()
    assert newer.size == 750
    proof = log.consistency(signed.size, newer.size)
    assert verify_consistency(signed.size, newer.size, Checkpoint.parse(signed.note).root,
                              Checkpoint.parse(newer.note).root, [bytes.fromhex(h) for h in proof["path"]])
    with Session(sqlite_engine) as session:
        assert session.execute(select(AuditTile.level).where(AuditTile.level == 1)).first() is not None


def test_two_signers_on_one_database_never_fork(db_engine: Engine, tmp_path: Path) -> None:
    """Two logs (as two processes) signing while entries are appended: one signer at a time, one history."""
    _fill(db_engine, 10)
    logs = [_log(db_engine, tmp_path, check_on_start=False) for _ in range(2)]
    logs[0].key  # noqa: B018 - the state's key exists before they sign (civicdp init makes it)
    errors: list[BaseException] = []
    stop = threading.Event()

    def sign(log: AuditLog) -> None:
        try:
            while not stop.is_set():
                log.checkpoint()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    signers = [threading.Thread(target=sign, args=(log,)) for log in logs]
    for thread in signers:
        thread.start()
    try:
        for round_ in range(30):
            _fill(db_engine, 13, per_transaction=13)
            deadline = time.monotonic() + 5
            while round_ % 5 == 0 and time.monotonic() < deadline:  # now and then, let a signer catch up
                with Session(db_engine) as session:
                    if max(session.exec(select(AuditCheckpoint.size)).all() or [0]) >= 10 + 13 * (round_ + 1):
                        break
                time.sleep(0.01)
    finally:
        stop.set()
        for thread in signers:
            thread.join(timeout=120)
    assert not errors, errors
    assert all(log.failed is None for log in logs)
    with Session(db_engine) as session:
        stored = list(session.exec(select(AuditCheckpoint).order_by(AuditCheckpoint.size)))
    assert len(stored) >= 2
    memory = MerkleTree.from_leaves(_leaves(db_engine))
    for checkpoint in stored:
        assert Checkpoint.parse(checkpoint.note).root == memory.root(checkpoint.size)
    checked = _log(db_engine, tmp_path)  # the whole log, every checkpoint, the kept one: all agree
    assert checked.failed is None
