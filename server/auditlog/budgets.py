"""Budgets against their ledger and the audit log's charges, and the ledger's spend check.

Each budget row's ``spent_micro`` must equal the sum of its ledger entries and the
``after`` of its last ledger entry and of its last audited charge; its ledger entries and
its audited charges must be the same charges, in order, each starting where the previous
one ended (``before`` never goes back), each moving the budget by the entry's loss
(:func:`compare`). The server refuses to spend from a budget that disagrees
(:func:`refuse_disagreeing_budgets`, a check of :func:`civicdp.server.state.ledger.charge`
that the server installs with :func:`install_spend_check`): 503 (:class:`BudgetHeld`),
an alarm that readiness lists.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from sqlalchemy import case, func, or_, select
from sqlmodel import Session

from civicdp.server.auditlog.alarms import Alarm, Alarms, IntegrityFailure, alarms_for, budget_key
from civicdp.server.auditlog.evidence import (
    BudgetRow, Charge, Disagreement, LedgerRow, ReleaseClaim, ScopeKey, charges_of, release_claim,
)
from civicdp.server.auditlog.slots import current_slot
from civicdp.server.state import ledger
from civicdp.server.state.models import Budget, LedgerEntry

logger = logging.getLogger("civicdp.integrity")


# -- budgets -----------------------------------------------------------------------------------


@dataclass
class Fold:
    """One budget's charges folded in order: how many, their total, where they end, the first problem.

    ``sum_after`` (the sum of where each charge ended) fingerprints the sequence, so a
    ledger and an audit trail with the same count and end but other steps still differ.
    """

    count: int = 0
    total: int = 0
    end: int = 0
    sum_after: int = 0
    problem: tuple[str, str] | None = None

    def add(self, before: int, after: int, *, amount: int | None = None, loss: int | None = None,
            cap: int | None = None, where: str = "") -> None:
        index = self.count + 1
        if self.problem is None:
            what = f"charge {index}{where}"
            if before != self.end:
                direction = "went back" if before < self.end else "skipped ahead"
                self.problem = ("do not follow on from each other",
                                f"{what} starts at {before} but the one before ended at {self.end} "
                                f"(the spent amount {direction})")
            elif after <= before or (amount is not None and (amount <= 0 or after - before != amount)):
                self.problem = ("do not follow on from each other",
                                f"{what} moves it from {before} to {after}"
                                + (f" but its amount is {amount}" if amount is not None else ""))
            elif loss is not None and after - before != loss:
                self.problem = ("differ from their entries' losses",
                                f"{what} moves it by {after - before} but its entry's loss is {loss}")
            elif cap is not None and after > cap:
                self.problem = ("went beyond the caps they record", f"{what} ends at {after}, above its cap {cap}")
        self.count += 1
        self.total += after - before if amount is None else amount
        self.end = after
        self.sum_after += after


class AuditFolds:
    """The audited charges of every budget and the release claims, folded from entries in log order.

    In the server this is kept between reconciliations and only entries after ``upto``
    are read again: the stored log is verified against its signed checkpoints, so older
    entries cannot change without the log's alarm (which discards it).
    """

    def __init__(self) -> None:
        self.by_key: dict[ScopeKey, Fold] = {}
        self.orphans: dict[int, Fold] = {}  # charges naming a budget row id that is not in the database
        self.claims: dict[int, list[ReleaseClaim]] = defaultdict(list)
        self.upto = -1
        #: Older claims, of releases up to ``packed_upto``, still compressed (:meth:`unpack` reads them).
        self.packed: bytes | None = None
        self.packed_upto = 0

    def unpack(self) -> dict[int, list[ReleaseClaim]]:
        """Every claim (the packed ones before those folded since), by release id."""
        if self.packed is not None:
            older: dict[int, list[ReleaseClaim]] = defaultdict(list)
            for row in json.loads(zlib.decompress(self.packed)):
                older[row[1]].append(ReleaseClaim(*row))
            for release_id, claims in self.claims.items():
                older[release_id].extend(claims)
            self.claims, self.packed = older, None
        return self.claims

    def add(self, seq: int, data: bytes | str, key_of: dict[int, ScopeKey]) -> None:
        raw = data.encode() if isinstance(data, str) else data
        if b'"ledger":[' not in raw and b'"release_id":' not in raw:
            return
        try:
            entry = json.loads(raw)
        except ValueError:
            return
        for charge in charges_of(seq, entry):
            key = charge.key or key_of.get(charge.budget_id if charge.budget_id is not None else -1)
            if key is None:
                fold = self.orphans.setdefault(charge.budget_id if charge.budget_id is not None else -1, Fold())
            else:
                fold = self.by_key.setdefault(key, Fold())
            fold.add(charge.before_micro, charge.after_micro, loss=charge.loss_micro, cap=charge.cap_micro,
                     where=f" (entry {seq})")
        claim = release_claim(seq, entry)
        if claim is not None:
            self.claims[claim.release_id].append(claim)

    def copy(self) -> AuditFolds:
        copied = AuditFolds()
        copied.by_key = {key: replace(fold) for key, fold in self.by_key.items()}
        copied.orphans = {key: replace(fold) for key, fold in self.orphans.items()}
        copied.claims = defaultdict(list, {rid: list(claims) for rid, claims in self.claims.items()})
        copied.upto = self.upto
        copied.packed, copied.packed_upto = self.packed, self.packed_upto
        return copied


def fold_ledger(rows: Iterable[LedgerRow]) -> dict[int, Fold]:
    folds: dict[int, Fold] = {}
    for row in sorted(rows, key=lambda r: r.id):
        folds.setdefault(row.budget_id, Fold()).add(row.before_micro, row.after_micro, amount=row.amount_micro)
    return folds


def compare(budgets: Iterable[BudgetRow], ledger_folds: dict[int, Fold], audited: AuditFolds) -> list[Disagreement]:
    """Every budget whose spent amount, ledger entries and audited charges do not tell one story."""
    rows = {b.id: b for b in budgets}
    by_key = {b.key: b for b in rows.values()}
    found: list[Disagreement] = []
    for budget_id, fold in sorted(audited.orphans.items()):
        found.append(Disagreement("budget", "audited charges on a budget row that is not in the database",
                                  f"{fold.count} audited charges on budget row {budget_id}, which is not in the "
                                  "database", ("?", "?", "?", "?"), budget_id))
    for budget_id in sorted(set(ledger_folds) - set(rows)):
        found.append(Disagreement("budget", "ledger entries of a budget row that is not in the database",
                                  f"{ledger_folds[budget_id].count} ledger entries charge budget row {budget_id}, "
                                  "which is not in the database", ("?", "?", "?", "?"), budget_id))
    for key in sorted(set(by_key) | set(audited.by_key)):
        budget = by_key.get(key)
        charged = audited.by_key.get(key, Fold())
        problems: list[tuple[str, str]] = []
        if budget is None:
            problems.append(("audited charges on a budget row that is not in the database",
                             f"{charged.count} audited charges ending at {charged.end}, but no budget row"))
        else:
            spent = budget.spent_micro
            own = ledger_folds.get(budget.id, Fold())
            if own.total != spent:
                problems.append(("spent amount differs from the sum of its ledger entries",
                                 f"spent_micro is {spent} but its {own.count} ledger entries add up to {own.total}"))
            if own.end != spent:
                problems.append(("spent amount differs from its last ledger entry",
                                 f"spent_micro is {spent} but its last ledger entry ended at {own.end}"))
            if own.problem is not None:
                problems.append((f"its ledger entries {own.problem[0]}", f"ledger: {own.problem[1]}"))
            if charged.end != spent:
                problems.append(("spent amount differs from its audited charges",
                                 f"spent_micro is {spent} but the audit log's {charged.count} charges end at "
                                 f"{charged.end}"))
            if (own.count, own.end, own.sum_after) != (charged.count, charged.end, charged.sum_after):
                problems.append(("its ledger entries differ from its audited charges",
                                 f"{own.count} ledger entries ending at {own.end} and {charged.count} audited "
                                 f"charges ending at {charged.end}"
                                 + (" (with different steps)" if (own.count, own.end) == (charged.count, charged.end)
                                    else "")))
        if charged.problem is not None:
            problems.append((f"its audited charges {charged.problem[0]}", f"audit log: {charged.problem[1]}"))
        if problems:
            found.append(Disagreement("budget", problems[0][0], "; ".join(d for _, d in problems), key,
                                      budget.id if budget else None))
    return found


def reconcile_budgets(budgets: Iterable[BudgetRow], ledger_rows: Iterable[LedgerRow],
                      charges: Iterable[Charge]) -> list[Disagreement]:
    """:func:`compare` for rows and charges in memory (charges in log order)."""
    budgets = list(budgets)
    key_of = {b.id: b.key for b in budgets}
    audited = AuditFolds()
    for charge in sorted(charges, key=lambda c: c.seq):
        key = charge.key or key_of.get(charge.budget_id if charge.budget_id is not None else -1)
        fold = (audited.by_key.setdefault(key, Fold()) if key is not None
                else audited.orphans.setdefault(charge.budget_id if charge.budget_id is not None else -1, Fold()))
        fold.add(charge.before_micro, charge.after_micro, loss=charge.loss_micro, cap=charge.cap_micro,
                 where=f" (entry {charge.seq})")
    return compare(budgets, fold_ledger(ledger_rows), audited)


def ledger_summaries(session: Session) -> dict[int, Fold]:
    """Each budget row's ledger entries folded in the database (one pass, window functions)."""
    entry = LedgerEntry.__table__.c  # type: ignore[attr-defined]
    previous = func.lag(entry.spent_after_micro, 1, 0).over(partition_by=entry.budget_id, order_by=entry.id)
    newest = func.row_number().over(partition_by=entry.budget_id, order_by=entry.id.desc())
    inner = select(entry.budget_id.label("budget"), entry.amount_micro.label("amount"),
                   entry.spent_before_micro.label("before"), entry.spent_after_micro.label("after"),
                   previous.label("previous"), newest.label("newest")).subquery()
    broken = case((or_(inner.c.before != inner.c.previous, inner.c.amount <= 0,
                       inner.c.after - inner.c.before != inner.c.amount), 1), else_=0)
    rows = session.execute(select(inner.c.budget, func.count(), func.sum(inner.c.amount), func.sum(inner.c.after),
                                  func.sum(broken), func.max(case((inner.c.newest == 1, inner.c.after))))
                           .group_by(inner.c.budget))
    folds = {}
    for budget_id, count, total, sum_after, bad, end in rows:
        fold = Fold(int(count), int(total or 0), int(end or 0), int(sum_after or 0))
        if bad:
            fold.problem = ("do not follow on from each other",
                            f"{int(bad)} of its {int(count)} ledger entries do not start where the one before "
                            "ended or do not move it by their amount")
        folds[int(budget_id)] = fold
    return folds


