"""The budget ledger never overspends: exact amounts, atomic scopes, concurrency, restarts.

Tests taking ``db_engine`` run on SQLite (WAL file) and on PostgreSQL (a fresh schema).
The key requirement is the concurrency section: 200 simultaneous requests, and two
server processes sharing one database, release exactly what fits the tightest cap.
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, inspect, select, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel

from civicdp.privacy.errors import BudgetExhausted, InvalidLoss
from civicdp.privacy.loss import MICRO, PrivacyLoss
from civicdp.server.state.db import init_db, make_engine, session_scope
from civicdp.server.state.budget_scopes import (
    AGENCY, ANALYST, ANY, DATASET, LIFETIME, BudgetStatus, CapDefaults, Scope, apply_cap, period_of, renews_at,
    scopes_for,
)
from civicdp.server.state.ledger import MAX_CHARGE_MICRO, BudgetRefused, charge, precheck, statuses, to_micro
from civicdp.server.state.ledger_history import budgets_for, charge_history
from civicdp.server.state.ledger_models import LedgerEntryCap
from civicdp.server.state.models import Account, AuditEntry, Budget, BudgetCap, LedgerEntry, Release
from civicdp.server.state.settings import Settings
from tests.server.racing import race

DS = "civic-demo"
NOV = datetime(2026, 11, 15, 12, 0, tzinfo=timezone.utc)
TENTH = 100_000  # epsilon 0.1 in micro-epsilon
HUGE = 10**12  # a cap that never binds
#: Settings' defaults: analyst 1, agency 2, dataset-month 3, lifetime 4.
DEFAULTS = CapDefaults()


def _scopes(now: datetime = NOV, analyst: str = "ana", agency: str = "health") -> list[Scope]:
    return scopes_for(DS, analyst, agency, now)


def _charge(engine: Engine, scopes: list[Scope], amount: int = TENTH,
            defaults: CapDefaults = DEFAULTS) -> list[LedgerEntry]:
    """One request: its own session and transaction, committed on success."""
    with session_scope(engine) as session:
        return charge(session, DS, scopes, amount, defaults=defaults)


def _set_cap(engine: Engine, kind: str, subject: str, epsilon: object, dataset: str = DS) -> None:
    with session_scope(engine) as session:
        session.add(BudgetCap(dataset=dataset, scope=kind, subject=subject,
                              cap_micro=to_micro(PrivacyLoss.of(epsilon))))


def _state(engine: Engine) -> tuple[list[BudgetStatus], int]:
    """Every budget row and the number of ledger entries."""
    with Session(engine) as session:
        entries = session.execute(select(func.count()).select_from(LedgerEntry)).scalar_one()
        return budgets_for(session), entries


def _spent(engine: Engine, kind: str, period: str | None = None) -> int:
    """Total spent on the budget rows of ``kind`` (all subjects; one period if given)."""
    with Session(engine) as session:
        query = select(func.coalesce(func.sum(Budget.spent_micro), 0)).where(Budget.scope == kind)
        if period is not None:
            query = query.where(Budget.period == period)
        return session.execute(query).scalar_one()


def _entries_sum_by_budget(engine: Engine) -> dict[int, int]:
    with Session(engine) as session:
        rows = session.execute(
            select(LedgerEntry.budget_id, func.sum(LedgerEntry.amount_micro)).group_by(LedgerEntry.budget_id)
        ).all()
    return {budget_id: total for budget_id, total in rows}


# -- exact amounts ------------------------------------------------------------------------


def test_three_tenths_fit_a_cap_of_three_tenths_and_a_fourth_is_refused(db_engine: Engine) -> None:
    """0.1 as a float costs exactly 100000 micro-epsilon, so three fill 0.3 with no float slack."""
    _set_cap(db_engine, ANALYST, "ana", 0.3)
    tenth = to_micro(PrivacyLoss.of(0.1))
    for _ in range(3):
        _charge(db_engine, _scopes(), tenth)
    with pytest.raises(BudgetRefused, match="remaining analyst budget of epsilon 0 "):
        _charge(db_engine, _scopes(), tenth)
    [analyst] = [b for b in _state(db_engine)[0] if b.scope == ANALYST]
    assert (analyst.cap_micro, analyst.spent_micro, analyst.remaining_micro) == (300_000, 300_000, 0)


def test_ledger_entries_record_who_what_and_before_after(db_engine: Engine) -> None:
    """One entry per scope, with the account, the release and the spent amount around the charge."""
    with session_scope(db_engine) as session:
        account = Account(name="ana", agency="health")
        session.add(account)
        session.flush()
        release = Release(dataset=DS, dataset_version="1", query_hash="h" * 64, canonical_query="{}",
                          loss_micro=TENTH, result_json="{}", result_hash="r" * 64, account_id=account.id)
        session.add(release)
        session.flush()
        ids = (account.id, release.id)
        first = charge(session, DS, _scopes(), TENTH, defaults=DEFAULTS, account_id=ids[0], release_id=ids[1])
        second = charge(session, DS, _scopes(), 2 * TENTH, defaults=DEFAULTS, account_id=ids[0])
        assert len(first) == len(second) == 4
        assert {e.budget_id for e in first} == {e.budget_id for e in second}
        assert all((e.account_id, e.release_id) == ids for e in first)
        assert all((e.spent_before_micro, e.spent_after_micro) == (0, TENTH) for e in first)
        assert all((e.spent_before_micro, e.spent_after_micro) == (TENTH, 3 * TENTH) for e in second)
        assert all(e.id is not None for e in first + second)


def test_to_micro_rounds_up_and_takes_only_losses() -> None:
    """The charge of a loss never under-counts; a bare number is not a loss."""
    assert to_micro(PrivacyLoss.of(Fraction(1, 3))) == 333_334
    assert to_micro(PrivacyLoss.of("0.1")) == TENTH
    with pytest.raises(InvalidLoss, match="expected a PrivacyLoss"):
        to_micro(0.1)  # type: ignore[arg-type]


INVALID_AMOUNTS = [
    (0, "greater than 0"), (-1, "greater than 0"), (-TENTH, "greater than 0"),
    (math.nan, "finite"), (math.inf, "finite"), (-math.inf, "finite"),
    (MAX_CHARGE_MICRO + 1, "above the largest"), (10**30, "above the largest"),
    ("100000", "integer number of micro-epsilon"), ("0.1", "integer number of micro-epsilon"),
    (True, "integer number of micro-epsilon"), (False, "integer number of micro-epsilon"),
    (0.1, "integer number of micro-epsilon"), (100000.0, "integer number of micro-epsilon"),
    (Fraction(1, 10), "integer number of micro-epsilon"), (None, "integer number of micro-epsilon"),
]
INVALID_IDS = ["zero", "minus-one", "negative-tenth", "nan", "inf", "minus-inf", "just-too-large", "huge",
               "string-int", "string-decimal", "true", "false", "float", "float-integral", "fraction", "none"]


@pytest.mark.parametrize("amount, message", INVALID_AMOUNTS, ids=INVALID_IDS)
def test_invalid_amounts_are_refused_without_touching_the_ledger(
        sqlite_engine: Engine, amount: object, message: str) -> None:
    """Validation comes first: no budget row changes, no entry is written, nothing is created."""
    with pytest.raises(InvalidLoss, match=message):
        _charge(sqlite_engine, _scopes(), amount)  # type: ignore[arg-type]
    assert _state(sqlite_engine) == ([], 0)  # not even the lazy budget rows

    _charge(sqlite_engine, _scopes())
    before = _state(sqlite_engine)
    with pytest.raises(InvalidLoss, match=message):
        _charge(sqlite_engine, _scopes(), amount)  # type: ignore[arg-type]
    with pytest.raises(InvalidLoss, match=message), Session(sqlite_engine) as session:
        precheck(session, DS, _scopes(), amount, defaults=DEFAULTS)  # type: ignore[arg-type]
    assert _state(sqlite_engine) == before


@pytest.mark.parametrize("scopes, message", [
    ([], "at least one scope"),
    ([Scope(ANALYST, "ana", "2026-11")] * 2, "duplicate"),
    ([Scope("person", "ana", "2026-11")], "unknown scope kind"),
    ([Scope(ANALYST, "ana", "2026-13")], "'YYYY-MM' period"),
    ([Scope(ANALYST, "ana", "lifetime")], "'YYYY-MM' period"),
    ([Scope(LIFETIME, ANY, "2026-11")], "lifetime scope has period"),
    ([Scope(ANALYST, "", "2026-11")], "bad subject"),
], ids=["none", "duplicate", "unknown-kind", "bad-month", "monthly-as-lifetime", "lifetime-as-month",
        "empty-subject"])
def test_malformed_scopes_are_refused(sqlite_engine: Engine, scopes: list[Scope], message: str) -> None:
    """A duplicate scope would be charged twice; other mistakes would charge the wrong row."""
    with pytest.raises(ValueError, match=message):
        _charge(sqlite_engine, scopes)
    assert _state(sqlite_engine) == ([], 0)


# -- scopes, periods, caps ----------------------------------------------------------------


def test_scopes_for_lists_the_four_scopes_in_the_utc_month() -> None:
    """analyst x dataset x month, agency x dataset x month, dataset x month, dataset lifetime."""
    assert scopes_for(DS, "ana", "health", NOV) == [
        Scope(ANALYST, "ana", "2026-11"), Scope(AGENCY, "health", "2026-11"),
        Scope(DATASET, ANY, "2026-11"), Scope(LIFETIME, ANY, "lifetime"),
    ]


@pytest.mark.parametrize("now, period", [
    (datetime(2026, 11, 30, 23, 59, 59, tzinfo=timezone.utc), "2026-11"),
    (datetime(2026, 12, 1, tzinfo=timezone.utc), "2026-12"),
    (datetime(2026, 12, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))), "2026-11"),  # 23:30 UTC
    (datetime(2026, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-2))), "2027-01"),
], ids=["last-second", "first-second", "east-of-utc", "west-of-utc"])
def test_the_period_is_the_calendar_month_in_utc(now: datetime, period: str) -> None:
    assert period_of(now) == period


def test_naive_times_and_reserved_names_are_refused() -> None:
    """A naive time could put a charge in the wrong month; '*' is the dataset's own subject."""
    with pytest.raises(ValueError, match="timezone-aware"):
        scopes_for(DS, "ana", "health", datetime(2026, 11, 15))
    with pytest.raises(ValueError, match="account name"):
        scopes_for(DS, ANY, "health", NOV)
    with pytest.raises(ValueError, match="agency"):
        scopes_for(DS, "ana", "", NOV)


