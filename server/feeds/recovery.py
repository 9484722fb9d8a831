"""Recovery of crashed claims: periods charged by a process that stopped before storing the release.

Such a claim stays ``charged`` with nothing released. :func:`recover` (run before every
scheduler check, so at start-up too, and before a steward's trigger) marks the claims
charged longer than the claim timeout ago as ``failed`` with :data:`STALE_REASON` and a
``feed.abandoned`` audit entry; the charge stands. A late result of such a claim is
discarded when it tries to store itself (the claim is no longer ``charged``).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from sqlalchemy import update
from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session, select

from civicdp.server.auditlog.append import record
from civicdp.server.feeds.outcomes import STALE_REASON
from civicdp.server.state.db import reader, session_scope
from civicdp.server.state.feed_models import CHARGED, FAILED, Feed, FeedClaim, aware

logger = logging.getLogger("civicdp.feeds")


def recover(db: DbEngine, claim_timeout: timedelta, now: datetime | None = None) -> int:
    """Mark claims charged longer than ``claim_timeout`` ago, never released, as failed (the
    charge stands), each with an audit entry; how many."""
    now = now or datetime.now(timezone.utc)
    with Session(reader(db)) as session:
        stale = [c for c in session.exec(select(FeedClaim).where(FeedClaim.state == CHARGED))
                 if aware(c.charged_at) < now - claim_timeout]
        feeds = {f.id: (f.name, f.dataset) for f in session.exec(select(Feed))} if stale else {}
    recovered = 0
    for claim in stale:
        with session_scope(db) as session:
            moved = session.execute(update(FeedClaim).where(
                FeedClaim.id == claim.id, FeedClaim.attempt == claim.attempt, FeedClaim.state == CHARGED,
            ).values(state=FAILED, reason=STALE_REASON, finished_at=now)).rowcount
            if moved:
                recovered += 1
                name, dataset = feeds[claim.feed_id]
                record(session, None, "feed.abandoned", f"feed:{name}", "failed",
                       reason=STALE_REASON, dataset=dataset, feed=name,
                       number=claim.number, period=claim.period, origin=claim.origin, attempt=claim.attempt,
                       charge_seq=claim.charge_seq, charged_micro=claim.loss_micro, loss_micro=0,
                       charged_at=aware(claim.charged_at))
    if recovered:
        logger.warning("feeds: %d charged release(s) never stored, marked failed", recovered)
    return recovered
