"""Each budget row's ledger entries folded, kept between reconciliations so a start folds only the new ones.

:func:`civicdp.server.auditlog.budgets.ledger_summaries` folds the whole ledger in one
statement (window functions); :class:`LedgerFolds` holds the same folds up to a ledger
entry id (``through``), extends them with the entries after it, and tells cheaply whether
the entries up to it still add up to what was folded (one pass of sums, :meth:`changed`): a
row deleted, an amount, a start or an end changed, or a row moved to another budget. Edits
made to keep every sum the same are found by the next full fold (every periodic check).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import case, func, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from civicdp.server.auditlog.budgets import Fold
from civicdp.server.state.models import LedgerEntry


def broken(bad: int, count: int) -> tuple[str, str]:
    return ("do not follow on from each other",
            f"{bad} of its {count} ledger entries do not start where the one before ended or do not move it by "
            "their amount")


@dataclass
class LedgerFolds:
    """Per budget row: its ledger entries up to id ``through`` folded, and how many of them are broken."""

    folds: dict[int, Fold] = field(default_factory=dict)
    bad: dict[int, int] = field(default_factory=dict)
    through: int = 0
    sums: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0])  # of the entries up to ``through``: see _SUMS

    @classmethod
    def full(cls, session: Session) -> LedgerFolds:
        """The whole ledger folded in the database (one pass, window functions), as ``ledger_summaries`` does."""
        entry = LedgerEntry.__table__.c  # type: ignore[attr-defined]
        previous = func.lag(entry.spent_after_micro, 1, 0).over(partition_by=entry.budget_id, order_by=entry.id)
        newest = func.row_number().over(partition_by=entry.budget_id, order_by=entry.id.desc())
        inner = select(entry.id.label("id"), entry.budget_id.label("budget"), entry.amount_micro.label("amount"),
                       entry.spent_before_micro.label("before"), entry.spent_after_micro.label("after"),
                       previous.label("previous"), newest.label("newest")).subquery()
        wrong = case((or_(inner.c.before != inner.c.previous, inner.c.amount <= 0,
                          inner.c.after - inner.c.before != inner.c.amount), 1), else_=0)
        rows = session.execute(select(inner.c.budget, func.count(), func.sum(inner.c.amount), func.sum(inner.c.after),
                                      func.sum(wrong), func.max(case((inner.c.newest == 1, inner.c.after))),
                                      func.max(inner.c.id)).group_by(inner.c.budget))
        folded = cls()
        for budget_id, count, total, sum_after, bad, end, last in rows:
            folded.folds[int(budget_id)] = Fold(int(count), int(total or 0), int(end or 0), int(sum_after or 0))
            folded.bad[int(budget_id)] = int(bad or 0)
            folded.through = max(folded.through, int(last))
        folded.sums = _sums(session, folded.through)
        return folded

    def changed(self, session: Session) -> bool:
        """Do the ledger entries up to ``through`` no longer add up to what was folded (one pass of sums)?"""
        try:
            return _sums(session, self.through) != self.sums
        except SQLAlchemyError:  # e.g. a sum beyond 64 bits on SQLite: fold everything
            return True

    def extend(self, session: Session) -> LedgerFolds:
        """A copy with the ledger entries after ``through`` folded in (each row checked as the full fold checks it)."""
        out = LedgerFolds({b: replace(f) for b, f in self.folds.items()}, dict(self.bad), self.through, list(self.sums))
        for row_id, budget_id, amount, before, after in session.execute(
                select(LedgerEntry.id, LedgerEntry.budget_id, LedgerEntry.amount_micro, LedgerEntry.spent_before_micro,
                       LedgerEntry.spent_after_micro).where(LedgerEntry.id > self.through).order_by(LedgerEntry.id)):
            fold = out.folds.setdefault(budget_id, Fold())
            if before != fold.end or amount <= 0 or after - before != amount:
                out.bad[budget_id] = out.bad.get(budget_id, 0) + 1
            fold.count += 1
            fold.total += amount
            fold.end = after
            fold.sum_after += after
            out.through = max(out.through, row_id)
            for i, value in enumerate((1, amount, before, after, budget_id * amount)):
                out.sums[i] += value
        return out

    def summaries(self) -> dict[int, Fold]:
        """The folds as :func:`ledger_summaries` gives them (a broken ledger says how many entries are)."""
        return {b: replace(f, problem=broken(self.bad[b], f.count) if self.bad.get(b) else None)
                for b, f in self.folds.items()}

    def to_state(self) -> list[Any]:
        return [self.through, self.sums, [[b, f.count, f.total, f.end, f.sum_after, self.bad.get(b, 0)]
                                          for b, f in self.folds.items()]]

    @classmethod
    def from_state(cls, state: list[Any]) -> LedgerFolds:
        through, sums, rows = state
        return cls({int(b): Fold(n, t, e, s) for b, n, t, e, s, _ in rows},
                   {int(b): bad for b, _, _, _, _, bad in rows if bad}, int(through), [int(s) for s in sums])


def _sums(session: Session, through: int) -> list[int]:
    """Of the ledger entries up to id ``through``: how many, and the sums of their amounts, starts, ends and
    amounts weighted by budget row (a row moved to another budget changes that one)."""
    entry = LedgerEntry.__table__.c  # type: ignore[attr-defined]
    row = session.execute(select(func.count(), func.sum(entry.amount_micro), func.sum(entry.spent_before_micro),
                                 func.sum(entry.spent_after_micro), func.sum(entry.budget_id * entry.amount_micro))
                          .where(entry.id <= through)).one()
    return [int(value or 0) for value in row]