@pytest.mark.parametrize("period, renewal", [
    ("2026-11", datetime(2026, 12, 1, tzinfo=timezone.utc)),
    ("2026-12", datetime(2027, 1, 1, tzinfo=timezone.utc)),
    ("lifetime", None),
], ids=["november", "december", "lifetime"])
def test_renews_at_is_the_start_of_the_next_month(period: str, renewal: datetime | None) -> None:
    assert renews_at(period) == renewal


def test_caps_come_from_the_most_specific_row_then_the_defaults(sqlite_engine: Engine) -> None:
    """Subject-specific cap, then the '*' cap of that kind, then the configured default."""
    _set_cap(sqlite_engine, ANALYST, "ana", 0.5)
    _set_cap(sqlite_engine, ANALYST, ANY, 0.7)
    _set_cap(sqlite_engine, AGENCY, ANY, 1.5)
    _set_cap(sqlite_engine, LIFETIME, ANY, 9, dataset="other-dataset")  # another dataset's cap
    _charge(sqlite_engine, _scopes(analyst="ana"))
    _charge(sqlite_engine, _scopes(analyst="bob"))
    caps = {(b.scope, b.subject): b.cap_micro for b in _state(sqlite_engine)[0]}
    assert caps == {
        (ANALYST, "ana"): 500_000, (ANALYST, "bob"): 700_000, (AGENCY, "health"): 1_500_000,
        (DATASET, ANY): DEFAULTS.dataset_month_micro, (LIFETIME, ANY): DEFAULTS.lifetime_micro,
    }


