"""The integrity alarms of a state database, and the refusals they cause.

A failed check is an *alarm* (:class:`Alarms`): while the stored log fails its check it
is frozen — nothing is appended, no checkpoint signed, every request that needs an entry
is answered 503 (:class:`AuditLogFailed`) — until it verifies again. Budgets that failed
reconciliation and stored answers that failed their check are held alone
(:mod:`civicdp.server.auditlog.reconcile`).
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Engine as DbEngine
from starlette.exceptions import HTTPException

from civicdp.server.auditlog.canonical import plain
from civicdp.server.auditlog.slots import SLOT

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

    def fail_log(self, problem: str) -> Alarm:
        with self.lock:
            if self.log is None:
                self.log = Alarm(problem, problem, datetime.now(timezone.utc))
                self.refused = 0
                self.evidence = self.kept = None
                logger.critical("AUDIT LOG INTEGRITY ALARM: %s. Requests that need an audit entry are refused "
                                "until the stored log verifies again.", problem)
            return self.log

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
