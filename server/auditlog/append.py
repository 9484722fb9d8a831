"""Appending entries to the audit log, inside the transaction of what they record.

Every use of the server leaves exactly one entry. Code that changes state or spends
budget calls :func:`record` inside its own transaction, so the entry commits or rolls
back with the change (a query's entry is in the transaction that charges the ledger
and stores the release). Every other request under ``/v1`` — reads, refusals, invalid
input, failed authentication — gets its entry from :mod:`civicdp.server.http.request_log` as the
response starts, before anything is sent (:func:`record_request`). A request knows
whether it was recorded through its :class:`~civicdp.server.auditlog.slots.AuditSlot`,
unmarked again if the recording transaction rolls back.

Nothing is appended while the stored log fails its integrity check (:class:`AuditLogFailed`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import BigInteger, bindparam, event, insert, update
from sqlalchemy.engine import Connection, Engine as DbEngine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from civicdp.server.auditlog.alarms import AuditLogFailed, alarms_for
from civicdp.server.auditlog.canonical import entry_values
from civicdp.server.auditlog.slots import SLOT, AuditSlot
from civicdp.server.auditlog.tree_store import ensure_tree
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import session_scope
from civicdp.server.state.models import AuditEntry, AuditHead

_HEAD = AuditHead.__table__  # type: ignore[attr-defined]
_BUMP = update(_HEAD).where(_HEAD.c.id == 1).values(size=_HEAD.c.size + 1).returning(_HEAD.c.size)
_BUMP_BY = update(_HEAD).where(_HEAD.c.id == 1).values(size=_HEAD.c.size + bindparam("count", type_=BigInteger)
                                                      ).returning(_HEAD.c.size)
_INSERT = insert(AuditEntry.__table__)  # type: ignore[attr-defined]


def append(session: Session, *, caller: Caller | None, action: str, target: str, decision: str,
           rule: list[str] | None = None, roles: list[str] | None = None, request: dict[str, Any] | None = None,
           detail: dict[str, Any] | None = None, dataset: str | None = None) -> AuditEntry:
    """Append one entry inside the caller's transaction and return it (numbered, hashed).

    Raises :class:`AuditLogFailed` while the stored log fails its integrity check: nothing
    that needs an entry (a charge, a change, an answer) happens then.
    """
    failed = alarms_for(session.get_bind()).log
    if failed is not None:
        raise AuditLogFailed(failed.problem)
    connection = session.connection()  # Core statements built once: no ORM work per entry
    size = connection.execute(_BUMP).scalar_one()
    values = entry_values(size - 1, datetime.now(timezone.utc), caller=caller, action=action, target=target,
                          decision=decision, rule=rule, roles=roles, request=request, detail=detail,
                          dataset=dataset)
    connection.execute(_INSERT, values)
    return AuditEntry(**values)


def append_many(connection: Connection, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append several entries (each the keyword arguments of :func:`entry_values`) with one number bump.

    Inside the transaction of ``connection``, like :func:`append`; the entries get
    consecutive numbers in the order given. Returns their stored rows.
    """
    if not entries:
        return []
    failed = alarms_for(connection.engine).log
    if failed is not None:
        raise AuditLogFailed(failed.problem)
    size = connection.execute(_BUMP_BY, {"count": len(entries)}).scalar_one()
    now = datetime.now(timezone.utc)
    first = size - len(entries)
    rows = [entry_values(first + i, now, **entry) for i, entry in enumerate(entries)]
    connection.execute(_INSERT, rows)
    return rows


def record(session: Session, caller: Caller | None, action: str, target: str, decision: str = "allowed",
           **detail: Any) -> AuditEntry:
    """Record a use, change or refusal in the audit log, inside ``session``'s transaction.

    The request's slot (if any) adds the method and path, the caller's roles and the
    policy rule that decided; it counts as recorded once this transaction commits.
    """
    slot = SLOT.get()
    rule = detail.pop("rule", None)
    request = None
    roles: list[str] = []
    if slot is not None:
        rule = rule if rule is not None else slot.rule
        request = {"method": slot.method, "path": slot.path}
        roles = slot.roles if caller is not None and slot.caller == caller else []
        # Counted as recorded now, and forgotten again if this transaction rolls back (a
        # route's session may commit only after the response has started).
        slot.recorded = True
        session.info.setdefault("audit_slots", []).append(slot)
    dataset = detail.get("dataset") or (target if action.startswith(("query.", "dataset.")) else None)
    return append(session, caller=caller, action=action, target=target, decision=decision, rule=rule,
                  roles=roles, request=request, detail=detail, dataset=dataset)


@event.listens_for(Session, "after_commit")
def _committed(session: Session) -> None:
    session.info.pop("audit_slots", None)


@event.listens_for(Session, "after_rollback")
def _rolled_back(session: Session) -> None:
    for slot in session.info.pop("audit_slots", []):
        slot.recorded = False


DECISIONS = {401: "unauthenticated", 403: "denied", 404: "not_found", 409: "refused", 422: "invalid"}


def record_request(db: DbEngine, slot: AuditSlot, status: int) -> None:
    """The entry of a request that recorded nothing itself (a read, a refusal, an error).

    While the log is failed nothing is written: refusals and errors leave unrecorded (they
    are counted and the count is logged when the log recovers); an answer (a status below
    400) that would leave without its entry is refused by raising.
    """
    alarms = alarms_for(db)
    if alarms.log is not None:
        alarms.count_refused()
        slot.recorded = True
        if status < 400:
            raise AuditLogFailed(alarms.log.problem)
        return
    decision = "allowed" if status < 400 else DECISIONS.get(status, "error" if status >= 500 else "refused")
    detail: dict[str, Any] = {**slot.detail, "status": status}
    if slot.reason:
        detail["reason"] = slot.reason
    with session_scope(db) as session:
        append(session, caller=slot.caller, action=slot.action or "http.request", target=slot.target or slot.path,
               decision=decision, rule=slot.rule, roles=slot.roles,
               request={"method": slot.method, "path": slot.path}, detail=detail,
               dataset=slot.detail.get("dataset"))
    slot.recorded = True


def ensure_head(db: DbEngine) -> None:
    """Create the log's head row once (concurrent starts: one insert wins)."""
    with session_scope(db) as session:
        if session.get(AuditHead, 1) is None:
            try:
                with session.begin_nested():
                    session.execute(insert(AuditHead).values(id=1, size=0))
            except IntegrityError:
                pass
    ensure_tree(db)