def test_a_changed_cap_is_put_in_force_on_open_budgets(db_engine: Engine) -> None:
    """Rows copy their cap when created; apply_cap updates this month's and the lifetime rows.

    A '*' cap leaves alone the subjects that have a cap of their own, and other months.
    """
    october = datetime(2026, 10, 15, tzinfo=timezone.utc)
    _set_cap(db_engine, ANALYST, "bob", 0.8)
    for analyst in ("ana", "bob"):
        _charge(db_engine, _scopes(analyst=analyst))
    _charge(db_engine, _scopes(now=october, analyst="ana"))
    with session_scope(db_engine) as session:
        session.add(BudgetCap(dataset=DS, scope=ANALYST, subject=ANY, cap_micro=200_000))
        assert apply_cap(session, DS, ANALYST, ANY, 200_000, now=NOV) == 1  # ana's November row
        session.add(BudgetCap(dataset=DS, scope=LIFETIME, subject=ANY, cap_micro=400_000))
        assert apply_cap(session, DS, LIFETIME, ANY, 400_000, now=NOV) == 1  # 0.3 spent so far
    with Session(db_engine) as session:
        caps = {(b.scope, b.subject, b.period): b.cap_micro for b in budgets_for(session, DS)}
    assert caps[(ANALYST, "ana", "2026-11")] == 200_000
    assert caps[(ANALYST, "ana", "2026-10")] == 1_000_000  # a past month keeps its cap
    assert caps[(ANALYST, "bob", "2026-11")] == 800_000  # bob's own cap wins over '*'
    assert caps[(LIFETIME, ANY, "lifetime")] == 400_000
    _charge(db_engine, _scopes(analyst="ana"))  # ana: 0.2 of 0.2 this month; lifetime 0.4 of 0.4
    with pytest.raises(BudgetRefused, match="analyst budget of epsilon 0 "):
        _charge(db_engine, _scopes(analyst="ana"))
    with pytest.raises(BudgetRefused, match="lifetime budget of epsilon 0 "):
        _charge(db_engine, _scopes(analyst="bob"))
    with session_scope(db_engine) as session, pytest.raises(ValueError, match="micro-epsilon"):
        apply_cap(session, DS, ANALYST, "ana", 0.5, now=NOV)  # type: ignore[arg-type]


