"""What the server stores about feeds (SQLModel): definitions, releases and refusals.

A release is stored once: its canonical bytes in the ``release`` table (the same table
as query answers, so the ledger's charges point at it) and its signature here. The
unique constraint on ``(feed_id, period)`` is what makes a period's release happen
exactly once, whichever process or steward produces it: a second insert fails and its
transaction (with its charge) rolls back. Refusals are kept apart, one per attempt.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from server.models import utcnow


class Feed(SQLModel, table=True):
    """A feed's definition, fixed when it is defined (only its agencies and ``active`` change)."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=100)
    dataset: str = Field(index=True, max_length=100)
    specs_json: str = Field(sa_column=Column(Text, nullable=False))  # canonical JSON list of specs
    schedule: str = Field(max_length=100)  # as the steward wrote it: daily, weekly, monthly or cron
    cron: str = Field(max_length=100)  # the crontab it stands for (UTC)
    start: datetime
    releases: int  # announced number of releases
    loss_micro: int = Field(sa_column=Column(BigInteger, nullable=False))  # per release
    total_micro: int = Field(sa_column=Column(BigInteger, nullable=False))  # announced total
    agencies_json: str = Field(sa_column=Column(Text, nullable=False))  # sorted JSON list
    created_at: datetime = Field(default_factory=utcnow)
    created_by: str | None = Field(default=None, max_length=100)
    active: bool = True


class FeedRelease(SQLModel, table=True):
    """One produced release of a feed: immutable, and at most one per period."""

    __table_args__ = (UniqueConstraint("feed_id", "period"), UniqueConstraint("feed_id", "number"))
    id: int | None = Field(default=None, primary_key=True)
    feed_id: int = Field(foreign_key="feed.id", index=True)
    number: int  # 1..releases: the period's place in the announced schedule
    period: str = Field(max_length=40)  # the scheduled time, ISO UTC ("2026-02-02T00:00:00Z")
    release_id: int | None = Field(default=None, foreign_key="release.id")
    sha256: str = Field(default="", max_length=64)  # of the canonical bytes: the ETag
    signature: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    loss_micro: int = Field(sa_column=Column(BigInteger, nullable=False))
    origin: str = Field(max_length=20)  # scheduler | steward
    created_at: datetime = Field(default_factory=utcnow)


class FeedRefusal(SQLModel, table=True):
    """An attempt that produced nothing (a budget scope lacked room, a spec no longer fits)."""

    __table_args__ = (UniqueConstraint("feed_id", "period", "attempt"),)
    id: int | None = Field(default=None, primary_key=True)
    feed_id: int = Field(foreign_key="feed.id", index=True)
    number: int
    period: str = Field(max_length=40)
    attempt: int  # 0: the scheduler's (once per period); 1, 2, ...: a steward's triggers
    reason: str = Field(sa_column=Column(Text, nullable=False))
    origin: str = Field(max_length=20)
    created_at: datetime = Field(default_factory=utcnow)
