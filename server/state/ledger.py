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

import json
import math
import numbers
import re
from functools import lru_cache
from dataclasses import dataclass
from datetime import datetime, timezone
from fractions import Fraction
from typing import Any, Callable, NamedTuple, Protocol

from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from civicdp.privacy.accounting import PURE, Accounting
from civicdp.privacy.errors import BudgetExhausted, InvalidLoss
from civicdp.privacy.loss import MICRO, PrivacyLoss
from civicdp.server.state.models import Budget, BudgetCap, Dataset, LedgerEntry

#: Scope kinds, in the order a request's scopes are listed.
ANALYST, AGENCY, DATASET, LIFETIME = "analyst", "agency", "dataset", "lifetime"
KINDS = (ANALYST, AGENCY, DATASET, LIFETIME)
#: A feed's allocation on its dataset (subject: the feed's name, period "lifetime"): the
#: total its definition announced. Charged with the dataset's monthly and lifetime
#: scopes at each release (server/feeds/service.py), never by a query. Its default cap is 0:
#: only a ``BudgetCap`` row written when the feed is defined opens it.
FEED = "feed"
SCOPE_KINDS = (*KINDS, FEED)
#: The subject of scopes that belong to the dataset itself, and of default caps.
ANY = "*"
#: The period of the lifetime scope.
LIFETIME_PERIOD = "lifetime"
#: Largest single charge accepted (one million epsilon): anything above is a bug or an attack.
MAX_CHARGE_MICRO = 10**12

_MONTH = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
_SUBJECT_MAX = 100  # the models' max_length for dataset, subject


# -- values -------------------------------------------------------------------------------


class Scope(NamedTuple):
    """One budget a charge must fit: its kind, whose it is, and which period."""

    kind: str  # analyst | agency | dataset | lifetime
    subject: str  # account name, agency, or "*" for the dataset's own scopes
    period: str  # "2026-11" (calendar month, UTC) or "lifetime"


class _EpsilonSettings(Protocol):
    analyst_month_epsilon: float
    agency_month_epsilon: float
    dataset_month_epsilon: float
    dataset_lifetime_epsilon: float


def _cap_micro(epsilon: object) -> int:
    # Round a configured cap DOWN: a cap must never grow by conversion.
    return math.floor(PrivacyLoss.of(epsilon).epsilon * MICRO)


@dataclass(frozen=True)
class CapDefaults:
    """Caps used when no ``BudgetCap`` row applies, in micro-epsilon.

    The defaults mirror ``Settings``; build the server's instance with
    :meth:`from_settings` so that operator configuration is honoured.
    """

    analyst_month_micro: int = 1 * MICRO
    agency_month_micro: int = 2 * MICRO
    dataset_month_micro: int = 3 * MICRO
    lifetime_micro: int = 4 * MICRO

    @classmethod
    def from_settings(cls, settings: _EpsilonSettings) -> CapDefaults:
        """Caps from a ``civicdp.server.state.settings.Settings`` (or anything with its four epsilon fields)."""
        return cls(
            analyst_month_micro=_cap_micro(settings.analyst_month_epsilon),
            agency_month_micro=_cap_micro(settings.agency_month_epsilon),
            dataset_month_micro=_cap_micro(settings.dataset_month_epsilon),
            lifetime_micro=_cap_micro(settings.dataset_lifetime_epsilon),
        )

    def for_kind(self, kind: str) -> int:
        return {
            ANALYST: self.analyst_month_micro,
            AGENCY: self.agency_month_micro,
            DATASET: self.dataset_month_micro,
            LIFETIME: self.lifetime_micro,
            FEED: 0,
        }[kind]


def _epsilon(micro: int) -> float:
    """Display value of a micro amount (never used in a comparison)."""
    return float(Fraction(micro, MICRO))


def _show(micro: int) -> str:
    return f"{_epsilon(micro):.6g}"