def test_cap_defaults_follow_the_settings() -> None:
    """Operator configuration reaches the ledger as integer caps (never rounded up)."""
    configured = Settings(analyst_month_epsilon=0.3, agency_month_epsilon=0.7,
                          dataset_month_epsilon=1.1, dataset_lifetime_epsilon=2.5)
    assert CapDefaults.from_settings(configured) == CapDefaults(300_000, 700_000, 1_100_000, 2_500_000)
    # CapDefaults() (used in tests) mirrors the defaults of Settings' fields.
    fields = ("analyst_month_epsilon", "agency_month_epsilon", "dataset_month_epsilon", "dataset_lifetime_epsilon")
    shipped = SimpleNamespace(**{name: Settings.model_fields[name].default for name in fields})
    assert CapDefaults.from_settings(shipped) == CapDefaults()


# -- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize("caller", ["rolls-back", "commits-anyway"])
def test_a_refusal_in_the_third_scope_leaves_the_first_two_uncharged(db_engine: Engine, caller: str) -> None:
    """All scopes or none: scopes charged before the one without room are undone.

    The ledger charges in budget-id order, so the first two rows are updated before
    the third refuses. The caller's rollback undoes them; and because charge() works
    in a savepoint, so does a caller that catches the refusal and commits (to record
    it in the audit log, say).
    """
    _charge(db_engine, _scopes())
    rows = sorted(_state(db_engine)[0], key=lambda b: b.budget_id)
    third = rows[2]
    with session_scope(db_engine) as session:  # close the third row: no room left
        session.execute(update(Budget).where(Budget.id == third.budget_id).values(cap_micro=TENTH))
    before = _state(db_engine)

    session = Session(db_engine)
    try:
        with pytest.raises(BudgetRefused) as refused:
            charge(session, DS, _scopes(), TENTH, defaults=DEFAULTS)
        assert (refused.value.scope_kind, refused.value.subject) == (third.scope, third.subject)
        if caller == "rolls-back":
            session.rollback()
        else:
            session.commit()
    finally:
        session.close()
    assert _state(db_engine) == before


@pytest.mark.parametrize("kind, subject, period, renewal, message", [
    (ANALYST, "ana", "2026-11", datetime(2026, 12, 1, tzinfo=timezone.utc),
     "Cannot answer without exceeding the remaining analyst budget of epsilon 0.2 for dataset civic-demo "
     "in 2026-11; this query needs 0.5. It renews on 2026-12-01."),
    (AGENCY, "health", "2026-11", datetime(2026, 12, 1, tzinfo=timezone.utc),
     "Cannot answer without exceeding the remaining budget of agency health of epsilon 0.2 for dataset "
     "civic-demo in 2026-11; this query needs 0.5. It renews on 2026-12-01."),
    (LIFETIME, ANY, "lifetime", None,
     "Cannot answer without exceeding the remaining lifetime budget of epsilon 0.2 for dataset civic-demo; "
     "this query needs 0.5. It does not renew."),
], ids=["analyst", "agency", "lifetime"])
def test_a_refusal_says_what_remains_and_when_it_renews(
        sqlite_engine: Engine, kind: str, subject: str, period: str, renewal: datetime | None,
        message: str) -> None:
    """The error carries the scope, the amounts (epsilon and micro) and the renewal date."""
    _set_cap(sqlite_engine, kind, subject, 0.3)
    _charge(sqlite_engine, _scopes())
    with pytest.raises(BudgetRefused) as refused:
        _charge(sqlite_engine, _scopes(), 5 * TENTH)
    error = refused.value
    assert str(error) == message
    assert isinstance(error, BudgetExhausted)
    assert (error.dataset, error.scope_kind, error.subject, error.period) == (DS, kind, subject, period)
    assert (error.cap_micro, error.spent_micro, error.remaining_micro, error.requested_micro) == (
        300_000, 100_000, 200_000, 500_000)
    assert (error.cap_epsilon, error.spent_epsilon, error.remaining_epsilon, error.requested_epsilon) == (
        0.3, 0.1, 0.2, 0.5)
    assert error.remaining == Fraction(1, 5) and error.requested == Fraction(1, 2)
    assert error.renews_at == renewal
    assert error.as_dict()["renews_at"] == (renewal.isoformat() if renewal else None)
    json.dumps(error.as_dict())


