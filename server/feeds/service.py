"""Agency feeds: scheduled, signed aggregate releases, charged once and read by many.

:class:`FeedService` is the one entry to feeds for the HTTP routes, the CLI and the
scheduler; each of its jobs lives in its own module:

- defining a feed and sharing it: :mod:`~civicdp.server.feeds.definition`; holding its
  specs to the rules of a query by each consumer agency: :mod:`~civicdp.server.feeds.consumers`;
- planning its specs without data, and what it was approved for:
  :mod:`~civicdp.server.feeds.approval`;
- claiming and charging a period, refusals and failures: :mod:`~civicdp.server.feeds.periods`;
- computing, signing and storing a release: :mod:`~civicdp.server.feeds.release`;
- recovery of claims a stopped process left charged: :mod:`~civicdp.server.feeds.recovery`;
- reading releases (free): :mod:`~civicdp.server.feeds.reading`; oversight:
  :mod:`~civicdp.server.feeds.oversight`.

A **release** is made when its period is due (the scheduler, :mod:`civicdp.server.feeds.scheduler`)
or when a steward triggers the next one (:meth:`FeedService.produce`). The loss is **spent
before the data is read**:

1. plan the specs against the registered metadata, check them against the approval and,
   as queries by each consumer agency, against the policy as it is now
   (:mod:`~civicdp.server.feeds.consumers`), pre-check the budgets (read-only) — a
   refusal here charges nothing and is stored;
2. ONE transaction: claim the period (the unique ``(feed, period)`` :class:`FeedClaim`
   row — a second process or steward producing the same period loses here, before
   charging or computing anything), charge the feed allocation, the dataset's month and
   the dataset's lifetime, and write the ``feed.charge`` audit entry; commit;
3. only then read the data and compute, sign the canonical bytes;
4. a second transaction stores the release (``release`` and ``feedrelease`` rows, the
   charge's ledger entries pointed at it), marks the claim ``released`` and writes the
   ``feed.release`` audit entry with the result's hash.

Whatever is raised after step 2 (a cast that fails on one person's NaN, a missing file,
a bug) keeps the charge — the data may have been read, so it is never refunded — marks
the claim ``failed`` with ONE fixed reason (:data:`FAILED_REASON`, never the
exception's text) and records a ``feed.failed`` entry against the charge's audit entry
(``charge_seq``); the API answers 409 with that text, never a 500. Every outcome of a
charged attempt, release or failure, is paid for; the scheduler does not try a charged
period again, and a steward's explicit trigger tries it again and pays again. A process that stops between steps 2
and 4 leaves the claim ``charged`` and nothing released; the overview shows it as
charged, not released, and :meth:`FeedService.recover` (run before every scheduler
check, so at start-up too, and before a trigger) marks claims older than the claim
timeout (``CIVICDP_COMPUTATION_TIMEOUT_MINUTES``) as failed (:data:`STALE_REASON`) with
a ``feed.abandoned`` entry; a late result of such a claim is discarded. Stewards see
refusals, failures and charged-not-released periods (``GET /v1/feeds/overview``,
``civicdp feeds list``). Reading a release costs nothing: it is the stored bytes.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, NoReturn

from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session, select

from civicdp.audit.signing import SigningKey
from civicdp.policies.enforcer import PolicyStore
from civicdp.queries.engine import Engine
from civicdp.server.feeds import consumers, definition, oversight, periods, reading, recovery
from civicdp.server.feeds.approval import approval_basis, approval_change, approve_unrecorded, charge_of, plan_specs
from civicdp.server.feeds.outcomes import (
    CLAIM_TIMEOUT, FAILED_REASON, SCHEDULER, STALE_REASON, STEWARD, FeedBusy, FeedFailed, FeedRefused, ReleaseView,
)
from civicdp.server.feeds.release import Superseded, compute, store
from civicdp.server.feeds.schedule import period_label, schedule_of
from civicdp.server.feeds.schemas import FeedDefinition, FeedOverview, FeedSummary
from civicdp.server.state import ledger, registry
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import reader
from civicdp.server.state.errors import Conflict, InvalidRequest
from civicdp.server.state.feed_models import Feed, FeedApproval, FeedClaim, FeedRefusal, FeedRelease, feed_named
from civicdp.server.state.models import Dataset

logger = logging.getLogger("civicdp.feeds")


class FeedService:
    """Defines feeds, produces and refuses their releases, and reads them back."""

    def __init__(self, db: DbEngine, engine: Engine, policies: PolicyStore, caps: ledger.CapDefaults,
                 signing_key: Callable[[], SigningKey], claim_timeout: timedelta = CLAIM_TIMEOUT) -> None:
        self.db = db
        self.engine = engine
        self.policies = policies
        self.caps = caps
        self._signing_key = signing_key
        self.claim_timeout = claim_timeout
        self.stopping = threading.Event()  # set on shutdown: a long catch-up stops between releases

    @classmethod
    def of(cls, state: Any) -> FeedService:
        """The service over a server's ``AppState``."""
        return cls(state.db, state.queries.engine, state.policies, state.caps, lambda: state.signing_key,
                   timedelta(minutes=state.settings.computation_timeout_minutes))

    # -- definition -------------------------------------------------------------------------

    def define(self, caller: Caller | None, body: FeedDefinition, now: datetime | None = None) -> FeedOverview:
        """Check and store a feed definition, open its allocation and share it; nothing changes if refused."""
        now = now or datetime.now(timezone.utc)
        definition.define(self.db, self.engine, self.policies, self.caps, caller, body, now)
        return self.overview_of(body.name, now)

    def share(self, caller: Caller | None, name: str, agency: str, *, shared: bool = True) -> list[str]:
        """Let ``agency``'s feed consumers read the feed (or stop them); the agencies afterwards."""
        return definition.share(self.db, self.engine, self.policies, caller, name, agency, shared=shared)

    # -- releases -------------------------------------------------------------------------

    def trigger(self, caller: Caller | None, name: str, now: datetime | None = None) -> ReleaseView:
        """Produce the feed's earliest release not produced yet (due or not); FeedRefused if it cannot be.

        A period whose charged attempt failed is tried again, and charged again; FeedBusy (409) if
        another process or steward is producing it now."""
        now = now or datetime.now(timezone.utc)
        self.recover(now)
        with Session(reader(self.db)) as session:
            feed = feed_named(session, name)
            done = set(session.exec(select(FeedRelease.number).where(FeedRelease.feed_id == feed.id)))
        if not feed.active:
            raise Conflict(f"feed '{name}' is stopped")
        number = next((n for n in range(1, feed.releases + 1) if n not in done), None)
        if number is None:
            raise Conflict(f"feed '{name}' has produced all {feed.releases} releases it announced; "
                           "define a new feed to continue")
        return self.produce(feed, number, caller, STEWARD, now)

    def run_due(self, now: datetime | None = None) -> list[ReleaseView | FeedRefused]:
        """Produce every due release not yet claimed or refused (catching up after downtime).

        A period claimed once — released, failed after its charge, or being produced — is never
        tried again here: only a steward's trigger tries a failed period again (and pays again)."""
        now = now or datetime.now(timezone.utc)
        self.recover(now)
        outcomes: list[ReleaseView | FeedRefused] = []
        with Session(reader(self.db)) as session:
            feeds = list(session.exec(select(Feed).where(Feed.active == True).order_by(Feed.id)))  # noqa: E712
            attempted = {(feed_id, period) for feed_id, period in session.exec(
                select(FeedRelease.feed_id, FeedRelease.period))}
            attempted |= {(feed_id, period) for feed_id, period in session.exec(
                select(FeedClaim.feed_id, FeedClaim.period))}
            attempted |= {(feed_id, period) for feed_id, period in session.exec(
                select(FeedRefusal.feed_id, FeedRefusal.period).where(FeedRefusal.attempt == 0))}
        for feed in feeds:
            try:
                for number, when in schedule_of(feed).due(now):
                    if self.stopping.is_set():
                        return outcomes
                    if (feed.id, period_label(when)) in attempted:
                        continue
                    try:
                        outcomes.append(self.produce(feed, number, None, SCHEDULER, now))
                    except FeedRefused as refused:  # refused (nothing charged) or failed (charged)
                        outcomes.append(refused)
                    except FeedBusy:
                        continue  # another process claimed it first: it charges and releases it
            except Exception:  # noqa: BLE001 - one broken feed must not stop the others
                logger.exception("feed %s: scheduled release failed; retrying at the next check", feed.name)
        return outcomes

    def produce(self, feed: Feed, number: int, caller: Caller | None, origin: str, now: datetime) -> ReleaseView:
        """Release ``number`` of ``feed``: checked, claimed and charged, THEN computed and stored.

        Raises FeedRefused (nothing charged), FeedFailed (charged, not produced) or FeedBusy
        (another producer holds the claim; nothing charged here)."""
        period = period_label(schedule_of(feed).time_of(number))
        with Session(reader(self.db)) as session:
            existing = session.exec(select(FeedRelease).where(FeedRelease.feed_id == feed.id,
                                                              FeedRelease.period == period)).first()
            if existing is not None:
                return ReleaseView.of(feed, existing)
            row = session.exec(select(Dataset).where(Dataset.name == feed.dataset)).first()
            approval = session.exec(select(FeedApproval).where(FeedApproval.feed_id == feed.id)).first()

        def refuse(reason: str, budget: ledger.BudgetRefused | None = None, rule: list[str] | None = None) -> NoReturn:
            periods.refuse(self.db, feed, number, period, caller, origin, reason, budget, rule)

        if row is None:
            refuse(f"dataset {feed.dataset!r} is no longer registered")
        try:
            plans = plan_specs(self.engine, row, json.loads(feed.specs_json))
        except InvalidRequest as exc:
            refuse(f"a spec no longer fits dataset {row.name} version {row.version}: {exc}")
        loss = charge_of(row, plans)
        basis = approval_basis(self.engine, registry.metadata_of(row), plans)
        if approval is None:
            approval = approve_unrecorded(self.db, feed, row, basis, loss, number, period, caller, origin)
        change = approval_change(feed, row, approval, basis, loss)
        if change is not None:
            refuse(change)
        try:  # the rules may have changed since the definition: asked again before every charge
            consumers.authorise(self.policies, feed.name, plans, consumers.consumer_agencies(
                self.db, self.policies, json.loads(feed.agencies_json)))
        except consumers.ConsumerRefused as denied:
            refuse(denied.reason, rule=denied.rule)
        scopes = periods.feed_scopes(feed.name, now)
        try:
            with Session(reader(self.db)) as session:
                ledger.precheck(session, feed.dataset, scopes, loss, defaults=self.caps)
        except ledger.BudgetRefused as refused:
            refuse(str(refused), refused)
        claim = periods.claim(self.db, self.caps, feed, number, period, row, loss, scopes, caller, origin, now)
        if isinstance(claim, ReleaseView):
            return claim
        # The loss is spent. From here on every outcome keeps the charge and is recorded against it.
        try:
            data, digest, signature = compute(self.engine, self._signing_key, feed, number, period, row, plans,
                                              loss, now)
        except Exception as exc:  # noqa: BLE001 - ANY failure on the data: one fixed, data-independent answer
            # Only the exception's type is logged: its message could quote a value from the data.
            logger.warning("feed %s: release %d was charged and computing it failed (%s)", feed.name, number,
                           type(exc).__name__)
            periods.fail(self.db, feed, claim, caller, FAILED_REASON, now)
        try:
            return store(self.db, feed, claim, row, caller, data, digest, signature, now)
        except Superseded:
            raise FeedFailed(periods.failed_text(feed, claim, STALE_REASON)) from None
        except Exception as exc:  # noqa: BLE001 - the charge stands; the claim is marked failed
            logger.warning("feed %s: release %d was charged and storing it failed (%s)", feed.name, number,
                           type(exc).__name__)
            periods.fail(self.db, feed, claim, caller, FAILED_REASON, now)

    def recover(self, now: datetime | None = None) -> int:
        """Mark claims charged longer than the claim timeout ago, never released, as failed (the
        charge stands), each with an audit entry; how many. Run before every scheduler check."""
        return recovery.recover(self.db, self.claim_timeout, now)

    # -- reading and oversight -------------------------------------------------------------

    def readable(self, caller: Caller, now: datetime | None = None) -> list[FeedSummary]:
        """The feeds ``caller`` may read (decided by the policy store, feed by feed)."""
        return reading.readable(self.db, self.policies, caller, now)

    def release(self, name: str, which: str) -> tuple[Feed, FeedRelease, bytes]:
        """The feed, the release (``latest`` or its number) and its signed bytes; NotFound if none."""
        return reading.release(self.db, name, which)

    def index(self, name: str, base_url: str, public_key: str) -> dict[str, Any]:
        """The feed's releases as a JSON Feed 1.1 document (newest first), with civicdp extensions."""
        return reading.index(self.db, name, base_url, public_key)

    def overview(self, now: datetime | None = None) -> list[FeedOverview]:
        """Every feed: schedule, agencies, what it spent and what it will spend, the latest refusal."""
        return oversight.overview(self.db, self.caps, now)

    def overview_of(self, name: str, now: datetime | None = None) -> FeedOverview:
        return oversight.overview_of(self.db, self.caps, name, now)
