"""Claiming and charging a feed's period, and recording the attempts that end without a release.

A period is claimed and charged in ONE transaction (:func:`claim`): the unique
``(feed, period)`` :class:`FeedClaim` row is inserted first — a second process or
steward producing the same period loses here, before charging or computing anything —
then the feed allocation, the dataset's month and the dataset's lifetime are charged
and the ``feed.charge`` audit entry is written. Only after that commit is the data read.

An attempt refused before the charge is stored as a :class:`FeedRefusal` (once per
scheduler period, once per steward trigger) with a ``feed.release`` "refused" entry
(:func:`refuse`). A charged attempt that fails keeps its charge: the claim is marked
``failed`` with a fixed reason and a ``feed.failed`` entry against the charge (:func:`fail`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NoReturn

from sqlalchemy import func, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session, select

from civicdp.privacy.loss import MICRO
from civicdp.server.auditlog.append import record
from civicdp.server.feeds.outcomes import SCHEDULER, STEWARD, FeedBusy, FeedFailed, FeedRefused, ReleaseView
from civicdp.server.state import ledger
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import reader, session_scope
from civicdp.server.state.feed_models import CHARGED, FAILED, Feed, FeedClaim, FeedRefusal, FeedRelease
from civicdp.server.state.models import Dataset


@dataclass(frozen=True)
class Claim:
    """A period claimed and charged: what the later steps refer to."""

    id: int
    attempt: int
    number: int
    period: str
    loss_micro: int
    origin: str
    charge_seq: int
    ledger_ids: tuple[int, ...]


class _Lost(Exception):
    """Another producer holds the period's claim."""


def feed_scopes(feed: str, now: datetime) -> list[ledger.Scope]:
    """What one release of ``feed`` is charged to: its allocation, the dataset's month and lifetime."""
    return [ledger.Scope(ledger.FEED, feed, ledger.LIFETIME_PERIOD),
            ledger.Scope(ledger.DATASET, ledger.ANY, ledger.period_of(now)),
            ledger.Scope(ledger.LIFETIME, ledger.ANY, ledger.LIFETIME_PERIOD)]


def insert_ignoring_duplicates(session: Session, model: type, row: dict[str, Any], keys: list[str]) -> int:
    """Insert ``row`` unless one with the same ``keys`` exists: 1 if inserted, 0 if not.

    Core on the table with RETURNING, not the ORM's insert of the model: through the ORM's
    bulk path, a PostgreSQL ``ON CONFLICT DO NOTHING`` that inserted nothing can still report
    a row count, and two producers would both think they hold a period's claim."""
    dialect = session.get_bind().dialect.name
    builder = postgresql.insert if dialect == "postgresql" else sqlite.insert
    table = model.__table__  # type: ignore[attr-defined]
    inserted = session.connection().execute(builder(table).values(**row).on_conflict_do_nothing(
        index_elements=keys).returning(table.c.id)).first()
    return 0 if inserted is None else 1