def test_statuses_show_every_scope_even_before_its_first_charge(sqlite_engine: Engine) -> None:
    """What an analyst sees before and after spending: cap, spent, remaining, per scope, in order."""
    with Session(sqlite_engine) as session:
        fresh = statuses(session, DS, _scopes(), defaults=DEFAULTS)
    assert [(s.scope, s.budget_id, s.remaining_micro) for s in fresh] == [
        (ANALYST, None, 1_000_000), (AGENCY, None, 2_000_000), (DATASET, None, 3_000_000),
        (LIFETIME, None, 4_000_000)]
    _charge(sqlite_engine, _scopes(), 3 * TENTH)
    with Session(sqlite_engine) as session:
        after = statuses(session, DS, _scopes(), defaults=DEFAULTS)
    assert [s.remaining_micro for s in after] == [700_000, 1_700_000, 2_700_000, 3_700_000]
    assert all(s.budget_id is not None for s in after)
    assert _state(sqlite_engine)[1] == 4


def test_precheck_refuses_early_and_changes_nothing(sqlite_engine: Engine) -> None:
    """precheck creates no rows and charges nothing; it refuses what would not fit now."""
    with Session(sqlite_engine) as session:
        statuses = precheck(session, DS, _scopes(), 10 * TENTH, defaults=DEFAULTS)
        assert [(s.budget_id, s.cap_micro, s.spent_micro) for s in statuses] == [
            (None, 1_000_000, 0), (None, 2_000_000, 0), (None, 3_000_000, 0), (None, 4_000_000, 0)]
        with pytest.raises(BudgetRefused, match="analyst budget of epsilon 1 "):
            precheck(session, DS, _scopes(), 11 * TENTH, defaults=DEFAULTS)
    assert _state(sqlite_engine) == ([], 0)
    _charge(sqlite_engine, _scopes(), 4 * TENTH)
    before = _state(sqlite_engine)
    with Session(sqlite_engine) as session:
        assert precheck(session, DS, _scopes(), 6 * TENTH, defaults=DEFAULTS)[0].remaining_micro == 600_000
        with pytest.raises(BudgetRefused, match="epsilon 0.6 .* needs 0.7"):
            precheck(session, DS, _scopes(), 7 * TENTH, defaults=DEFAULTS)
    assert _state(sqlite_engine) == before


def test_budgets_for_filters_by_dataset_subject_and_time(sqlite_engine: Engine) -> None:
    """The budgets API view: remaining per row, optionally only the rows in force now."""
    _charge(sqlite_engine, _scopes(analyst="ana"))
    _charge(sqlite_engine, _scopes(now=NOV + timedelta(days=30), analyst="bob"), 2 * TENTH)
    with Session(sqlite_engine) as session:
        assert len(budgets_for(session)) == 7  # 2 analysts, agency and dataset x 2 months, lifetime
        assert len(budgets_for(session, dataset="elsewhere")) == 0
        [ana] = budgets_for(session, DS, "ana")
        assert (ana.period, ana.remaining_micro, ana.renews_at) == (
            "2026-11", 900_000, datetime(2026, 12, 1, tzinfo=timezone.utc))
        assert ana.as_dict()["remaining_epsilon"] == 0.9
        now = [(b.scope, b.subject, b.period) for b in budgets_for(session, DS, now=NOV)]
        assert now == [(ANALYST, "ana", "2026-11"), (AGENCY, "health", "2026-11"),
                       (DATASET, ANY, "2026-11"), (LIFETIME, ANY, "lifetime")]
        lifetime = budgets_for(session, DS, ANY, now=NOV)[-1]
        assert (lifetime.spent_micro, lifetime.remaining_micro, lifetime.renews_at) == (300_000, 3_700_000, None)


