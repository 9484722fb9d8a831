"""What an attempt at a feed's period ends in: a release, a refusal (nothing charged), a failure
after the charge (the charge stands), or another producer holding the period.

The texts of failures are fixed (:data:`FAILED_REASON`, :data:`STALE_REASON`): an
exception's message could quote a value from the data, so it is never recorded or answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from civicdp.privacy.loss import MICRO
from civicdp.server.feeds.schemas import FeedReleaseOut
from civicdp.server.state import ledger
from civicdp.server.state.errors import Conflict
from civicdp.server.state.feed_models import Feed, FeedRelease, aware

#: Who asked for a period: the scheduler (once per period) or a steward's trigger.
SCHEDULER, STEWARD = "scheduler", "steward"
#: The one text a charged release that failed is recorded and answered with. Fixed, so it
#: says nothing about the data (an exception's message can quote a value from it).
FAILED_REASON = ("computing the release failed after it was charged; the charge stands, because the data may "
                 "have been read. Ask the data steward to check the dataset's files against its metadata, then "
                 "trigger the release again (a new attempt is charged again)")
#: The text of a claim whose process stopped between charging and storing the release.
STALE_REASON = ("the release was charged but not stored within the claim timeout (the process producing it "
                "stopped); the charge stands. Trigger the release again (a new attempt is charged again)")
#: How long a charged claim may stay unreleased before it is taken for a stopped process
#: (the server's ``CIVICDP_COMPUTATION_TIMEOUT_MINUTES``, shared with queries).
CLAIM_TIMEOUT = timedelta(hours=1)


class FeedRefused(Exception):
    """A release that was not produced; the reason is recorded and shown to stewards."""

    def __init__(self, reason: str, budget: ledger.BudgetRefused | None = None,
                 rule: list[str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.budget = budget
        self.rule = rule  # the policy rule that refused it, when a consumer agency may not ask the query


class FeedFailed(FeedRefused):
    """A release charged and then not produced (computing failed, or its process stopped): the charge stands."""


class FeedBusy(Conflict):
    """Another process or steward holds the period's claim: nothing was charged or computed here."""


@dataclass(frozen=True)
class ReleaseView:
    """A stored release, detached from its session."""

    feed: str
    number: int
    period: str
    sha256: str
    signature: str
    loss_micro: int
    origin: str
    created_at: datetime
    release_id: int | None
    fresh: bool = False

    @classmethod
    def of(cls, feed: Feed, row: FeedRelease, fresh: bool = False) -> ReleaseView:
        return cls(feed.name, row.number, row.period, row.sha256, row.signature, row.loss_micro, row.origin,
                   aware(row.created_at), row.release_id, fresh)

    def out(self) -> FeedReleaseOut:
        return FeedReleaseOut(feed=self.feed, number=self.number, period=self.period, sha256=self.sha256,
                              signature=self.signature, epsilon=self.loss_micro / MICRO, loss_micro=self.loss_micro,
                              origin=self.origin, created_at=self.created_at, fresh=self.fresh,
                              url=release_url(self.feed, self.number))


def release_url(feed: str, number: int | str) -> str:
    return f"/v1/feeds/{feed}/releases/{number}"
