"""Reading feeds: which a consumer may read, a release's signed bytes, the JSON Feed index, CSV.

Reading a release costs nothing: it is the stored bytes, exactly as signed.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone
from typing import Any

from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session, select

from civicdp.policies.actions import Action
from civicdp.policies.enforcer import PolicyStore
from civicdp.privacy.loss import MICRO
from civicdp.server.feeds.outcomes import release_url
from civicdp.server.feeds.schedule import next_release_at, schedule_of
from civicdp.server.feeds.schemas import FeedSummary
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import reader
from civicdp.server.state.errors import InvalidRequest, NotFound
from civicdp.server.state.feed_models import Feed, FeedRelease, aware, feed_named
from civicdp.server.state.models import Release


def readable(db: DbEngine, policies: PolicyStore, caller: Caller, now: datetime | None = None) -> list[FeedSummary]:
    """The feeds ``caller`` may read (decided by the policy store, feed by feed)."""
    now = now or datetime.now(timezone.utc)
    with Session(reader(db)) as session:
        feeds = list(session.exec(select(Feed).order_by(Feed.name)))
        out = []
        for feed in feeds:
            if not policies.check(caller.subject, caller.agency, f"feed:{feed.name}", Action.FEED_READ).allowed:
                continue
            numbers = list(session.exec(select(FeedRelease.number).where(FeedRelease.feed_id == feed.id)))
            out.append(FeedSummary(name=feed.name, dataset=feed.dataset, schedule=feed.schedule,
                                   releases=feed.releases, produced=len(numbers),
                                   latest=max(numbers) if numbers else None,
                                   next_release_at=next_release_at(feed, numbers, now),
                                   epsilon_per_release=feed.loss_micro / MICRO, url=f"/v1/feeds/{feed.name}"))
    return out


def release(db: DbEngine, name: str, which: str) -> tuple[Feed, FeedRelease, bytes]:
    """The feed, the release (``latest`` or its number) and its signed bytes; NotFound if none."""
    with Session(reader(db)) as session:
        feed = feed_named(session, name)
        query = select(FeedRelease).where(FeedRelease.feed_id == feed.id)
        if which == "latest":
            row = session.exec(query.order_by(FeedRelease.number.desc())).first()  # type: ignore[attr-defined]
            if row is None:
                raise NotFound(f"feed '{name}' has no release yet; its first is due at "
                               f"{schedule_of(feed).time_of(1):%Y-%m-%d %H:%M} UTC")
        else:
            if not which.isdigit() or not 1 <= int(which) <= 10**6:
                raise InvalidRequest("release", f"{which[:40]!r} is not a release number",
                                     "Ask for 'latest' or a release number (1, 2, ...)")
            row = session.exec(query.where(FeedRelease.number == int(which))).first()
            if row is None:
                raise NotFound(f"feed '{name}' has no release {int(which)}")
        stored = session.get(Release, row.release_id)
        if stored is None:  # defensive: both rows are written in one transaction
            raise NotFound(f"release {row.number} of feed '{name}' is missing its document")
        session.expunge(feed)
        session.expunge(row)
        return feed, row, stored.result_json.encode()


def index(db: DbEngine, name: str, base_url: str, public_key: str) -> dict[str, Any]:
    """The feed's releases as a JSON Feed 1.1 document (newest first), with civicdp extensions."""
    with Session(reader(db)) as session:
        feed = feed_named(session, name)
        rows = list(session.exec(select(FeedRelease).where(FeedRelease.feed_id == feed.id)
                                 .order_by(FeedRelease.number.desc())))  # type: ignore[attr-defined]
    upcoming = next_release_at(feed, [row.number for row in rows], datetime.now(timezone.utc))
    base = base_url.rstrip("/")
    return {
        "version": "https://jsonfeed.org/version/1.1",
        "title": f"civicdp feed {feed.name}",
        "home_page_url": f"{base}/docs",
        "feed_url": f"{base}/v1/feeds/{feed.name}",
        "description": f"{feed.schedule} differentially private releases of dataset {feed.dataset}, "
                       f"signed with Ed25519",
        "items": [{
            "id": f"{feed.name}/{row.number}",
            "url": f"{base}{release_url(feed.name, row.number)}",
            "title": f"{feed.name} release {row.number} of {feed.releases} ({row.period})",
            "content_text": f"Release {row.number} of feed {feed.name} for period {row.period}: "
                            f"epsilon {row.loss_micro / MICRO:g}, SHA-256 {row.sha256}",
            "date_published": aware(row.created_at).isoformat(),
            "_civicdp": {"number": row.number, "period": row.period, "sha256": row.sha256,
                         "signature": row.signature, "loss_micro": row.loss_micro,
                         "csv_url": f"{base}{release_url(feed.name, row.number)}?format=csv",
                         "signature_url": f"{base}{release_url(feed.name, row.number)}/signature"},
        } for row in rows],
        "_civicdp": {"dataset": feed.dataset, "schedule": feed.schedule, "cron": feed.cron,
                     "releases": feed.releases, "loss_micro_per_release": feed.loss_micro,
                     "next_release_at": upcoming.isoformat() if upcoming else None,
                     "public_key": public_key},
    }


def release_csv(data: bytes, query: int = 0, table: str = "main") -> str:
    """One table of a release as CSV (derived from the signed JSON, which is what verifies)."""
    document = json.loads(data)
    results = document["results"]
    if not 0 <= query < len(results):
        raise InvalidRequest("query", f"the release has {len(results)} results, numbered from 0",
                             f"Ask for query=0 to {len(results) - 1}")
    result = results[query]
    part = result if table == "main" else result.get("tables", {}).get(table)
    if part is None:
        raise InvalidRequest("table", f"result {query} has no table {table[:40]!r}",
                             f"Ask for one of {['main', *result.get('tables', {})]}")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(part["columns"])
    for row in part["rows"]:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in part["columns"]])
    return out.getvalue()