def test_the_history_shows_each_charge_with_the_cap_in_force_when_it_was_charged(db_engine: Engine) -> None:
    """Issue 15: raising a cap after a charge changes the budget row's cap, not the cap that charge was made under."""
    _set_cap(db_engine, ANALYST, "ana", 1.0)
    _charge(db_engine, _scopes())
    with session_scope(db_engine) as session:
        session.execute(update(BudgetCap).where(BudgetCap.scope == ANALYST).values(cap_micro=2_000_000))
        assert apply_cap(session, DS, ANALYST, "ana", 2_000_000, now=NOV) == 1
    _charge(db_engine, _scopes())
    with Session(db_engine) as session:
        history = charge_history(session, DS)
        [analyst] = [b for b in budgets_for(session, DS) if b.scope == ANALYST]
    assert analyst.cap_micro == 2_000_000  # the row: today's cap
    assert [(h["cap_micro"], h["before_micro"], h["after_micro"]) for h in history if h["scope"] == ANALYST] == \
        [(1_000_000, 0, TENTH), (2_000_000, TENTH, 2 * TENTH)]
    assert [h["cap_micro"] for h in history if h["scope"] == LIFETIME] == [DEFAULTS.lifetime_micro] * 2
    assert len(history) == 8 and {h["dataset"] for h in history} == {DS}
    with Session(db_engine) as session:
        assert charge_history(session, "elsewhere") == [] and len(charge_history(session, limit=3)) == 3


def test_a_database_from_before_caps_were_recorded_keeps_working(tmp_path: Path) -> None:
    """A state created without the cap records: the next start adds the table and nothing else.

    Its old charges show the cap their audit entry states (a query's entry lists its budgets
    with their caps), or None when no entry states one; new charges, their own record.
    """
    engine = make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        SQLModel.metadata.create_all(engine, tables=[
            table for table in SQLModel.metadata.sorted_tables if table.name != LedgerEntryCap.__tablename__])
        with session_scope(engine) as session:  # two charges as an older civicdp made them
            analyst = Budget(dataset=DS, scope=ANALYST, subject="ana", period="2026-11", cap_micro=1_000_000,
                             spent_micro=TENTH)
            lifetime = Budget(dataset=DS, scope=LIFETIME, subject=ANY, period="lifetime", cap_micro=4_000_000,
                              spent_micro=TENTH)
            session.add_all([analyst, lifetime])
            session.flush()
            session.add_all([LedgerEntry(budget_id=b.id, amount_micro=TENTH, spent_before_micro=0,
                                         spent_after_micro=TENTH) for b in (analyst, lifetime)])
            session.add(AuditEntry(seq=0, account="ana", agency="health", action="query.run", target=DS, dataset=DS,
                                   decision="allowed", leaf_hash="0" * 64, entry_json=json.dumps({
                                       "action": "query.run", "decision": "allowed", "detail": {
                                           "dataset": DS, "ledger": [
                                               {"scope": ANALYST, "subject": "ana", "period": "2026-11",
                                                "cap_micro": 1_000_000, "before_micro": 0, "after_micro": TENTH}]}})))
            analyst.cap_micro = 2_000_000  # then a steward raised the cap
        init_db(engine)  # the next start, as at every start
        assert LedgerEntryCap.__tablename__ in inspect(engine).get_table_names()
        _charge(engine, _scopes())
        with Session(engine) as session:
            history = charge_history(session, DS)
        caps = [(h["scope"], h["before_micro"], h["cap_micro"]) for h in history if h["scope"] in (ANALYST, LIFETIME)]
        assert caps == [(ANALYST, 0, 1_000_000), (LIFETIME, 0, None),  # from the audit entry; stated nowhere
                        (ANALYST, TENTH, 2_000_000), (LIFETIME, TENTH, 4_000_000)]  # recorded with the charge
    finally:
        engine.dispose()


# -- durability and periods ---------------------------------------------------------------


