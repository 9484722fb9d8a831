"""The integrity alarms of a state database, and the refusals they cause.

A failed check is an *alarm* (:class:`Alarms`): while the stored log fails its check it
is frozen — nothing is appended, no checkpoint signed, every request that needs an entry
is answered 503 (:class:`AuditLogFailed`) — until it verifies again. Budgets that failed
reconciliation and stored answers that failed their check are held alone
(:mod:`civicdp.server.auditlog.reconcile`).

Alarms are shared by the server processes on one database: each process keeps them in
memory (the checks of every request read them there) and stores every alarm it raises in
the database (``integrityalarm``, written by a background thread, since an alarm may be
raised inside a transaction); :meth:`Alarms.refresh` (readiness, the periodic checks)
takes up those raised by other processes. An alarm is cleared only by a check that
passes: an alarm taken up from another process also goes when its row does (the process
that raised it cleared it), while a process whose own alarm's row disappeared checks again.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, event, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine as DbEngine
from sqlmodel import Session
from starlette.exceptions import HTTPException

from civicdp.server.auditlog.canonical import plain
from civicdp.server.auditlog.marks import IntegrityAlarm, ensure_tables
from civicdp.server.auditlog.slots import SLOT
from civicdp.server.state.db import reader

if TYPE_CHECKING:
    from civicdp.server.auditlog.log import AuditLog

logger = logging.getLogger("civicdp.audit")


class IntegrityFailure(HTTPException):
    """State that failed an integrity check: the request is answered 503, saying what failed."""

    def __init__(self, detail: str) -> None:
        super().__init__(503, detail, headers={"Retry-After": "300"})


class AuditLogFailed(IntegrityFailure):
    """The stored log failed its integrity check: nothing is appended or signed until it verifies again."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(f"the audit log failed its integrity check: {problem}. The server answers no request "
                         "that needs an audit entry until the stored log verifies against its signed checkpoints "
                         "again (GET /v1/ready shows the state)")


@dataclass
class Alarm:
    """One failed check: what readiness shows (``problem``), the full explanation, since when."""

    problem: str
    detail: str
    since: datetime
    info: dict[str, Any] = field(default_factory=dict)
    recorded: bool = False  # its audit entry has been written
    adopted: bool = False  # raised by another process (taken up from the database)


LOG = "log"


def budget_key(key: tuple[str, str, str, str]) -> str:
    return "budget:" + json.dumps(list(key))


def release_key(release_id: int) -> str:
    return f"release:{release_id}"


