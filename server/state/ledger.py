"""The budget ledger: privacy loss charged in SQL, so no answer ever overspends a cap.

Every released answer is charged to four scopes at once — the analyst's allowance on
the dataset this month, the analyst's agency's allowance this month, the dataset's
allowance this month, and the dataset's lifetime cap that protects the people in it
across all months, analysts and feeds. All four must have room, and the charge is
made with one conditional ``UPDATE ... WHERE spent + amount <= cap`` per scope inside
the caller's database transaction, before the answer leaves. The database, not
process memory, holds the state, so the guarantee survives restarts and holds across
threads and several server processes (OpenDP's in-memory ``Context`` does not; see
GOVERNANCE.md, "Budget ledger"). Amounts are integers end to end — micro-epsilon on a
pure-DP dataset, nano-rho on a zCDP one (:mod:`civicdp.privacy.accounting`): ``0.1 + 0.1 + 0.1``
is exactly ``0.3`` and a float never enters a comparison. Caps are set in epsilon (the
number people agree on) and converted once, rounding down, into the dataset's unit when
a budget row is opened; a feed's allocation (``feed`` scope) is already in that unit.
Scopes, periods and caps are :mod:`civicdp.server.state.budget_scopes` (their names are
also reachable here, the vocabulary a charge is made in); budgets and charges as oversight
reads them, :mod:`civicdp.server.state.ledger_history`.

Usage (the request handler)::

    scopes = scopes_for(dataset, account.name, account.agency, now)
    precheck(session, dataset, scopes, amount, defaults=caps)      # optional early refusal
    with session_scope(engine) as session:                          # ONE transaction
        ... claim the question ...
        charge(session, dataset, scopes, amount, defaults=caps,
               account_id=account.id)                               # raises BudgetRefused
        ... write the audit entry ...
    # only now may the data be read (server/services/query_service.py, server/services/computations.py)
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Any, Callable

from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from civicdp.privacy.accounting import PURE, Accounting
from civicdp.privacy.errors import BudgetExhausted, InvalidLoss
from civicdp.privacy.loss import MICRO, PrivacyLoss
from civicdp.server.state.budget_scopes import (
    AGENCY, ANALYST, ANY, DATASET, FEED, KINDS, LIFETIME, LIFETIME_PERIOD, SCOPE_KINDS, BudgetStatus,
    CapDefaults, Scope, accounting_in, accounting_of, apply_cap, check_scopes, in_unit, period_of, renews_at,
    resolve_caps, scopes_for,
)
from civicdp.server.state.ledger_models import LedgerEntryCap
from civicdp.server.state.models import Budget, LedgerEntry

__all__ = [
    # the charge, its refusal and its amounts
    "MAX_CHARGE_MICRO", "SPEND_CHECKS", "BudgetRefused", "charge", "precheck", "statuses", "to_micro",
    "validate_amount",
    # the vocabulary of scopes and caps a charge is made in (civicdp.server.state.budget_scopes)
    "AGENCY", "ANALYST", "ANY", "DATASET", "FEED", "KINDS", "LIFETIME", "LIFETIME_PERIOD", "SCOPE_KINDS",
    "BudgetStatus", "CapDefaults", "Scope", "accounting_in", "accounting_of", "apply_cap", "in_unit",
    "period_of", "renews_at", "scopes_for",
]

#: Largest single charge accepted (one million epsilon): anything above is a bug or an attack.
MAX_CHARGE_MICRO = 10**12


# -- refusals -----------------------------------------------------------------------------


def _epsilon(micro: int) -> float:
    """Display value of a micro amount (never used in a comparison)."""
    return float(Fraction(micro, MICRO))


def _show(micro: int) -> str:
    return f"{_epsilon(micro):.6g}"


class BudgetRefused(BudgetExhausted):
    """A charge that does not fit one of its scopes; nothing was charged.

    Carries the scope (``scope_kind``, ``subject``, ``period``, ``dataset``), the
    amounts in micro-epsilon (``cap_micro``, ``spent_micro``, ``remaining_micro``,
    ``requested_micro``) and in epsilon (``*_epsilon`` floats, for display), and
    ``renews_at`` (start of the next month in UTC, None for the lifetime scope).
    A subclass of :class:`civicdp.privacy.errors.BudgetExhausted`, so one HTTP handler can
    map both.
    """

    def __init__(self, status: BudgetStatus, requested_micro: int) -> None:
        remaining = status.remaining_micro
        super().__init__(requested=Fraction(requested_micro, MICRO),
                         remaining=Fraction(remaining, MICRO), scope=status.scope)
        self.dataset = status.dataset
        self.scope_kind = status.scope
        self.subject = status.subject
        self.period = status.period
        self.cap_micro = status.cap_micro
        self.spent_micro = status.spent_micro
        self.remaining_micro = remaining
        self.requested_micro = requested_micro
        self.accounting = status.accounting
        self.cap_epsilon = status.accounting.shown(status.cap_micro)["epsilon"]
        self.spent_epsilon = status.accounting.shown(status.spent_micro)["epsilon"]
        self.remaining_epsilon = status.accounting.shown(remaining)["epsilon"]
        self.requested_epsilon = status.accounting.shown(requested_micro)["epsilon"]
        self.renews_at = status.renews_at
        self.message = self._message(status)
        self.args = (self.message,)

    def _message(self, status: BudgetStatus) -> str:
        label = {
            ANALYST: "analyst budget",
            AGENCY: f"budget of agency {status.subject}",
            DATASET: "monthly budget",
            LIFETIME: "lifetime budget",
            FEED: f"allocation of feed {status.subject}",
        }[status.scope]
        where = f"for dataset {status.dataset}"
        if status.period != LIFETIME_PERIOD:
            where += f" in {status.period}"
        renewal = (f"It renews on {self.renews_at:%Y-%m-%d}." if self.renews_at
                   else "It does not renew.")
        if self.accounting.zcdp:
            left, needed = (self.accounting.shown(a) for a in (self.remaining_micro, self.requested_micro))
            return (f"Cannot answer without exceeding the remaining {label} of rho {left['rho']:.6g} "
                    f"(epsilon {left['epsilon']:.6g} at delta {self.accounting.delta:g}) {where}; this query "
                    f"needs rho {needed['rho']:.6g} (epsilon {needed['epsilon']:.6g}). {renewal}")
        return (f"Cannot answer without exceeding the remaining {label} of epsilon "
                f"{_show(self.remaining_micro)} {where}; this query needs "
                f"{_show(self.requested_micro)}. {renewal}")

    def __str__(self) -> str:
        return self.message

    def as_dict(self) -> dict[str, Any]:
        """JSON form for the HTTP error body."""
        return {
            "error": "budget_refused", "message": self.message, "dataset": self.dataset,
            "scope": self.scope_kind, "subject": self.subject, "period": self.period,
            "cap_epsilon": self.cap_epsilon, "spent_epsilon": self.spent_epsilon,
            "remaining_epsilon": self.remaining_epsilon, "requested_epsilon": self.requested_epsilon,
            "cap_micro": self.cap_micro, "spent_micro": self.spent_micro,
            "remaining_micro": self.remaining_micro, "requested_micro": self.requested_micro,
            "renews_at": self.renews_at.isoformat() if self.renews_at else None,
        }


# -- amounts ------------------------------------------------------------------------------


def to_micro(loss: PrivacyLoss, accounting: Accounting = PURE) -> int:
    """The ledger amount of ``loss`` in ``accounting``'s unit, rounded up."""
    if not isinstance(loss, PrivacyLoss):
        raise InvalidLoss(f"expected a PrivacyLoss, got {type(loss).__name__}", value=loss)
    return accounting.charge_of(loss)