def test_the_ledger_survives_a_restart(tmp_path: Path) -> None:
    """Spending lives in the database: a new engine (a restarted server) cannot spend it again."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    first = make_engine(url)
    try:
        init_db(first)
        for _ in range(7):
            _charge(first, _scopes())
    finally:
        first.dispose()
    second = make_engine(url)
    try:
        init_db(second)  # idempotent, as at every start
        with Session(second) as session:
            assert budgets_for(session, DS, "ana")[0].spent_micro == 700_000
        for _ in range(3):
            _charge(second, _scopes())
        with pytest.raises(BudgetRefused, match="epsilon 0 "):
            _charge(second, _scopes())
        assert _state(second)[1] == 10 * 4
    finally:
        second.dispose()


def test_monthly_budgets_roll_over_but_the_lifetime_keeps_adding_up(db_engine: Engine) -> None:
    """The last second of November and the first of December use two monthly rows, one lifetime row."""
    november = datetime(2026, 11, 30, 23, 59, 59, tzinfo=timezone.utc)
    december = datetime(2026, 12, 1, 0, 0, 0, tzinfo=timezone.utc)
    for _ in range(10):  # fills November's analyst allowance of 1
        _charge(db_engine, _scopes(now=november))
    with pytest.raises(BudgetRefused, match="in 2026-11; .* renews on 2026-12-01"):
        _charge(db_engine, _scopes(now=november))
    for _ in range(10):  # December is a fresh allowance
        _charge(db_engine, _scopes(now=december))
    with pytest.raises(BudgetRefused, match="in 2026-12; .* renews on 2027-01-01"):
        _charge(db_engine, _scopes(now=december))
    with Session(db_engine) as session:
        analyst = {b.period: b.spent_micro for b in budgets_for(session, DS, "ana")}
        [lifetime] = [b for b in budgets_for(session, DS, ANY) if b.scope == LIFETIME]
    assert analyst == {"2026-11": 1_000_000, "2026-12": 1_000_000}
    assert lifetime.spent_micro == 2_000_000
    # The lifetime cap (4) binds across months, whatever the monthly allowances say.
    for month in ("2027-01", "2027-02"):
        now = datetime.fromisoformat(f"{month}-10T00:00:00+00:00")
        for _ in range(10):
            _charge(db_engine, _scopes(now=now, analyst="bob" if month == "2027-02" else "ana"))
    with pytest.raises(BudgetRefused, match="lifetime budget of epsilon 0 .* does not renew"):
        _charge(db_engine, _scopes(now=datetime(2027, 3, 1, tzinfo=timezone.utc)))


# -- property: never above a cap, entries add up -------------------------------------------

CHARGE = st.tuples(
    st.integers(0, 3),  # analyst index (analyst i belongs to agency i % 2)
    st.sampled_from(["2026-11", "2026-12"]),
    st.integers(1, 450_000),  # amount
    st.booleans(),  # does the caller commit (or fail later and roll back)?
)


@settings(max_examples=60, deadline=None)
@given(caps=st.tuples(*[st.integers(0, 1_500_000)] * 4),  # analyst, agency, dataset, lifetime
       charges=st.lists(CHARGE, max_size=25))
def test_any_sequence_of_charges_stays_within_caps_and_entries_add_up(
        caps: tuple[int, int, int, int], charges: list[tuple[int, str, int, bool]]) -> None:
    """Against a reference model: exactly the charges that fit succeed, spent never exceeds
    a cap, rolled-back charges leave no trace, and each row's entries sum to its spent."""
    defaults = CapDefaults(*caps)
    with tempfile.TemporaryDirectory() as folder:
        engine = make_engine(f"sqlite:///{folder}/state.db")
        try:
            init_db(engine)
            model: dict[Scope, int] = {}
            for analyst, month, amount, commits in charges:
                now = datetime.fromisoformat(f"{month}-15T00:00:00+00:00")
                scopes = scopes_for(DS, f"a{analyst}", f"g{analyst % 2}", now)
                fits = all(model.get(s, 0) + amount <= defaults.for_kind(s.kind) for s in scopes)
                with Session(engine) as session:
                    try:
                        entries = charge(session, DS, scopes, amount, defaults=defaults)
                    except BudgetRefused as refused:
                        assert not fits
                        scope = Scope(refused.scope_kind, refused.subject, refused.period)
                        assert model.get(scope, 0) + amount > defaults.for_kind(scope.kind)
                        session.commit()  # committing after a refusal must not charge anything
                        continue
                    assert fits and len(entries) == len(scopes)
                    if commits:
                        session.commit()
                        for s in scopes:
                            model[s] = model.get(s, 0) + amount
                    else:
                        session.rollback()
            rows, _ = _state(engine)
            sums = _entries_sum_by_budget(engine)
            for row in rows:
                assert 0 <= row.spent_micro <= row.cap_micro
                assert row.spent_micro == model.get(Scope(row.scope, row.subject, row.period), 0)
                assert sums.get(row.budget_id, 0) == row.spent_micro
        finally:
            engine.dispose()


# -- concurrency: threads -------------------------------------------------------------------


