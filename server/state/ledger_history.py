"""The ledger as oversight reads it: every budget row, and each charge over time.

Read-only views for the budgets and audit routes and the command line; the charge that
writes them is :func:`civicdp.server.state.ledger.charge`.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlmodel import Session

from civicdp.server.state.budget_scopes import LIFETIME_PERIOD, SCOPE_KINDS, BudgetStatus, accounting_of, period_of
from civicdp.server.state.models import Budget


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