@dataclass(frozen=True)
class BudgetStatus:
    """A budget row as the API shows it: cap, spent and what remains.

    ``budget_id`` is None when :func:`precheck` describes a budget not created yet.
    """

    budget_id: int | None
    dataset: str
    scope: str
    subject: str
    period: str
    cap_micro: int  # in the dataset's ledger unit: micro-epsilon, or nano-rho (zCDP)
    spent_micro: int
    accounting: Accounting = PURE

    @property
    def remaining_micro(self) -> int:
        return max(self.cap_micro - self.spent_micro, 0)

    @property
    def renews_at(self) -> datetime | None:
        return renews_at(self.period)

    def as_dict(self) -> dict[str, Any]:
        """JSON form for the budgets API (epsilons for people, integer amounts for machines).

        On a zCDP dataset the integers are nano-rho, rho is shown too, and each epsilon is
        that rho stated at the dataset's delta: ``spent_epsilon`` the guarantee so far,
        ``remaining_epsilon`` the largest single query that still fits.
        """
        renewal = self.renews_at
        cap, spent, remaining = (self.accounting.shown(a) for a in
                                 (self.cap_micro, self.spent_micro, self.remaining_micro))
        shown: dict[str, Any] = {
            "dataset": self.dataset, "scope": self.scope, "subject": self.subject,
            "period": self.period,
            "cap_epsilon": cap["epsilon"], "spent_epsilon": spent["epsilon"],
            "remaining_epsilon": remaining["epsilon"],
            "cap_micro": self.cap_micro, "spent_micro": self.spent_micro,
            "remaining_micro": self.remaining_micro,
            "renews_at": renewal.isoformat() if renewal else None,
            "unit": self.accounting.unit,
        }
        if self.accounting.zcdp:
            shown.update(cap_rho=cap["rho"], spent_rho=spent["rho"], remaining_rho=remaining["rho"],
                         delta=self.accounting.delta)
        return shown


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


# -- periods and scopes -------------------------------------------------------------------


def _utc(now: datetime) -> datetime:
    if now.utcoffset() is None:
        # A naive time is ambiguous (local? UTC?) and would put a charge in the wrong month.
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(timezone.utc)


def period_of(now: datetime) -> str:
    """The calendar month of ``now`` in UTC, as ``"YYYY-MM"``."""
    return f"{_utc(now):%Y-%m}"


def renews_at(period: str) -> datetime | None:
    """Start (UTC) of the month after a monthly ``period``; None for ``"lifetime"``."""
    if period == LIFETIME_PERIOD:
        return None
    match = _MONTH.match(period)
    if not match:
        raise ValueError(f"not a period: {period!r}")
    year, month = int(match[1]), int(match[2])
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return datetime(year, month, 1, tzinfo=timezone.utc)


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _SUBJECT_MAX or value == ANY:
        raise ValueError(f"{what} must be a non-empty name of at most {_SUBJECT_MAX} characters "
                         f"other than {ANY!r}, got {value!r}")
    return value


def scopes_for(dataset: str, account_name: str, agency: str, now: datetime) -> list[Scope]:
    """The four scopes one query by ``account_name`` of ``agency`` on ``dataset`` is charged to."""
    _check_name(dataset, "dataset")
    month = period_of(now)
    return [
        Scope(ANALYST, _check_name(account_name, "account name"), month),
        Scope(AGENCY, _check_name(agency, "agency"), month),
        Scope(DATASET, ANY, month),
        Scope(LIFETIME, ANY, LIFETIME_PERIOD),
    ]


