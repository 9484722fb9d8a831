"""The in-process feed scheduler: APScheduler checks for due releases, the database decides who makes them.

Every ``feeds_check_seconds`` (and once at start-up, which is the catch-up after
downtime) a background job runs :meth:`civicdp.server.feeds.service.FeedService.run_due`: first the
claims a stopped process left charged but unreleased for longer than the claim timeout
are marked failed (audited; their charges stay), then every release whose time has
passed and whose period was never claimed or refused is produced now. The schedule is
computed from each feed's definition, not kept in APScheduler's job store, so every
server process agrees on the periods; two processes over one database may both try a
period, but the unique ``(feed, period)`` claim, inserted before the charge, lets only
one of them charge and read the data — the other loses at the claim and moves on. A
period charged once (released or failed) is never tried again by the scheduler.
``max_instances=1`` keeps one check at a time per process; ``coalesce`` folds missed
checks into one. ``CIVICDP_FEEDS_SCHEDULER=false`` turns it off (the test suite drives
``run_due``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from civicdp.server.auditlog.alarms import AuditLogFailed
from civicdp.server.feeds.service import FeedService

logger = logging.getLogger("civicdp.feeds")


def _check(service: FeedService) -> None:
    try:
        service.run_due()
    except Exception:  # noqa: BLE001 - the next check retries; never kill the scheduler thread
        logger.exception("feed check failed; retrying at the next check")


@dataclass
class FeedScheduler:
    """A started scheduler and the service its checks run."""

    scheduler: BackgroundScheduler
    service: FeedService


def start_feeds(state: Any) -> FeedScheduler | None:
    """Start checking for due feed releases in the background; None when turned off."""
    settings = state.settings
    service = FeedService.of(state)
    # Claims a crash left charged but unreleased are recorded as failed at every start, also
    # when this process does not schedule (another may, or a steward triggers by hand).
    try:
        service.recover()
    except AuditLogFailed:  # the log is frozen: nothing can be recorded until it verifies again
        logger.warning("feed claims left by a crash are not recovered: the audit log is frozen")
    if not settings.feeds_scheduler:
        return None
    scheduler = BackgroundScheduler(timezone=timezone.utc)
    scheduler.add_job(_check, IntervalTrigger(seconds=settings.feeds_check_seconds, timezone=timezone.utc),
                      args=[service], id="civicdp-feeds", max_instances=1, coalesce=True,
                      next_run_time=datetime.now(timezone.utc))
    scheduler.start()
    return FeedScheduler(scheduler, service)


def stop_feeds(started: FeedScheduler | None) -> None:
    """Stop the scheduler: a running check ends after its current release (stored, or recorded as failed)."""
    if started is not None:
        started.service.stopping.set()
        started.scheduler.shutdown(wait=True)
