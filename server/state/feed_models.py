"""What the server stores about feeds (SQLModel): definitions, approvals, claims, releases and refusals.

A period is produced in two transactions (server/feeds/periods.py charges it,
server/feeds/release.py stores it). The first inserts the
period's :class:`FeedClaim` — unique ``(feed_id, period)``, so a second process loses
here, before charging or reading anything — charges the budgets and writes the audit
entry. Only after it commits is the data read. The second stores the release: its
canonical bytes in the ``release`` table (the same table as query answers; the claim's
ledger entries are then pointed at it) and its signature in :class:`FeedRelease`, and
marks the claim ``released``. A computation that fails marks the claim ``failed`` (its
charge stays); a claim left ``charged`` by a process that stopped is marked ``failed``
after a timeout. :class:`FeedApproval` freezes what a feed's loss and sensitivity
depend on when it is defined. Refusals (nothing charged) are kept apart, one per
attempt. Every table here is created by ``create_all``; none added a column to an
existing table.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import BigInteger, Column, Text, UniqueConstraint
from sqlmodel import Field, Session, SQLModel, select

from civicdp.server.state.errors import NotFound
from civicdp.server.state.models import utcnow


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


class FeedApproval(SQLModel, table=True):
    """What a feed was approved for, fixed at its definition: the loss per release and a
    fingerprint of everything its sensitivity depends on (see ``civicdp.server.feeds.approval.approval_basis``)."""

    id: int | None = Field(default=None, primary_key=True)
    feed_id: int = Field(foreign_key="feed.id", unique=True)
    dataset_version: str = Field(max_length=100)  # the version the specs were planned against
    loss_micro: int = Field(sa_column=Column(BigInteger, nullable=False))
    fingerprint: str = Field(max_length=64)  # SHA-256 of the canonical basis
    basis_json: str = Field(sa_column=Column(Text, nullable=False))  # the basis itself, to name what changed
    created_at: datetime = Field(default_factory=utcnow)


#: States of a claim: charged (the data may be being read), released, failed (charge kept).
CHARGED, RELEASED, FAILED = "charged", "released", "failed"


class FeedClaim(SQLModel, table=True):
    """A period claimed and charged before its data is read; at most one per period.

    ``attempt`` counts the charged attempts (a steward may try a failed period again,
    and pays again); the audit log holds every attempt, this row the latest.
    """

    __table_args__ = (UniqueConstraint("feed_id", "period"),)
    id: int | None = Field(default=None, primary_key=True)
    feed_id: int = Field(foreign_key="feed.id", index=True)
    number: int
    period: str = Field(max_length=40)
    attempt: int = 1
    state: str = Field(default=CHARGED, max_length=20)  # charged | released | failed
    dataset_version: str = Field(max_length=100)
    loss_micro: int = Field(sa_column=Column(BigInteger, nullable=False))
    origin: str = Field(max_length=20)
    charge_seq: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))  # its audit entry
    ledger_json: str = Field(default="[]", sa_column=Column(Text, nullable=False, default="[]"))  # entry ids
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # fixed text, when failed
    charged_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


class FeedRefusal(SQLModel, table=True):
    """An attempt refused before any charge (a budget scope lacked room, a spec or the dataset's metadata
    no longer fits what the feed was approved for)."""

    __table_args__ = (UniqueConstraint("feed_id", "period", "attempt"),)
    id: int | None = Field(default=None, primary_key=True)
    feed_id: int = Field(foreign_key="feed.id", index=True)
    number: int
    period: str = Field(max_length=40)
    attempt: int  # 0: the scheduler's (once per period); 1, 2, ...: a steward's triggers
    reason: str = Field(sa_column=Column(Text, nullable=False))
    origin: str = Field(max_length=20)
    created_at: datetime = Field(default_factory=utcnow)


def feed_named(session: Session, name: str) -> Feed:
    """The feed called ``name``; NotFound if there is none."""
    feed = session.exec(select(Feed).where(Feed.name == name)).first()
    if feed is None:
        raise NotFound(f"no feed named '{name}'")
    return feed


def aware(when: datetime) -> datetime:
    """A stored time with its time zone (a database without time zones gives it back naive: UTC)."""
    return when.replace(tzinfo=timezone.utc) if when.utcoffset() is None else when