def _check_scopes(dataset: str, scopes: list[Scope]) -> list[Scope]:
    _check_name(dataset, "dataset")
    scopes = [Scope(*scope) for scope in scopes]
    if not scopes:
        raise ValueError("a charge needs at least one scope")
    if len(set(scopes)) != len(scopes):
        # The same row twice would be charged twice.
        raise ValueError(f"duplicate scopes in {scopes}")
    for scope in scopes:
        if scope.kind not in SCOPE_KINDS:
            raise ValueError(f"unknown scope kind {scope.kind!r}")
        if not isinstance(scope.subject, str) or not scope.subject or len(scope.subject) > _SUBJECT_MAX:
            raise ValueError(f"bad subject in {scope}")
        if scope.kind in (LIFETIME, FEED):
            if scope.period != LIFETIME_PERIOD:
                raise ValueError(f"the {scope.kind} scope has period {LIFETIME_PERIOD!r}, got {scope.period!r}")
        elif not isinstance(scope.period, str) or not _MONTH.match(scope.period):
            raise ValueError(f"a {scope.kind} scope needs a 'YYYY-MM' period, got {scope.period!r}")
    return scopes


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


# -- caps and budget rows -----------------------------------------------------------------


@lru_cache(maxsize=256)
def _accounting_in(document: str) -> Accounting:
    declared = json.loads(document).get("accounting") or {}
    return Accounting(declared.get("mode", "pure"), float(declared.get("delta", 0.0)))


def accounting_in(document: str) -> Accounting:
    """The accounting a dataset's metadata document declares (each document parsed once)."""
    return _accounting_in(document)


def accounting_of(session: Session, dataset: str) -> Accounting:
    """The dataset's accounting (its registered metadata); pure when it is not registered."""
    document = session.execute(select(Dataset.metadata_json).where(Dataset.name == dataset)).scalar_one_or_none()
    return PURE if document is None else _accounting_in(document)


def in_unit(accounting: Accounting, kind: str, cap_micro: int) -> int:
    """A cap as stored for scope ``kind`` (micro-epsilon; feeds: already in the unit), in the ledger unit."""
    return cap_micro if kind == FEED else accounting.cap_of(cap_micro)


def _resolve_caps(session: Session, dataset: str, scopes: list[Scope],
                  defaults: CapDefaults) -> dict[Scope, int]:
    """The cap in force for each scope: subject-specific row, then ``"*"`` row, then default."""
    rows = session.execute(
        select(BudgetCap.scope, BudgetCap.subject, BudgetCap.cap_micro).where(
            BudgetCap.dataset == dataset,
            BudgetCap.scope.in_({s.kind for s in scopes}),
            BudgetCap.subject.in_({s.subject for s in scopes} | {ANY}),
        )
    ).all()
    found = {(kind, subject): cap for kind, subject, cap in rows}
    accounting = accounting_of(session, dataset)
    caps = {}
    for scope in scopes:
        cap = found.get((scope.kind, scope.subject))
        if cap is None:
            cap = found.get((scope.kind, ANY))
        caps[scope] = in_unit(accounting, scope.kind, defaults.for_kind(scope.kind) if cap is None else cap)
    return caps


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
        caps = _resolve_caps(session, dataset, missing, defaults)
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
#: (server/auditlog/reconcile.py registers one). Each is called with the session, the dataset and the
#: rows about to be charged, inside the charge's savepoint and before any row is updated,
#: and raises to refuse; nothing is charged then.
SPEND_CHECKS: list[Callable[[Session, str, list[BudgetStatus]], None]] = []