class Alarms:
    """The integrity alarms of one state database, shared by everything in this process that uses it.

    ``log`` is set while the stored log fails its check (everything stops); ``budgets``
    (by scope key) and ``releases`` (by release id) hold what failed reconciliation or a
    stored answer's check (only those are refused). ``verified`` remembers, per release,
    what its audited entry vouches for, so a cached answer is checked against the log once
    per process and against its bytes every time.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: Alarm | None = None
        self.refused = 0
        self.budgets: dict[tuple[str, str, str, str], Alarm] = {}
        self.releases: dict[int, Alarm] = {}
        self.verified: dict[int, tuple[str, ...]] = {}
        self.audit_log: weakref.ReferenceType[AuditLog] | None = None
        self.evidence: Any = None  # civicdp.server.auditlog.reconcile's folded audit trail, valid while the log verifies
        self.kept: Any = None  # reconcile's folds of the entries the log's last check verified (civicdp.server.auditlog.kept)
        self.evidence_kept = -1  # how far the folds stored in the database go (reconcile's evidence mark)
        self.db: DbEngine | None = None  # where the alarms are shared (set by the server's AuditLog)
        self.recheck = False  # an alarm raised here lost its row: the next periodic check runs at once
        self._pending: list[tuple[str, Alarm]] = []
        self._writing: set[str] = set()
        self._turn = threading.Condition()
        self._writer: threading.Thread | None = None

    def fail_log(self, problem: str) -> Alarm:
        with self.lock:
            if self.log is None:
                self.log = Alarm(problem, problem, datetime.now(timezone.utc))
                self.refused = 0
                self.evidence = self.kept = None
                logger.critical("AUDIT LOG INTEGRITY ALARM: %s. Requests that need an audit entry are refused "
                                "until the stored log verifies again.", problem)
            alarm = self.log
        self.share(LOG, alarm)
        return alarm

    def clear_log(self) -> tuple[Alarm, int] | None:
        with self.lock:
            alarm, self.log = self.log, None
            if alarm is None:
                return None
            self.evidence = self.kept = None  # folded while the log was failed: read everything again
            return alarm, self.refused

    def count_refused(self) -> None:
        with self.lock:
            self.refused += 1

    def report(self) -> dict[str, Any]:
        """What readiness shows: no amounts, no entry contents (readiness needs no key)."""
        with self.lock:
            log = self.log
            return {
                "audit_log": ({"ok": True} if log is None else
                              {"ok": False, "problem": log.problem, "since": plain(log.since),
                               "refused_requests": self.refused}),
                "held_budgets": [{**alarm.info, "problem": alarm.problem, "since": plain(alarm.since)}
                                 for _, alarm in sorted(self.budgets.items())],
                "refused_releases": [{"release_id": rid, "problem": alarm.problem, "since": plain(alarm.since)}
                                     for rid, alarm in sorted(self.releases.items())],
            }

    @property
    def any(self) -> bool:
        return self.log is not None or bool(self.budgets) or bool(self.releases)

    # -- shared with the other processes on the database -------------------------------------------

    def _mine(self) -> dict[str, Alarm]:
        mine = {budget_key(k): a for k, a in self.budgets.items()}
        mine.update({release_key(r): a for r, a in self.releases.items()})
        if self.log is not None:
            mine[LOG] = self.log
        return mine

    def share(self, key: str, alarm: Alarm) -> None:
        """Store ``alarm`` for the other processes (in the background: the caller may be inside a transaction)."""
        if self.db is None or alarm.adopted:
            return
        with self._turn:
            self._pending.append((key, replace(alarm, info=dict(alarm.info))))
            if self._writer is None:
                self._writer = threading.Thread(target=self._write, name="civicdp-alarms", daemon=True)
                self._writer.start()
            self._turn.notify_all()

    def _write(self) -> None:
        while True:
            with self._turn:
                if not self._pending and not self._turn.wait_for(lambda: bool(self._pending), timeout=5):
                    self._writer = None
                    return
                batch, self._pending = self._pending, []
                self._writing = {key for key, _ in batch}
            try:
                assert self.db is not None
                ensure_tables(self.db)
                with self.db.connect() as connection:
                    connection.detach()  # closed when done, not pooled: the writer may outlive the engine's pool
                    with connection.begin():
                        for key, alarm in batch:
                            _upsert(connection, key, alarm)
            except Exception:  # noqa: BLE001 - the alarm still holds here; the next check shares it again
                logger.warning("could not share integrity alarms in the database", exc_info=True)
            finally:
                with self._turn:
                    self._writing = set()
                    self._turn.notify_all()

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until the alarms raised so far are stored (never inside a transaction: the writer needs its turn)."""
        with self._turn:
            self._turn.wait_for(lambda: not self._pending and not self._writing, timeout=timeout)

    def unshare(self, key: str, session: Session) -> bool:
        """Remove the stored alarm ``key`` in ``session``'s transaction; False if no process stored it any more."""
        return bool(session.execute(delete(IntegrityAlarm).where(IntegrityAlarm.key == key)).rowcount)  # type: ignore[arg-type]

    def refresh(self) -> None:
        """Take up the alarms other processes raised, and drop those taken up whose rows are gone."""
        if self.db is None:
            return
        try:
            ensure_tables(self.db)
            with Session(reader(self.db)) as session:
                rows = list(session.execute(select(IntegrityAlarm)).scalars())
        except Exception:  # noqa: BLE001 - readiness still answers from this process's alarms
            logger.warning("could not read the integrity alarms of the other processes", exc_info=True)
            return
        with self._turn:
            busy = {key for key, _ in self._pending} | self._writing
        with self.lock:
            stored = {row.key: row for row in rows}
            for key, alarm in self._mine().items():
                if key not in stored and key not in busy:
                    if alarm.adopted:
                        self._drop(key)
                    else:
                        self.recheck = True
            for key, row in stored.items():
                self._adopt(key, row)

    def _drop(self, key: str) -> None:
        if key == LOG:
            self.log = None
            self.evidence = self.kept = None
        elif key.startswith("release:"):
            self.releases.pop(int(key.split(":", 1)[1]), None)
        else:
            self.budgets.pop(tuple(json.loads(key.split(":", 1)[1])), None)  # type: ignore[arg-type]

    def _adopt(self, key: str, row: IntegrityAlarm) -> None:
        try:
            alarm = Alarm(row.problem, row.detail, _utc(row.since), json.loads(row.info), row.recorded, adopted=True)
            if key == LOG:
                if self.log is None:
                    self.log, self.refused = alarm, 0
                    self.evidence = self.kept = None
                    logger.critical("AUDIT LOG INTEGRITY ALARM raised by another server process: %s", row.problem)
            elif key.startswith("release:"):
                self.releases.setdefault(int(key.split(":", 1)[1]), alarm)
            elif key.startswith("budget:"):
                self.budgets.setdefault(tuple(json.loads(key.split(":", 1)[1])), alarm)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            logger.warning("ignoring an unreadable integrity alarm row %r", key)


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _upsert(connection: Connection, key: str, alarm: Alarm) -> None:
    insert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
    values = {"key": key, "problem": alarm.problem, "detail": alarm.detail,
              "since": alarm.since.astimezone(timezone.utc),
              "info": json.dumps(plain(alarm.info), sort_keys=True), "recorded": alarm.recorded}
    statement = insert(IntegrityAlarm).values(**values)
    connection.execute(statement.on_conflict_do_update(index_elements=["key"],
                                                       set_={k: v for k, v in values.items() if k != "key"}))