def validate_amount(amount_micro: object) -> int:
    """``amount_micro`` as an int in ``1..MAX_CHARGE_MICRO``, or :class:`InvalidLoss`.

    Only integers are accepted: a bool is not an amount (``True`` would charge 1),
    floats are refused even when finite (the ledger never rounds), and a negative or
    zero charge would let a caller raise what remains (a bug seen in a public DP
    library).
    """
    if isinstance(amount_micro, bool) or not isinstance(amount_micro, numbers.Integral):
        if isinstance(amount_micro, float) and not math.isfinite(amount_micro):
            raise InvalidLoss(f"a charge must be finite, got {amount_micro}", value=amount_micro)
        raise InvalidLoss(f"a charge must be an integer number of micro-epsilon, got "
                          f"{type(amount_micro).__name__} {amount_micro!r}", value=amount_micro)
    amount = int(amount_micro)
    if amount <= 0:
        raise InvalidLoss(f"a charge must be greater than 0, got {amount}", value=amount_micro)
    if amount > MAX_CHARGE_MICRO:
        raise InvalidLoss(f"a charge of {amount} micro-epsilon is above the largest accepted "
                          f"({MAX_CHARGE_MICRO})", value=amount_micro)
    return amount


# -- budget rows --------------------------------------------------------------------------