# -- in the server: the spend check ------------------------------------------------------------


class BudgetHeld(IntegrityFailure):
    """A charge from a budget that failed reconciliation: nothing was charged."""

    def __init__(self, dataset: str, scope: str, period: str, problem: str) -> None:
        super().__init__(f"the {scope} budget of dataset {dataset} for {period} failed its integrity check "
                         f"({problem}); nothing was charged, and nothing is charged to it until its spent amount "
                         "agrees with its ledger and the audit log again (GET /v1/ready lists held budgets)")


def _hold(alarms: Alarms, found: Disagreement) -> Alarm:
    with alarms.lock:
        alarm = alarms.budgets.get(found.key)  # type: ignore[arg-type]
        if alarm is None:
            alarm = Alarm(found.problem, found.detail, datetime.now(timezone.utc), found.info)
            alarms.budgets[found.key] = alarm  # type: ignore[index]
            logger.critical("INTEGRITY ALARM: %s; no charge is made to it", found.line())
            new = True
        else:
            new = False
    if new:
        alarms.share(budget_key(found.key), alarm)  # type: ignore[arg-type]
    return alarm


def refuse_disagreeing_budgets(session: Session, dataset: str, budgets: list[ledger.BudgetStatus]) -> None:
    """The ledger's spend check: refuse a held budget, or one whose spent amount is not its last entry's.

    One statement reads each row's ``spent_micro`` and the ``after`` of its last ledger
    entry together (one snapshot), before the charge updates anything.
    """
    alarms = alarms_for(session.get_bind())
    for status in budgets:
        held = alarms.budgets.get((dataset, status.scope, status.subject, status.period))
        if held is not None:
            _refuse(BudgetHeld(dataset, status.scope, status.period, held.problem))
    ids = [s.budget_id for s in budgets if s.budget_id is not None]
    if not ids:
        return
    last = (select(LedgerEntry.spent_after_micro).where(LedgerEntry.budget_id == Budget.id)
            .order_by(LedgerEntry.id.desc()).limit(1).correlate(Budget).scalar_subquery())  # type: ignore[union-attr]
    rows = session.execute(select(Budget.id, Budget.scope, Budget.subject, Budget.period, Budget.spent_micro, last)
                           .where(Budget.id.in_(ids))).all()  # type: ignore[union-attr]
    for budget_id, scope, subject, period, spent, after in rows:
        if spent != (after or 0):
            found = Disagreement("budget", "spent amount differs from its last ledger entry",
                                 f"spent_micro is {spent} but its last ledger entry ended at {after or 0} "
                                 "(found when charging)", (dataset, scope, subject, period), budget_id)
            _refuse(BudgetHeld(dataset, scope, period, _hold(alarms, found).problem))


def _refuse(failure: IntegrityFailure) -> None:
    slot = current_slot()
    if slot is not None:
        slot.reason = str(failure.detail)
    raise failure


def install_spend_check() -> None:
    """Make :func:`civicdp.server.state.ledger.charge` refuse what :func:`refuse_disagreeing_budgets` refuses."""
    if refuse_disagreeing_budgets not in ledger.SPEND_CHECKS:
        ledger.SPEND_CHECKS.append(refuse_disagreeing_budgets)