def _hammer(engine: Engine, requests: list[list[Scope]], defaults: CapDefaults,
            amount: int = TENTH) -> list[str]:
    """Send all ``requests`` at once, one thread and one transaction each; their outcomes."""
    barrier = threading.Barrier(len(requests), timeout=60)

    def request(scopes: list[Scope]) -> str:
        barrier.wait()  # release every thread at the same moment
        try:
            with session_scope(engine) as session:
                charge(session, DS, scopes, amount, defaults=defaults)
        except BudgetRefused:
            return "refused"
        return "ok"

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(request, requests))  # any other exception fails the test


def _same_analyst(i: int) -> list[Scope]:
    return _scopes()


def _many_analysts_two_months(i: int) -> list[Scope]:
    # 20 analysts of 4 agencies across two months: only the lifetime row is shared by all.
    now = datetime(2026, 11, 30, 23, 59, tzinfo=timezone.utc) + timedelta(minutes=i % 2 * 2)
    return scopes_for(DS, f"analyst-{i % 20}", f"agency-{i % 4}", now)


@pytest.mark.slow
@pytest.mark.parametrize("tight, request_scopes, defaults", [
    (ANALYST, _same_analyst, CapDefaults(1_000_000, HUGE, HUGE, HUGE)),
    (LIFETIME, _many_analysts_two_months, CapDefaults(HUGE, HUGE, HUGE, 1_000_000)),
], ids=["analyst-cap", "lifetime-cap"])
def test_200_simultaneous_requests_release_exactly_what_fits(
        db_engine: Engine, tight: str, request_scopes: Callable[[int], list[Scope]],
        defaults: CapDefaults) -> None:
    """200 threads each spend 0.1 against a tightest cap of 1: exactly 10 succeed.

    Check-then-charge would let most of them through (GOVERNANCE.md measured 5.0
    released against 1.0); the conditional UPDATE lets exactly 10, on both databases.
    """
    outcomes = _hammer(db_engine, [request_scopes(i) for i in range(200)], defaults)
    assert (outcomes.count("ok"), outcomes.count("refused")) == (10, 190)
    assert _spent(db_engine, tight) == 1_000_000  # exactly at its cap
    for kind in (ANALYST, AGENCY, DATASET, LIFETIME):
        assert _spent(db_engine, kind) == 10 * TENTH  # every scope was charged by the 10, and only them
    rows, entries = _state(db_engine)
    assert entries == 10 * 4
    assert all(b.spent_micro <= b.cap_micro for b in rows)
    sums = _entries_sum_by_budget(db_engine)
    assert all(sums.get(b.budget_id, 0) == b.spent_micro for b in rows)


# -- concurrency: processes -------------------------------------------------------------------

#: A small "server process": its own engine and threads, started on a signal, reporting counts.
WORKER = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from civicdp.server.state.db import make_engine, session_scope
from civicdp.server.state.budget_scopes import CapDefaults, scopes_for
from civicdp.server.state.ledger import BudgetRefused, charge

url, sync, name, attempts, threads = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
defaults = CapDefaults(10**12, 10**12, 10**12, 2_000_000)  # lifetime 2: twenty charges of 0.1
now = datetime(2026, 11, 15, tzinfo=timezone.utc)
engine = make_engine(url)

def request(i):
    scopes = scopes_for("civic-demo", f"{name}-analyst-{i % 3}", "health", now)
    try:
        with session_scope(engine) as session:
            charge(session, "civic-demo", scopes, 100_000, defaults=defaults)
    except BudgetRefused:
        return False
    return True

try:
    (sync / f"{name}.ready").touch()
    deadline = time.monotonic() + 60
    while not (sync / "go").exists():
        if time.monotonic() > deadline:
            sys.exit("no go signal")
        time.sleep(0.002)
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(request, range(attempts)))
finally:
    engine.dispose()
print(json.dumps({"ok": sum(results), "refused": len(results) - sum(results)}))
"""


@pytest.mark.slow
def test_two_server_processes_sharing_one_database_never_overspend(db_engine: Engine, tmp_path: Path) -> None:
    """Two processes, 8 threads each, 100 attempts each, one lifetime cap of 2: exactly 20 succeed."""
    url = db_engine.url.render_as_string(hide_password=False)
    reports = race(WORKER, tmp_path, {name: [url, str(tmp_path), name, "100", "8"] for name in ("server-a", "server-b")})
    assert sum(r["ok"] for r in reports) == 20
    assert sum(r["refused"] for r in reports) == 180
    assert _spent(db_engine, LIFETIME) == 2_000_000
    rows, entries = _state(db_engine)
    assert entries == 20 * 4
    assert all(b.spent_micro <= b.cap_micro for b in rows)
    sums = _entries_sum_by_budget(db_engine)
    assert all(sums.get(b.budget_id, 0) == b.spent_micro for b in rows)
