"""The ledger as oversight reads it: every budget row, and each charge over time.

Read-only views for the budgets and audit routes and the command line; the charge that
writes them is :func:`civicdp.server.state.ledger.charge`. A charge's history row shows the
cap in force when it was charged, as recorded with it
(:class:`~civicdp.server.state.ledger_models.LedgerEntryCap`), never the row's cap today: a
steward may have changed it since. A charge made before caps were recorded with charges
shows the cap its audit entry states (a query's entry lists each budget it moved, with its
cap), or None when its entry states none (feed and monitor charges).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlmodel import Session

from civicdp.server.state.budget_scopes import LIFETIME_PERIOD, SCOPE_KINDS, BudgetStatus, accounting_of, period_of
from civicdp.server.state.ledger_models import LedgerEntryCap
from civicdp.server.state.models import Account, AuditEntry, Budget, LedgerEntry

#: What identifies a charge in an audit entry's ``ledger`` list: its budget row and the move.
_Move = tuple[str, str, str, str, int, int]  # dataset, scope, subject, period, before, after


def budgets_for(session: Session, dataset: str | None = None, subject: str | None = None, *,
                now: datetime | None = None) -> list[BudgetStatus]:
    """Budget rows with what remains, optionally for one dataset and/or one subject.

    With ``now``, only the rows in force at that time: its month and lifetime.
    """
    query = select(Budget.id, Budget.dataset, Budget.scope, Budget.subject, Budget.period,
                   Budget.cap_micro, Budget.spent_micro)
    if dataset is not None:
        query = query.where(Budget.dataset == dataset)
    if subject is not None:
        query = query.where(Budget.subject == subject)
    if now is not None:
        query = query.where(Budget.period.in_([period_of(now), LIFETIME_PERIOD]))
    order = {kind: i for i, kind in enumerate(SCOPE_KINDS)}
    rows = [BudgetStatus(*row, accounting_of(session, row[1])) for row in session.execute(query).all()]
    return sorted(rows, key=lambda b: (b.dataset, order.get(b.scope, len(SCOPE_KINDS)), b.subject, b.period))


def charge_history(session: Session, dataset: str | None = None, *, limit: int = 1000) -> list[dict[str, Any]]:
    """The first ``limit`` charges, oldest first, optionally on one dataset.

    Each: its time, budget row (dataset, scope, subject, period), amount, spending before
    and after, the cap in force when it was charged (``cap_micro``, in the ledger's unit),
    the release it paid for and the account that asked.
    """
    query = (select(LedgerEntry.created_at, Budget.dataset, Budget.scope, Budget.subject, Budget.period,
                    LedgerEntry.amount_micro, LedgerEntry.spent_before_micro, LedgerEntry.spent_after_micro,
                    LedgerEntryCap.cap_micro, LedgerEntry.release_id, Account.name)
             .join(Budget, Budget.id == LedgerEntry.budget_id)  # type: ignore[arg-type]
             .join(Account, Account.id == LedgerEntry.account_id, isouter=True)  # type: ignore[arg-type]
             .join(LedgerEntryCap, LedgerEntryCap.ledger_entry_id == LedgerEntry.id,  # type: ignore[arg-type]
                   isouter=True))
    if dataset is not None:
        query = query.where(Budget.dataset == dataset)
    rows = session.execute(query.order_by(LedgerEntry.id).limit(limit)).all()  # type: ignore[arg-type]
    unrecorded = {tuple(row[1:5]) + (row.spent_before_micro, row.spent_after_micro)
                  for row in rows if row.cap_micro is None}
    stated = _caps_in_audit_entries(session, unrecorded) if unrecorded else {}
    return [
        {"time": row.created_at, "dataset": row.dataset, "scope": row.scope, "subject": row.subject,
         "period": row.period, "amount_micro": row.amount_micro, "before_micro": row.spent_before_micro,
         "after_micro": row.spent_after_micro,
         "cap_micro": row.cap_micro if row.cap_micro is not None else stated.get(
             (row.dataset, row.scope, row.subject, row.period, row.spent_before_micro, row.spent_after_micro)),
         "release_id": row.release_id, "account": row.name}
        for row in rows]


def _caps_in_audit_entries(session: Session, moves: set[_Move]) -> dict[_Move, int]:
    """The caps that allowed audit entries state for ``moves`` (charges made before caps were recorded).

    A budget row's spending only grows, so its row and its spending before and after
    name one charge.
    """
    found: dict[_Move, int] = {}
    entries = session.execute(
        select(AuditEntry.dataset, AuditEntry.entry_json)
        .where(AuditEntry.dataset.in_({move[0] for move in moves}),  # type: ignore[union-attr]
               AuditEntry.decision == "allowed",
               AuditEntry.entry_json.like('%"cap_micro"%'))  # type: ignore[attr-defined]
        .order_by(AuditEntry.seq))  # type: ignore[arg-type]
    for dataset, text in entries:
        detail = json.loads(text).get("detail")
        changes = detail.get("ledger") if isinstance(detail, dict) else None
        for item in changes if isinstance(changes, list) else []:
            if not isinstance(item, dict) or not isinstance(item.get("cap_micro"), int):
                continue
            move = (dataset, item.get("scope"), item.get("subject"), item.get("period"), item.get("before_micro"),
                    item.get("after_micro"))
            if move in moves:
                found[move] = item["cap_micro"]  # type: ignore[index]
    return found