def claim(db: DbEngine, caps: ledger.CapDefaults, feed: Feed, number: int, period: str, row: Dataset, loss: int,
          scopes: list[ledger.Scope], caller: Caller | None, origin: str, now: datetime) -> Claim | ReleaseView:
    """ONE transaction: claim the period, charge every scope, write the charge's audit entry.

    The claim comes first, so a second producer of the period loses before charging anything:
    FeedBusy, or the stored release if the winner has finished."""
    account_id = caller.account_id if caller else None
    try:
        with session_scope(db) as session:
            claimed = insert_ignoring_duplicates(session, FeedClaim, {
                "feed_id": feed.id, "number": number, "period": period, "attempt": 1, "state": CHARGED,
                "dataset_version": row.version, "loss_micro": loss, "origin": origin, "ledger_json": "[]",
                "charged_at": now}, ["feed_id", "period"])
            if not claimed and origin == STEWARD:
                # A steward's explicit trigger tries a failed period again: a new attempt, charged again.
                claimed = int(session.execute(update(FeedClaim).where(
                    FeedClaim.feed_id == feed.id, FeedClaim.period == period, FeedClaim.state == FAILED,
                ).values(attempt=FeedClaim.attempt + 1, state=CHARGED, number=number, origin=origin,
                         dataset_version=row.version, loss_micro=loss, charged_at=now, finished_at=None,
                         reason=None, charge_seq=None, ledger_json="[]")).rowcount)
            if not claimed:
                raise _Lost
            held = session.exec(select(FeedClaim).where(FeedClaim.feed_id == feed.id,
                                                        FeedClaim.period == period)).one()
            charges = ledger.charge(session, row.name, scopes, loss, defaults=caps, account_id=account_id)
            entry = record(session, caller, "feed.charge", f"feed:{feed.name}", dataset=row.name,
                           dataset_version=row.version, feed=feed.name, number=number, period=period,
                           origin=origin, attempt=held.attempt, loss_micro=loss,
                           ledger=[{"budget_id": c.budget_id, "before_micro": c.spent_before_micro,
                                    "after_micro": c.spent_after_micro} for c in charges])
            ids = tuple(int(c.id) for c in charges if c.id is not None)
            held.charge_seq, held.ledger_json = entry.seq, json.dumps(list(ids))
            session.add(held)
            session.flush()
            return Claim(int(held.id), held.attempt, number, period, loss, origin, entry.seq, ids)  # type: ignore[arg-type]
    except ledger.BudgetRefused as refused:  # the claim rolled back with the charge: nothing spent
        refuse(db, feed, number, period, caller, origin, str(refused), refused)
    except _Lost:
        pass
    with Session(reader(db)) as session:
        existing = session.exec(select(FeedRelease).where(FeedRelease.feed_id == feed.id,
                                                          FeedRelease.period == period)).first()
        if existing is not None:
            return ReleaseView.of(feed, existing)
        other = session.exec(select(FeedClaim).where(FeedClaim.feed_id == feed.id,
                                                     FeedClaim.period == period)).first()
    if other is not None and other.state == FAILED:
        raise FeedBusy(f"release {number} of feed '{feed.name}' (period {period}) failed after its charge; "
                       "the scheduler does not try it again: a steward may trigger it (charged again)")
    raise FeedBusy(f"release {number} of feed '{feed.name}' (period {period}) is being produced by another "
                   "process or steward; it is charged once. Ask again in a moment")


def refuse(db: DbEngine, feed: Feed, number: int, period: str, caller: Caller | None, origin: str, reason: str,
           budget: ledger.BudgetRefused | None = None, rule: list[str] | None = None) -> NoReturn:
    """Store and record the refusal (once per scheduler period), then raise FeedRefused; nothing is charged."""
    with session_scope(db) as session:
        if origin == SCHEDULER:
            attempt = 0
        else:
            latest = session.execute(select(func.max(FeedRefusal.attempt)).where(
                FeedRefusal.feed_id == feed.id, FeedRefusal.period == period)).scalar_one_or_none()
            attempt = (latest or 0) + 1
        inserted = insert_ignoring_duplicates(session, FeedRefusal, {
            "feed_id": feed.id, "number": number, "period": period, "attempt": attempt, "reason": reason,
            "origin": origin, "created_at": datetime.now(timezone.utc)}, ["feed_id", "period", "attempt"])
        if inserted:
            record(session, caller, "feed.release", f"feed:{feed.name}", "refused", reason=reason,
                   dataset=feed.dataset, feed=feed.name, number=number, period=period, origin=origin,
                   loss_micro=0, rule=rule)
    raise FeedRefused(f"release {number} of feed '{feed.name}' (period {period}) was not produced: {reason}",
                      budget, rule)


def failed_text(feed: Feed, claimed: Claim, reason: str) -> str:
    return (f"release {claimed.number} of feed '{feed.name}' (period {claimed.period}) was charged epsilon "
            f"{claimed.loss_micro / MICRO:g} and not produced: {reason}")


def fail(db: DbEngine, feed: Feed, claimed: Claim, caller: Caller | None, reason: str, now: datetime) -> NoReturn:
    """Mark the claim failed with a fixed reason and record it against its charge; raise FeedFailed."""
    with session_scope(db) as session:
        moved = session.execute(update(FeedClaim).where(
            FeedClaim.id == claimed.id, FeedClaim.attempt == claimed.attempt, FeedClaim.state == CHARGED,
        ).values(state=FAILED, reason=reason, finished_at=now)).rowcount
        if moved:
            record(session, caller, "feed.failed", f"feed:{feed.name}", "failed", reason=reason,
                   dataset=feed.dataset, feed=feed.name, number=claimed.number, period=claimed.period,
                   origin=claimed.origin, attempt=claimed.attempt, charge_seq=claimed.charge_seq,
                   charged_micro=claimed.loss_micro, loss_micro=0)
    raise FeedFailed(failed_text(feed, claimed, reason))