def charge(session: Session, dataset: str, scopes: list[Scope], amount_micro: int, *,
           defaults: CapDefaults, account_id: int | None = None,
           release_id: int | None = None) -> list[LedgerEntry]:
    """Charge ``amount_micro`` to every scope, or to none; one ``LedgerEntry`` per scope.

    Must run inside the caller's transaction, the one that also stores the release
    and its audit entry, and that transaction must commit before the answer leaves.
    Raises :class:`BudgetRefused` if any scope lacks room and :class:`InvalidLoss`
    for a bad amount (checked before the database is touched). On refusal the
    scopes already charged are undone (a SAVEPOINT is rolled back), so the caller
    may still commit its transaction to record the refusal.
    """
    amount = validate_amount(amount_micro)
    scopes = _check_scopes(dataset, scopes)
    with session.begin_nested():
        budgets = _open_budgets(session, dataset, scopes, defaults)
        for check in SPEND_CHECKS:
            check(session, dataset, list(budgets.values()))
        entries = []
        # Lock and charge in ascending id order, the same in every transaction: two
        # concurrent charges on PostgreSQL then never hold one row each while waiting
        # for the other's (a deadlock). On SQLite, BEGIN IMMEDIATE serialises writers.
        for status in sorted(budgets.values(), key=lambda b: b.budget_id):
            # Check and charge in ONE statement. Reading spent, comparing in Python and
            # then writing lets concurrent requests all see the same room and all
            # charge (GOVERNANCE.md measured 5.0 released against a cap of 1.0). Here
            # the database evaluates the condition on the row it is updating, under its
            # row lock (PostgreSQL re-checks it on the newest version after waiting).
            after = session.execute(
                update(Budget)
                .where(Budget.id == status.budget_id,
                       Budget.spent_micro + amount <= Budget.cap_micro)
                .values(spent_micro=Budget.spent_micro + amount)
                .returning(Budget.spent_micro)
            ).scalar_one_or_none()
            if after is None:
                # No room. Re-read the row for the message; raising inside
                # begin_nested() rolls back the scopes charged before this one.
                current = session.execute(
                    select(Budget.cap_micro, Budget.spent_micro).where(Budget.id == status.budget_id)
                ).one()
                raise BudgetRefused(
                    BudgetStatus(status.budget_id, dataset, status.scope, status.subject,
                                 status.period, current.cap_micro, current.spent_micro, status.accounting),
                    amount)
            entries.append(LedgerEntry(
                budget_id=status.budget_id, release_id=release_id, account_id=account_id,
                amount_micro=amount, spent_before_micro=after - amount, spent_after_micro=after,
            ))
        session.add_all(entries)
        session.flush()
    return entries


def statuses(session: Session, dataset: str, scopes: list[Scope], *,
             defaults: CapDefaults) -> list[BudgetStatus]:
    """The current status of ``scopes``, in their order, including budgets not created yet.

    Read-only: a scope without a row shows the cap it would get and nothing spent.
    """
    scopes = _check_scopes(dataset, scopes)
    found = _existing(session, dataset, scopes)
    missing = [s for s in scopes if s not in found]
    caps = _resolve_caps(session, dataset, missing, defaults) if missing else {}
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


def apply_cap(session: Session, dataset: str, kind: str, subject: str, cap_micro: int, *,
              now: datetime) -> int:
    """Put a changed cap into force on the budget rows already open at ``now``.

    A budget row copies its cap when it is created, so after a steward changes a
    ``BudgetCap`` the rows of the current month (and the lifetime row) keep the old
    cap unless this is called in the same transaction. For subject ``"*"`` it updates
    the rows of that kind whose subject has no cap of its own. Lowering a cap below
    what is spent is allowed: further charges are refused, nothing is refunded.
    Returns the number of rows updated.
    """
    if kind not in SCOPE_KINDS:
        raise ValueError(f"unknown scope kind {kind!r}")
    if isinstance(cap_micro, bool) or not isinstance(cap_micro, int) or not 0 <= cap_micro <= 2**62:
        raise ValueError(f"a cap must be an integer number of micro-epsilon >= 0, got {cap_micro!r}")
    cap_micro = in_unit(accounting_of(session, dataset), kind, cap_micro)
    query = update(Budget).where(
        Budget.dataset == dataset, Budget.scope == kind,
        Budget.period.in_([period_of(now), LIFETIME_PERIOD]))
    if subject == ANY:
        own_cap = select(BudgetCap.id).where(
            BudgetCap.dataset == dataset, BudgetCap.scope == kind, BudgetCap.subject != ANY,
            BudgetCap.subject == Budget.subject)
        query = query.where(~own_cap.exists())
    else:
        query = query.where(Budget.subject == subject)
    return session.execute(query.values(cap_micro=cap_micro)).rowcount


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
