"""The server's side of the audit log: the stored tree, signing checkpoints, proofs, the periodic checks.

Entries are appended by :mod:`civicdp.server.auditlog.append` (in the transaction of what
they record) in their canonical form (:mod:`civicdp.server.auditlog.canonical`); the
tree heads are signed as C2SP checkpoints with the server's Ed25519 key
(:mod:`civicdp.server.auditlog.signing`).

The log only grows. :class:`AuditLog` verifies the stored entries against every signed
checkpoint when it starts and periodically (:mod:`civicdp.server.auditlog.integrity`) —
at a start only what was added since the last check recorded its mark
(:mod:`civicdp.server.auditlog.marks`) —, checks each entry it reads against its leaf
hash, and never signs a checkpoint that does not extend the latest one stored (or the
one it keeps beside its key, outside the database). A failed check is an *alarm* (:mod:`civicdp.server.auditlog.alarms`): the log
is frozen — nothing is appended, no checkpoint signed, every request that needs an entry
is answered 503 (:class:`AuditLogFailed`) — until the stored log verifies again, which
is recorded (``audit.integrity_restored``).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, NoReturn

from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session, select

from civicdp.audit.checkpoint import Checkpoint
from civicdp.audit.merkle import HashTree
from civicdp.audit.signing import SigningKey
from civicdp.server.auditlog import export as exporting
from civicdp.server.auditlog.alarms import LOG, AuditLogFailed, alarms_for, guard_requests
from civicdp.server.auditlog.append import append
from civicdp.server.auditlog.canonical import checked_leaf
from civicdp.server.auditlog.integrity import Checked, LogChecks
from civicdp.server.auditlog.marks import EVIDENCE_MARK, LOG_MARK, Marks, ensure_tables
from civicdp.server.auditlog.signing import LogKeys
from civicdp.server.auditlog.tree_store import TileStore, TreeProblem, locked_session
from civicdp.server.state.db import reader, session_scope
from civicdp.server.state.models import AuditCheckpoint, AuditHead, AuditKey

logger = logging.getLogger("civicdp.audit")

#: A check of the state against the log, run after the log's own check when the log opens
#: and periodically (the server passes :func:`civicdp.server.auditlog.reconcile.check_state`).
#: Called with the database, the log, and whether it is the quick check of a start.
StateCheck = Callable[[DbEngine, "AuditLog", bool], object]


class AuditLog:
    """Checkpoints, proofs and exports over the stored entries (one per server process).

    The Merkle tree is stored in the database as tiles (:mod:`civicdp.server.auditlog.tree_store`), shared
    by every process: the entries committed since the tree's size are integrated on
    demand (a range read, under the log's lock), a missing number with later entries
    stored is an alarm, never a silent stop, and each entry read is checked against its
    leaf hash and the number it gives itself. Nothing proportional to the log is kept in
    memory, and a restart rebuilds nothing.

    The stored log is verified against every signed checkpoint (and the checkpoint kept
    beside the key) when the log is opened — the entries added since the last check's
    mark, and below it the stored tree's root, the entries' count and leaf hashes
    (:meth:`verify_since_mark`) — and by the periodic checks (:meth:`tick`, driven by the
    checkpoint timer through :meth:`due`), which read the whole log when no process on the
    database has within ``verify_every_minutes`` (:meth:`verify`). ``state_check`` (the
    server's reconciliation of budgets and stored answers,
    :mod:`civicdp.server.auditlog.reconcile`) runs at the same times; the read of the
    whole log also compares the stored tree with the entries. A checkpoint is signed only
    if the tree extends the latest one stored, by one signer at a time per database (the
    log's lock), and a process that has not verified the log reads it once before its
    first signature.
    """

    def __init__(self, db: DbEngine, key_path: Path, origin: str, every_entries: int = 1000,
                 every_minutes: float = 5.0, *, verify_every_minutes: float = 15.0,
                 held_path: Path | None = None, check_on_start: bool = True,
                 state_check: StateCheck | None = None) -> None:
        self.db = db
        self.keys = LogKeys(db, key_path, origin, held_path)
        self.key_path, self.origin, self.held_path = self.keys.key_path, origin, self.keys.held_path
        self.every_entries = every_entries
        self.every_minutes = every_minutes
        self.verify_every = timedelta(minutes=verify_every_minutes)
        self.tiles = TileStore(db, checked_leaf)
        self.checks = LogChecks(db, self.tiles, self.keys)
        self.marks = Marks(db, self.keys)
        self.state_check = state_check
        self._verified = False  # this process has read the whole log and found it sound
        self.checked_size: int | None = None  # the entries this process's last check of the log verified
        self._lock = threading.RLock()
        self._checkpointed = -1
        self._since_look = 0
        self._last_check: datetime | None = None
        ensure_tables(db)
        self.alarms = alarms_for(db)
        self.alarms.audit_log = weakref.ref(self)
        self.alarms.db = db  # the alarms raised here are shared with the other processes through it
        guard_requests(db, self.alarms)
        if check_on_start:
            self._open()

    # -- keys ----------------------------------------------------------------------------------

    @property
    def key(self) -> SigningKey:
        """The signing key, re-read when its file changes (after ``civicdp audit rotate-key``)."""
        return self.keys.key

    def public_keys(self) -> list[AuditKey]:
        return self.keys.public_keys()

    # -- alarms ---------------------------------------------------------------------------------

    @property
    def failed(self) -> str | None:
        """Why the stored log failed its integrity check, or None while it passes."""
        alarm = self.alarms.log
        return None if alarm is None else alarm.problem

    def fail(self, problem: str) -> NoReturn:
        """Raise the alarm: the log is frozen until it verifies again."""
        self.alarms.fail_log(problem)
        raise AuditLogFailed(problem)

    def _raise_if_failed(self) -> None:
        alarm = self.alarms.log
        if alarm is not None:
            raise AuditLogFailed(alarm.problem)

    def _recovered(self) -> None:
        cleared = self.alarms.clear_log()
        if cleared is None:
            return
        alarm, refused = cleared
        logger.warning("audit log verifies again (it failed since %s: %s)", alarm.since, alarm.problem)
        self.alarms.flush()
        with session_scope(self.db) as session:
            self.marks.forget(EVIDENCE_MARK, session)  # folded before the alarm: the reconciliation reads all again
            # Recorded once: by the process that raised it, or that took it up and removes its row.
            if self.alarms.unshare(LOG, session) or not alarm.adopted:
                append(session, caller=None, action="audit.integrity_restored", target="audit", decision="restored",
                       detail={"problem": alarm.problem, "since": alarm.since, "refused_requests": refused})

    def integrity(self) -> dict[str, Any]:
        """The integrity alarms of every process on this database, as readiness reports them."""
        self.alarms.refresh()
        return self.alarms.report()

    # -- tree -----------------------------------------------------------------------------------

    def sync(self) -> HashTree:
        """The stored tree of the whole committed log (integrated first); raise :class:`AuditLogFailed` on a gap."""
        with self._lock:
            return self.tiles.tree(self._sync_locked())

    def _sync_locked(self) -> int:
        self._raise_if_failed()
        try:
            return self.tiles.integrate()
        except TreeProblem as problem:
            self.fail(problem.problem)

    def leaf(self, seq: int) -> bytes | None:
        """The leaf hash of entry ``seq`` as the stored tree holds it (None if not committed yet)."""
        with self._lock:
            size = self.tiles.known_size
            if seq >= size:
                size = self._sync_locked()
            if not 0 <= seq < size:
                return None
            try:
                return self.tiles.tree(size).leaf(seq)
            except TreeProblem as problem:
                self.fail(problem.problem)

    # -- checks ---------------------------------------------------------------------------------

    def verify(self) -> None:
        """Verify the whole stored log; raise :class:`AuditLogFailed` (the alarm), or clear an alarm.

        In one snapshot: entries numbered 0, 1, ... without a gap, as many as the log's
        counter says, each hashing to its leaf hash and carrying its own number; every
        stored checkpoint parsed, signed by one of the log's keys and matching the root of
        the entries; the checkpoint kept beside the key matching too; and the stored tree
        holding exactly what the entries hash to (the entries integrated earlier
        unchanged). Linear in the size of the log, constant in memory.
        """
        self._check(full=True)

    def verify_since_mark(self) -> None:
        """Like :meth:`verify`, reading only the entries added since the last check recorded its mark.

        Below the mark: the stored tree's root at the mark, a count of the entries and a
        comparison of their leaf hashes with the tree (run by the database); anything odd
        there makes it read the whole log (:meth:`LogChecks.since`). Without a mark that
        verifies, the whole log is read.
        """
        self._check(full=False)

    def _check(self, full: bool) -> None:
        full = full or self.alarms.log is not None  # only a check of everything clears the log's alarm
        with self._lock:
            mark = self.marks.read(LOG_MARK)
            found: Checked | None = None
            if not full and mark is not None:
                found = self.checks.since(mark)
                if found.suspect:
                    found = None
            if found is None:
                found = self.checks.whole_log()
            if found.problem is not None:
                self.fail(found.problem)
            self._verified = True
            self.checked_size = found.size
            self.marks.record_check(found.size, found.root, found.checkpoints, full=found.full)
        self._recovered()

    def _verify_quietly(self, full: bool) -> None:
        try:
            self._check(full)
        except AuditLogFailed:
            pass  # the alarm is raised: readiness reports it
        except Exception:  # noqa: BLE001 - e.g. the database is down: retried at the next check
            logger.exception("could not verify the audit log; retrying at the next check")

    def tick(self, now: datetime | None = None, *, force: bool = False) -> None:
        """The periodic checks, when ``verify_every`` has passed (or ``force``): the log, then budgets and answers.

        The log is read whole when no process on this database has done so within
        ``verify_every`` (or it failed its check); otherwise only what was added since the last check.
        """
        now = now or datetime.now(timezone.utc)
        self.alarms.refresh()
        if (not force and not self.alarms.recheck and self._last_check is not None
                and now - self._last_check < self.verify_every):
            return
        self._last_check, self.alarms.recheck = now, False
        mark = self.marks.read(LOG_MARK)
        self._verify_quietly(full=mark is None or mark.full_at is None or now - mark.full_at >= self.verify_every)
        self._check_state(quick=False)

    def _open(self) -> None:
        """The checks when the log opens: what was added since the last check, then budgets and answers.

        The next periodic check comes when the last whole-log check (by any process) is
        ``verify_every`` old: at once, in the background, if it is older already.
        """
        now = datetime.now(timezone.utc)
        self.alarms.refresh()  # alarms raised by the processes already running
        self._verify_quietly(full=False)
        mark = self.marks.read(LOG_MARK)
        self._last_check = mark.full_at if mark is not None and mark.full_at is not None else now - self.verify_every
        self._check_state(quick=True)

    def _check_state(self, quick: bool) -> None:
        if self.state_check is None:
            return
        try:
            self.state_check(self.db, self, quick)
        except Exception:  # noqa: BLE001
            logger.exception("could not reconcile budgets and stored answers; retrying at the next check")

    def latest(self) -> AuditCheckpoint | None:
        with Session(reader(self.db)) as session:
            return session.exec(select(AuditCheckpoint).order_by(AuditCheckpoint.size.desc())).first()  # type: ignore[union-attr]

    def _first_check(self) -> None:
        """Before this process's first signature, unless it verified the log: read it all once (the alarm if bad)."""
        problem = self.checks.first(self.latest())
        if problem is not None:
            self.fail(problem)
        self._verified = True

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint(self, extra_keys: list[SigningKey] | None = None) -> AuditCheckpoint:
        """The checkpoint of the whole committed log, signed now if the log has grown.

        Signed only if the tree extends the latest stored checkpoint (same root at its
        size, at least as many entries) and the checkpoint kept beside the key; otherwise
        the alarm is raised and :class:`AuditLogFailed` raised. One signer at a time per
        database: the entries are integrated, checked and signed in one transaction under
        the log's lock, so two processes never sign different roots for one size.
        """
        with self._lock:
            self._raise_if_failed()
            if not self._verified:
                self._first_check()
            self._sync_locked()  # catch up in chunks first: the signing transaction then holds the lock briefly
            key = self.key  # (re-read and registered outside the locked transaction)
            written: list[tuple[int, int, bytes]] = []
            try:
                with locked_session(self.db) as session:
                    latest = session.exec(select(AuditCheckpoint)  # type: ignore[union-attr]
                                          .order_by(AuditCheckpoint.size.desc())).first()
                    size, _ = self.tiles.integrate_locked(session, written)
                    tree = self.tiles.tree(size, session)
                    problem = self.checks.extends(latest, tree, session)
                    if problem is not None:
                        self.fail(problem)
                    if latest is not None and latest.size == size and not extra_keys:
                        signed = AuditCheckpoint(size=latest.size, root=latest.root, note=latest.note,
                                                 created_at=latest.created_at)
                        note = None
                    else:
                        now = datetime.now(timezone.utc).replace(microsecond=0)
                        note = Checkpoint(self.origin, size, tree.root(size),
                                          (f"time {now.isoformat().replace('+00:00', 'Z')}",))
                        for signer in [key, *(extra_keys or [])]:
                            note = note.signed_by(signer)
                        if extra_keys:
                            session.execute(AuditCheckpoint.__table__.delete().where(AuditCheckpoint.size == size))
                        signed = AuditCheckpoint(size=size, root=note.root.hex(), note=note.text(), created_at=now)
                        session.add(AuditCheckpoint(size=size, root=signed.root, note=signed.note, created_at=now))
            except TreeProblem as problem:
                self.fail(problem.problem)
            for level, index, data in written:
                self.tiles._remember(level, index, data)
            self.tiles.known_size = max(self.tiles.known_size, size)
            self.keys.hold(note if note is not None else Checkpoint.parse(signed.note))
            self._checkpointed = size
            return signed

    def count_request(self) -> bool:
        """Count one request; True every ``every_entries / 8`` of them, when :meth:`look` is due.

        Other processes look too, and the timer catches the rest, so most requests pay
        neither a database read nor a thread hop for checkpointing.
        """
        self._since_look += 1
        if self._since_look < max(1, self.every_entries // 8):
            return False
        self._since_look = 0
        return True

    def look(self) -> None:
        """Sign a checkpoint if ``every_entries`` entries have been added since the last one."""
        if self.alarms.log is not None:
            return  # nothing is signed while the log fails its check
        try:
            if self._checkpointed < 0:
                latest = self.latest()
                self._checkpointed = latest.size if latest else 0
            size = self._head_size()
            if size - self._checkpointed >= self.every_entries:
                self.checkpoint()
            elif size - self.tiles.known_size >= max(1, self.every_entries // 8):
                self.sync()  # integrate in small steps: signing then holds the log's lock only briefly
        except AuditLogFailed:
            pass  # the alarm is raised; readiness reports it

    def _head_size(self) -> int:
        with Session(reader(self.db)) as session:
            return session.get(AuditHead, 1).size  # type: ignore[union-attr]

    def due(self, now: datetime) -> bool:
        """Has the log grown and the last checkpoint grown older than ``every_minutes``?

        Runs the periodic checks first (:meth:`tick`); never due while the log fails its check.
        """
        self.tick(now)
        if self.alarms.log is not None:
            return False
        latest = self.latest()
        size = self._head_size()
        if latest is None:
            return size > 0
        created = latest.created_at if latest.created_at.tzinfo else latest.created_at.replace(tzinfo=timezone.utc)
        return size > latest.size and (now - created).total_seconds() >= self.every_minutes * 60

    # -- proofs and export ----------------------------------------------------------------------

    def inclusion(self, seq: int, size: int | None = None) -> dict[str, Any]:
        tree = self.sync()
        size = len(tree) if size is None else size
        proof = tree.inclusion_proof(seq, size)
        return {"seq": seq, "tree_size": size, "leaf_hash": tree.leaf(seq).hex(), "root": tree.root(size).hex(),
                "path": [h.hex() for h in proof]}

    def consistency(self, first: int, second: int) -> dict[str, Any]:
        tree = self.sync()
        proof = tree.consistency_proof(first, second)
        return {"first": first, "second": second, "first_root": tree.root(first).hex(),
                "second_root": tree.root(second).hex(), "path": [h.hex() for h in proof]}

    def export(self, target: str | Path | IO[bytes]) -> AuditCheckpoint:
        """Write a bundle of the whole log up to a checkpoint signed now.

        Every exported entry is checked against the tree as it is written: an entry
        changed, removed or reordered in the database since it was read raises the alarm
        and fails the export.
        """
        return exporting.export(self, target)
