"""Scopes, periods and caps: which budgets a charge must fit, and how large each is.

Every released answer is charged to four scopes at once (:func:`scopes_for`) — the
analyst's allowance on the dataset this month, the analyst's agency's allowance this
month, the dataset's allowance this month, and the dataset's lifetime cap that protects
the people in it across all months, analysts and feeds; a feed's release is charged to
its own allocation (``feed``) with the dataset's two. Caps are set in epsilon (the
number people agree on) and converted once, rounding down, into the dataset's unit when
a budget row is opened (micro-epsilon on a pure-DP dataset, nano-rho on a zCDP one); a
feed's allocation is already in that unit. The cap in force for a scope is the
``BudgetCap`` row of its subject, else the ``"*"`` row of its kind, else the server's
default (:class:`CapDefaults`); :func:`apply_cap` puts a changed cap into force on the
rows already open. The charge itself is :func:`civicdp.server.state.ledger.charge`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, NamedTuple, Protocol

from sqlalchemy import select, update
from sqlmodel import Session

from civicdp.privacy.accounting import PURE, Accounting
from civicdp.privacy.loss import MICRO, PrivacyLoss
from civicdp.server.state.models import Budget, BudgetCap, Dataset

#: Scope kinds, in the order a request's scopes are listed.
ANALYST, AGENCY, DATASET, LIFETIME = "analyst", "agency", "dataset", "lifetime"
KINDS = (ANALYST, AGENCY, DATASET, LIFETIME)
#: A feed's allocation on its dataset (subject: the feed's name, period "lifetime"): the
#: total its definition announced. Charged with the dataset's monthly and lifetime
#: scopes at each release (server/feeds/periods.py), never by a query. Its default cap is 0:
#: only a ``BudgetCap`` row written when the feed is defined opens it.
FEED = "feed"
SCOPE_KINDS = (*KINDS, FEED)
#: The subject of scopes that belong to the dataset itself, and of default caps.
ANY = "*"
#: The period of the lifetime scope.
LIFETIME_PERIOD = "lifetime"

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


def check_scopes(dataset: str, scopes: list[Scope]) -> list[Scope]:
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


# -- caps ---------------------------------------------------------------------------------


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


def resolve_caps(session: Session, dataset: str, scopes: list[Scope],
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