_ALARMS: dict[str, Alarms] = {}
_ALARMS_BY_ENGINE: weakref.WeakKeyDictionary[Any, Alarms] = weakref.WeakKeyDictionary()
_ALARMS_LOCK = threading.Lock()
_GUARDED: weakref.WeakSet[Any] = weakref.WeakSet()


def alarms_for(db: Any) -> Alarms:
    """The alarms of the database behind ``db`` (an engine, or a session's bind), one per database URL."""
    try:
        return _ALARMS_BY_ENGINE[db]
    except (KeyError, TypeError):
        pass
    key = db.url.render_as_string(hide_password=False)
    with _ALARMS_LOCK:
        alarms = _ALARMS.setdefault(key, Alarms())
    try:
        _ALARMS_BY_ENGINE[db] = alarms
    except TypeError:
        pass
    return alarms


def guard_requests(db: DbEngine, alarms: Alarms) -> None:
    """While the log is failed, refuse every database statement made on behalf of a request under /v1.

    A request's first statement (authentication, usually) raises :class:`AuditLogFailed`,
    answered 503, so nothing that needs an audit entry is done or answered. Work outside
    requests (the checks that may find the log repaired, readiness) is not refused.
    """
    if db in _GUARDED:
        return

    def refuse(conn: Any, cursor: Any, statement: Any, parameters: Any, context: Any, executemany: Any) -> None:
        if alarms.log is not None and SLOT.get() is not None:
            raise AuditLogFailed(alarms.log.problem)

    event.listen(db, "before_cursor_execute", refuse)
    _GUARDED.add(db)