def _key_filter(dataset: str, scopes: list[Scope]) -> Any:
    return and_(Budget.dataset == dataset, or_(*(
        and_(Budget.scope == s.kind, Budget.subject == s.subject, Budget.period == s.period)
        for s in scopes
    )))


def _existing(session: Session, dataset: str, scopes: list[Scope]) -> dict[Scope, BudgetStatus]:
    # Core columns, not ORM objects: the charge updates rows behind the ORM's back, so
    # identity-mapped Budget objects could show stale amounts.
    rows = session.execute(
        select(Budget.id, Budget.scope, Budget.subject, Budget.period, Budget.cap_micro,
               Budget.spent_micro).where(_key_filter(dataset, scopes))
    ).all()
    accounting = accounting_of(session, dataset)
    return {
        Scope(kind, subject, period): BudgetStatus(id_, dataset, kind, subject, period, cap, spent, accounting)
        for id_, kind, subject, period, cap, spent in rows
    }


def _insert_ignoring_duplicates(session: Session, values: list[dict[str, Any]]) -> None:
    """INSERT budget rows; a row another transaction inserted first is left alone."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        statement = postgresql.insert(Budget).on_conflict_do_nothing(
            index_elements=["dataset", "scope", "subject", "period"])
    elif dialect == "sqlite":
        # SQLite's upsert form of INSERT OR IGNORE, narrower: it ignores only a
        # uniqueness conflict, not NOT NULL or foreign-key failures.
        statement = sqlite.insert(Budget).on_conflict_do_nothing(
            index_elements=["dataset", "scope", "subject", "period"])
    else:
        raise NotImplementedError(f"the budget ledger supports PostgreSQL and SQLite, not {dialect}")
    # One row per statement, in a fixed order: on PostgreSQL an insert that meets a
    # concurrent uncommitted insert of the same key waits for it, and a fixed order
    # means two transactions never wait on each other's rows in a cycle.
    for row in values:
        session.execute(statement.values(**row))


def _open_budgets(session: Session, dataset: str, scopes: list[Scope],
                  defaults: CapDefaults) -> dict[Scope, BudgetStatus]:
    """The budget rows of ``scopes``, created with the cap in force if missing (race-safe)."""
    found = _existing(session, dataset, scopes)
    missing = sorted(s for s in scopes if s not in found)
    if missing:
        caps = resolve_caps(session, dataset, missing, defaults)
        _insert_ignoring_duplicates(session, [
            {"dataset": dataset, "scope": s.kind, "subject": s.subject, "period": s.period,
             "cap_micro": caps[s], "spent_micro": 0}
            for s in missing
        ])
        found = _existing(session, dataset, scopes)
    if len(found) != len(scopes):  # defensive: e.g. a snapshot isolation that hides a concurrent insert
        raise RuntimeError(f"budget rows of {dataset} missing after insert; retry the request")
    return found


# -- the ledger ---------------------------------------------------------------------------

#: Checks that may refuse to spend from budget rows whose state failed an integrity check
#: (server/auditlog/budgets.py's install_spend_check, called at start-up, registers one). Each is called with the session, the dataset and the
#: rows about to be charged, inside the charge's savepoint and before any row is updated,
#: and raises to refuse; nothing is charged then.
SPEND_CHECKS: list[Callable[[Session, str, list[BudgetStatus]], None]] = []


def charge(session: Session, dataset: str, scopes: list[Scope], amount_micro: int, *,
           defaults: CapDefaults, account_id: int | None = None,
           release_id: int | None = None) -> list[LedgerEntry]:
    """Charge ``amount_micro`` to every scope, or to none; one ``LedgerEntry`` per scope.

    Each entry is recorded with the cap its budget row had when it was charged
    (:class:`~civicdp.server.state.ledger_models.LedgerEntryCap`): the row's cap may change later.
    Must run inside the caller's transaction, the one that also stores the release
    and its audit entry, and that transaction must commit before the answer leaves.
    Raises :class:`BudgetRefused` if any scope lacks room and :class:`InvalidLoss`
    for a bad amount (checked before the database is touched). On refusal the
    scopes already charged are undone (a SAVEPOINT is rolled back), so the caller
    may still commit its transaction to record the refusal.
    """
    amount = validate_amount(amount_micro)
    scopes = check_scopes(dataset, scopes)
    with session.begin_nested():
        budgets = _open_budgets(session, dataset, scopes, defaults)
        for check in SPEND_CHECKS:
            check(session, dataset, list(budgets.values()))
        entries, caps = [], []
        # Lock and charge in ascending id order, the same in every transaction: two
        # concurrent charges on PostgreSQL then never hold one row each while waiting
        # for the other's (a deadlock). On SQLite, BEGIN IMMEDIATE serialises writers.
        for status in sorted(budgets.values(), key=lambda b: b.budget_id):
            # Check and charge in ONE statement. Reading spent, comparing in Python and
            # then writing lets concurrent requests all see the same room and all
            # charge (GOVERNANCE.md measured 5.0 released against a cap of 1.0). Here
            # the database evaluates the condition on the row it is updating, under its
            # row lock (PostgreSQL re-checks it on the newest version after waiting), and
            # returns the cap it checked against: the one this charge is recorded with.
            charged = session.execute(
                update(Budget)
                .where(Budget.id == status.budget_id,
                       Budget.spent_micro + amount <= Budget.cap_micro)
                .values(spent_micro=Budget.spent_micro + amount)
                .returning(Budget.spent_micro, Budget.cap_micro)
            ).one_or_none()
            if charged is None:
                # No room. Re-read the row for the message; raising inside
                # begin_nested() rolls back the scopes charged before this one.
                current = session.execute(
                    select(Budget.cap_micro, Budget.spent_micro).where(Budget.id == status.budget_id)
                ).one()
                raise BudgetRefused(
                    BudgetStatus(status.budget_id, dataset, status.scope, status.subject,
                                 status.period, current.cap_micro, current.spent_micro, status.accounting),
                    amount)
            after, cap = charged
            caps.append(cap)
            entries.append(LedgerEntry(
                budget_id=status.budget_id, release_id=release_id, account_id=account_id,
                amount_micro=amount, spent_before_micro=after - amount, spent_after_micro=after,
            ))
        session.add_all(entries)
        session.flush()
        session.add_all([LedgerEntryCap(ledger_entry_id=entry.id, cap_micro=cap)
                         for entry, cap in zip(entries, caps, strict=True)])
        session.flush()
    return entries


def statuses(session: Session, dataset: str, scopes: list[Scope], *,
             defaults: CapDefaults) -> list[BudgetStatus]:
    """The current status of ``scopes``, in their order, including budgets not created yet.

    Read-only: a scope without a row shows the cap it would get and nothing spent.
    """
    scopes = check_scopes(dataset, scopes)
    found = _existing(session, dataset, scopes)
    missing = [s for s in scopes if s not in found]
    caps = resolve_caps(session, dataset, missing, defaults) if missing else {}
    accounting = accounting_of(session, dataset)
    return [
        found.get(s) or BudgetStatus(None, dataset, s.kind, s.subject, s.period, caps[s], 0, accounting)
        for s in scopes
    ]


def precheck(session: Session, dataset: str, scopes: list[Scope], amount_micro: int, *,
             defaults: CapDefaults) -> list[BudgetStatus]:
    """Refuse early, before computing anything, if ``amount_micro`` does not fit now.

    Read-only: creates no budget row and charges nothing. A pass is advisory only
    (a concurrent request may spend the room); :func:`charge` is what enforces.
    Returns the scopes' current status; raises :class:`BudgetRefused` or
    :class:`InvalidLoss`.
    """
    amount = validate_amount(amount_micro)
    current = statuses(session, dataset, scopes, defaults=defaults)
    for status in current:
        if status.spent_micro + amount > status.cap_micro:
            raise BudgetRefused(status, amount)
    return current
