"""Charged computations: the state between paying for a question and releasing its answer.

A fresh query is paid for before any data is read (DESIGN.md's request flow): one
transaction claims the question (a :class:`~civicdp.server.state.models.Computation` row, unique per
dataset, version and query), charges every budget scope and writes the audit entry.
Only after that commit is the data read. Then either the release is stored (and the
claim removed, in one transaction with its own audit entry), or the failure is
recorded against the charge, which stays: the attempt read data, so its outcome —
success or failure — is never free. A claim left by a crash is *abandoned* (and
audited) once it is older than the computation timeout; its charge stays too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session, select

from civicdp.server.state import ledger
from civicdp.server.auditlog.append import record
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import session_scope
from civicdp.server.state.models import Budget, Computation, LedgerEntry, Release

#: The one text a failed computation is answered with, whatever went wrong with the data.
FAILED_TEXT = ("the answer could not be computed from the dataset's files; this query's privacy loss "
               "stays charged, because the attempt read the data")


@dataclass(frozen=True)
class Claim:
    """A charged question: its computation row and the ledger entries of its charge."""

    id: int
    ledger_ids: tuple[int, ...]
    changes: tuple[dict[str, Any], ...]


def claim(session: Session, caller: Caller, dataset: str, version: str, query_hash: str, loss_micro: int,
          scopes: list[ledger.Scope], defaults: ledger.CapDefaults) -> Claim:
    """Claim the question and charge it, inside ``session``'s transaction.

    Raises :class:`ledger.BudgetRefused` when a scope lacks room and
    ``sqlalchemy.exc.IntegrityError`` (at flush) when the same question is already
    being computed: nothing is charged then.
    """
    row = Computation(dataset=dataset, dataset_version=version, query_hash=query_hash,
                      account_id=caller.account_id, loss_micro=loss_micro)
    session.add(row)
    session.flush()
    charges = ledger.charge(session, dataset, scopes, loss_micro, defaults=defaults, account_id=caller.account_id)
    ids = tuple(int(c.id) for c in charges if c.id is not None)
    row.ledger_ids = json.dumps(list(ids))
    session.add(row)
    return Claim(int(row.id or 0), ids, tuple(ledger_changes(session, charges)))


def running(session: Session, dataset: str, version: str, query_hash: str) -> Computation | None:
    return session.exec(select(Computation).where(
        Computation.dataset == dataset, Computation.dataset_version == version,
        Computation.query_hash == query_hash)).first()


def complete(session: Session, claimed: Claim, release: Release) -> None:
    """Link the charge to its stored release and remove the claim (in the releasing transaction)."""
    if claimed.ledger_ids:
        session.execute(update(LedgerEntry).where(LedgerEntry.id.in_(claimed.ledger_ids))  # type: ignore[union-attr]
                        .values(release_id=release.id))
    session.execute(delete(Computation).where(Computation.id == claimed.id))  # type: ignore[arg-type]


def fail(db: DbEngine, caller: Caller, claimed: Claim, dataset: str, version: str, query_hash: str) -> None:
    """Record a failed computation against its charge, which stays; the question may be asked again."""
    with session_scope(db) as session:
        session.execute(delete(Computation).where(Computation.id == claimed.id))  # type: ignore[arg-type]
        record(session, caller, "query.failed", dataset, "failed", dataset=dataset, dataset_version=version,
               computation_id=claimed.id, query_hash=query_hash, reason=FAILED_TEXT, loss_micro=0)


def abandon_stale(db: DbEngine, older_than: timedelta, now: datetime | None = None,
                  only: Computation | None = None) -> int:
    """Abandon claims older than ``older_than`` (a crash left them): audited, charges kept.

    Returns how many were abandoned. ``only`` limits it to one claim (a waiter that
    found the computation it waited for stale).
    """
    cutoff = (now or datetime.now(timezone.utc)) - older_than
    abandoned = 0
    with session_scope(db) as session:
        query = select(Computation)
        if only is not None:
            query = query.where(Computation.id == only.id)
        # Compared in Python: SQLite keeps datetimes as text without their zone. Claims are few.
        for row in [r for r in session.exec(query).all() if _utc(r.started_at) < cutoff]:
            gone = session.execute(delete(Computation).where(Computation.id == row.id))  # type: ignore[arg-type]
            if getattr(gone, "rowcount", 0) != 1:
                continue  # another process abandoned it first
            record(session, None, "query.abandoned", row.dataset, "failed", dataset=row.dataset,
                   dataset_version=row.dataset_version, computation_id=row.id, query_hash=row.query_hash,
                   reason="the computation did not finish (the server stopped while computing); "
                          "its privacy loss stays charged", loss_micro=0)
            abandoned += 1
    return abandoned


def _utc(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def ledger_changes(session: Session, charges: list[LedgerEntry]) -> list[dict[str, Any]]:
    """Each charged scope with its spending before and after, for the audit entry."""
    changes = []
    for charge in charges:
        budget = session.get(Budget, charge.budget_id)
        changes.append({"scope": budget.scope if budget else "?", "subject": budget.subject if budget else "?",
                        "period": budget.period if budget else "?", "cap_micro": budget.cap_micro if budget else 0,
                        "before_micro": charge.spent_before_micro, "after_micro": charge.spent_after_micro})
    return changes
