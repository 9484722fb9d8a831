"""What stewards and oversight see of feeds: schedule, agencies, spend so far and planned spend,
refusals, failures and periods charged but not released (``GET /v1/feeds/overview``,
``civicdp feeds list``)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session, select

from civicdp.server.feeds.schedule import next_release_at, schedule_of
from civicdp.server.feeds.schemas import FeedOverview
from civicdp.server.state import ledger
from civicdp.server.state.db import reader
from civicdp.server.state.feed_models import CHARGED, FAILED, Feed, FeedClaim, FeedRefusal, FeedRelease, aware, feed_named


def overview(db: DbEngine, caps: ledger.CapDefaults, now: datetime | None = None) -> list[FeedOverview]:
    """Every feed: schedule, agencies, what it spent and what it will spend, the latest refusal."""
    now = now or datetime.now(timezone.utc)
    with Session(reader(db)) as session:
        names = list(session.exec(select(Feed.name).order_by(Feed.name)))
    return [overview_of(db, caps, name, now) for name in names]


def overview_of(db: DbEngine, caps: ledger.CapDefaults, name: str, now: datetime | None = None) -> FeedOverview:
    now = now or datetime.now(timezone.utc)
    with Session(reader(db)) as session:
        feed = feed_named(session, name)
        made = session.execute(select(FeedRelease.number, FeedRelease.period)
                               .where(FeedRelease.feed_id == feed.id)).all()
        released = {period for _, period in made}
        refusals = list(session.exec(select(FeedRefusal).where(FeedRefusal.feed_id == feed.id)
                                     .order_by(FeedRefusal.id)))  # type: ignore[arg-type]
        claims = list(session.exec(select(FeedClaim).where(FeedClaim.feed_id == feed.id)
                                   .order_by(FeedClaim.id)))  # type: ignore[arg-type]
        (allocation,) = ledger.statuses(session, feed.dataset, [
            ledger.Scope(ledger.FEED, feed.name, ledger.LIFETIME_PERIOD)], defaults=caps)
    schedule = schedule_of(feed)
    # Each period not released counts once, by its latest outcome; a charged claim counts as charged.
    pending = {c.period for c in claims if c.state == CHARGED}
    refused_at = {r.period: aware(r.created_at) for r in refusals}
    failures = [c for c in claims if c.state == FAILED and c.period not in released | pending
                and not refused_at.get(c.period, aware(c.charged_at)) > aware(c.finished_at or c.charged_at)]
    failed = {c.period for c in failures}
    last = refusals[-1] if refusals else None
    last_failure = max(failures, key=lambda c: aware(c.finished_at or c.charged_at), default=None)
    return FeedOverview(
        name=feed.name, dataset=feed.dataset, schedule=feed.schedule, cron=feed.cron, start=aware(feed.start),
        end=schedule.end, agencies=json.loads(feed.agencies_json), active=feed.active, releases=feed.releases,
        produced=len(released), refused=len(set(refused_at) - released - pending - failed),
        failed=len(failed), charged_not_released=len(pending),
        loss_micro_per_release=feed.loss_micro, announced_micro=feed.total_micro,
        spent_micro=allocation.spent_micro,
        planned_micro=max(feed.releases - len(released) - len(pending), 0) * feed.loss_micro,
        next_release_at=next_release_at(feed, [number for number, _ in made], now),
        last_refusal=None if last is None else {"number": last.number, "period": last.period,
                                                "time": aware(last.created_at).isoformat(),
                                                "origin": last.origin, "reason": last.reason},
        last_failure=None if last_failure is None else {
            "number": last_failure.number, "period": last_failure.period, "attempt": last_failure.attempt,
            "charged_at": aware(last_failure.charged_at).isoformat(),
            "time": aware(last_failure.finished_at or last_failure.charged_at).isoformat(),
            "origin": last_failure.origin, "charged_micro": last_failure.loss_micro,
            "reason": last_failure.reason},
        created_at=aware(feed.created_at), created_by=feed.created_by)
