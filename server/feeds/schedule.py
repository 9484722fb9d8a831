"""A feed's schedule: the announced release times, computed from a cron expression in UTC.

``daily``, ``weekly`` and ``monthly`` stand for ``0 0 * * *``, ``0 0 * * mon`` and
``0 0 1 * *``; anything else must be a five-field crontab (minute hour day month
weekday), parsed by APScheduler's ``CronTrigger``. A feed announces ``releases``
release times: the first ``releases`` times the expression fires at or after
``start``. Release *k* (1-based) is due once its time has passed; its **period** is
that time, written ``2026-02-02T00:00:00Z``. The schedule is a pure function of the
definition, so every server process computes the same periods and the database's
unique ``(feed, period)`` constraint can keep each one to a single release.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache

from apscheduler.triggers.cron import CronTrigger

from civicdp.server.state.errors import InvalidRequest
from civicdp.server.state.feed_models import Feed

NAMED = {"daily": "0 0 * * *", "weekly": "0 0 * * mon", "monthly": "0 0 1 * *"}
MAX_RELEASES = 1000
_TICK = timedelta(microseconds=1)


def period_label(when: datetime) -> str:
    """``2026-02-02T00:00:00Z``: a release time as the period's name."""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=timezone.utc) if when.utcoffset() is None else when.astimezone(timezone.utc)


@dataclass(frozen=True)
class Schedule:
    """The announced release times of one feed."""

    text: str
    cron: str
    start: datetime
    releases: int
    times: tuple[datetime, ...] = field(repr=False)

    def due(self, now: datetime) -> list[tuple[int, datetime]]:
        """``(number, time)`` of every announced release whose time is at or before ``now``."""
        count = bisect_right(self.times, _utc(now))
        return [(i + 1, t) for i, t in enumerate(self.times[:count])]

    def time_of(self, number: int) -> datetime:
        return self.times[number - 1]

    def next_after(self, now: datetime, released: Collection[int] = ()) -> datetime | None:
        """The first announced time after ``now`` whose release (by number) is not in ``released``
        (None once the announcement is used up). A steward's trigger can make a release before
        its time: that period is then not the next one."""
        for index in range(bisect_right(self.times, _utc(now)), len(self.times)):
            if index + 1 not in released:
                return self.times[index]
        return None

    def most_in_one_month(self) -> int:
        """The largest number of announced releases in one calendar month (UTC)."""
        return max(Counter((t.year, t.month) for t in self.times).values())

    @property
    def end(self) -> datetime:
        return self.times[-1]


def parse_schedule(text: object, start: datetime, releases: object) -> Schedule:
    """The schedule ``text`` announcing ``releases`` releases from ``start``; InvalidRequest if it cannot be."""
    if not isinstance(text, str) or not text.strip() or len(text) > 100:
        raise InvalidRequest("schedule", "the schedule is missing or too long",
                             "Write daily, weekly, monthly or a cron expression such as '0 6 * * mon'")
    if isinstance(releases, bool) or not isinstance(releases, int) or not 1 <= releases <= MAX_RELEASES:
        raise InvalidRequest("releases", f"{releases!r} is not a number of releases from 1 to {MAX_RELEASES}",
                             "Announce how many releases the feed will make, e.g. 52 for a year of weekly releases")
    cron = NAMED.get(text.strip().lower(), text.strip())
    try:
        trigger = CronTrigger.from_crontab(cron, timezone=timezone.utc)
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidRequest("schedule", f"{text!r} cannot be parsed ({exc})",
                             "Write daily, weekly, monthly or five cron fields: minute hour day month weekday, "
                             "e.g. '0 6 * * mon' for Mondays at 06:00 UTC") from None
    start = _utc(start)
    times: list[datetime] = []
    when = trigger.get_next_fire_time(None, start)
    while when is not None and len(times) < releases:
        times.append(when.astimezone(timezone.utc))
        when = trigger.get_next_fire_time(when, when + _TICK)
    if len(times) < releases:
        raise InvalidRequest("schedule", f"{text!r} fires only {len(times)} times after {start:%Y-%m-%d}, "
                             f"not the {releases} releases announced",
                             "Check the day and month fields (e.g. 30 February never comes)")
    return Schedule(text.strip(), cron, start, releases, tuple(times))


@lru_cache(maxsize=256)
def _schedule(text: str, start: datetime, releases: int) -> Schedule:
    return parse_schedule(text, start, releases)


def schedule_of(feed: Feed) -> Schedule:
    """The schedule of a stored feed (cached: it is a pure function of the definition)."""
    start = feed.start if feed.start.utcoffset() is not None else feed.start.replace(tzinfo=timezone.utc)
    return _schedule(feed.schedule, start, feed.releases)


def next_release_at(feed: Feed, released: Iterable[int], now: datetime) -> datetime | None:
    """When ``feed``'s next release is due: the first announced time after ``now`` not released yet
    (``released``: the numbers made so far); None for a stopped feed or a used-up announcement.

    Only times after ``now``: a past period not released is either caught up at the
    scheduler's next check or was refused or failed (a steward's trigger tries it again)."""
    return schedule_of(feed).next_after(now, set(released)) if feed.active else None
