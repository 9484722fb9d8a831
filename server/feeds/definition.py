"""Defining a feed and sharing it with agencies.

A steward **defines** a feed — a dataset, query specs, a schedule and the agencies that
may read it. The specs are planned at once (:mod:`civicdp.server.feeds.approval`): their
losses add up to the loss per release, and the announced total (loss per release x
releases announced) must fit the dataset's lifetime budget left after the other feeds'
outstanding allocations, while the most releases of any calendar month must fit the
dataset's monthly cap. The total becomes the feed's own ledger scope (``feed``, subject
the feed's name, period ``lifetime``), so the feed can never spend more than it
announced; the approval (loss per release and fingerprint) is stored with the definition.
Each spec must also be allowed as a query by each agency the feed is defined for or
later shared with (:mod:`civicdp.server.feeds.consumers`): otherwise 403 naming the rule
and the agency, recorded as denied, and nothing is stored.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session, select

from civicdp.policies.enforcer import PolicyStore
from civicdp.privacy.loss import MICRO
from civicdp.queries.engine import Engine
from civicdp.server.auditlog.append import record
from civicdp.server.feeds import consumers
from civicdp.server.feeds.approval import approval_basis, charge_of, fingerprint, plan_specs
from civicdp.server.feeds.schedule import Schedule, parse_schedule
from civicdp.server.feeds.schemas import FeedDefinition
from civicdp.server.state import ledger, registry
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import session_scope
from civicdp.server.state.errors import Conflict, InvalidRequest
from civicdp.server.state.feed_models import Feed, FeedApproval, aware, feed_named
from civicdp.server.state.models import BudgetCap, Dataset

RESERVED = {"overview"}  # path segments under /v1/feeds that are not feeds


def define(db: DbEngine, engine: Engine, policies: PolicyStore, caps: ledger.CapDefaults, caller: Caller | None,
           body: FeedDefinition, now: datetime | None = None) -> None:
    """Check and store a feed definition, open its allocation and share it; nothing changes if refused."""
    now = now or datetime.now(timezone.utc)
    if body.name in RESERVED:
        raise InvalidRequest("name", f"{body.name!r} is reserved", "Choose another feed name")
    agencies = sorted(set(body.agencies))
    start = aware(body.start) if body.start else now
    schedule = parse_schedule(body.schedule, start, body.releases)
    agencies_asked = consumers.consumer_agencies(db, policies, agencies)
    try:
        with session_scope(db) as session:
            if session.exec(select(Feed).where(Feed.name == body.name)).first() is not None:
                raise Conflict(f"a feed named '{body.name}' exists already; choose another name")
            row = session.exec(select(Dataset).where(Dataset.name == body.dataset)).first()
            if row is None:
                known = [d.name for d in registry.all_datasets(session)]
                raise InvalidRequest("dataset", f"no dataset named {body.dataset!r}",
                                     f"Use one of {known}" if known else "Register the dataset first")
            plans = plan_specs(engine, row, body.specs)
            consumers.authorise(policies, body.name, plans, agencies_asked)
            loss = charge_of(row, plans)
            basis = approval_basis(engine, registry.metadata_of(row), plans)
            total = loss * body.releases
            _check_announcement(session, caps, row.name, body.name, loss, total, schedule, now)
            specs = [json.loads(spec.canonical()) for spec, _ in plans]
            feed = Feed(name=body.name, dataset=row.name, specs_json=json.dumps(specs, sort_keys=True),
                        schedule=schedule.text, cron=schedule.cron, start=start, releases=body.releases,
                        loss_micro=loss, total_micro=total, agencies_json=json.dumps(agencies),
                        created_by=caller.name if caller else None)
            session.add(feed)
            session.flush()
            approval = FeedApproval(feed_id=feed.id, dataset_version=row.version, loss_micro=loss,
                                    fingerprint=fingerprint(basis), basis_json=json.dumps(basis, sort_keys=True))
            session.add(approval)
            cap = session.exec(select(BudgetCap).where(BudgetCap.dataset == row.name,
                                                       BudgetCap.scope == ledger.FEED,
                                                       BudgetCap.subject == body.name)).first()
            cap = cap or BudgetCap(dataset=row.name, scope=ledger.FEED, subject=body.name, cap_micro=total)
            cap.cap_micro = total
            session.add(cap)
            session.flush()
            record(session, caller, "feed.define", f"feed:{body.name}", dataset=row.name, schedule=schedule.text,
                   cron=schedule.cron, start=start, releases=body.releases, loss_micro_per_release=loss,
                   announced_micro=total, agencies=agencies, specs=specs, dataset_version=row.version,
                   approval_fingerprint=approval.fingerprint)
    except consumers.ConsumerRefused as refused:  # nothing stored: the refusal alone is recorded
        with session_scope(db) as session:
            record(session, caller, "feed.define", f"feed:{body.name}", "denied", reason=refused.reason,
                   rule=refused.rule, dataset=body.dataset, agency=refused.agency, spec=refused.spec)
        raise
    # After the commit: a link for a feed that was never stored would be harmless, but pointless.
    for agency in agencies:
        policies.register_feed(body.name, agency)


def _check_announcement(session: Session, caps: ledger.CapDefaults, dataset: str, name: str, loss: int, total: int,
                        schedule: Schedule, now: datetime) -> None:
    month, lifetime = ledger.statuses(session, dataset, [
        ledger.Scope(ledger.DATASET, ledger.ANY, ledger.period_of(now)),
        ledger.Scope(ledger.LIFETIME, ledger.ANY, ledger.LIFETIME_PERIOD)], defaults=caps)
    per_month = schedule.most_in_one_month() * loss
    if per_month > month.cap_micro:
        raise InvalidRequest("schedule", f"up to {schedule.most_in_one_month()} releases in one month at "
                             f"epsilon {loss / MICRO:g} each need {per_month / MICRO:g}, above the dataset's "
                             f"monthly cap of {month.cap_micro / MICRO:g}",
                             "Release less often, or spend less per release (a smaller epsilon per spec)")
    committed = 0
    for other in session.exec(select(Feed).where(Feed.dataset == dataset, Feed.active == True)):  # noqa: E712
        (allocation,) = ledger.statuses(session, dataset, [ledger.Scope(ledger.FEED, other.name,
                                                                         ledger.LIFETIME_PERIOD)],
                                        defaults=caps)
        committed += max(other.total_micro - allocation.spent_micro, 0)
    room = lifetime.remaining_micro - committed
    if total > room:
        raise InvalidRequest("releases", f"the feed announces epsilon {total / MICRO:g} in total "
                             f"({loss / MICRO:g} per release x {schedule.releases} releases), but the dataset's "
                             f"lifetime budget has {lifetime.remaining_micro / MICRO:g} left, of which "
                             f"{committed / MICRO:g} is committed to other feeds",
                             f"Announce at most {max(room, 0) // max(loss, 1)} releases, or spend less per release")


def share(db: DbEngine, engine: Engine, policies: PolicyStore, caller: Caller | None, name: str, agency: str, *,
          shared: bool = True) -> list[str]:
    """Let ``agency``'s feed consumers read the feed (or stop them); the agencies afterwards.

    Sharing is refused (ConsumerRefused, nothing changed) unless every spec of the feed would
    be allowed as a query by ``agency`` (:mod:`civicdp.server.feeds.consumers`)."""
    asked = consumers.consumer_agencies(db, policies, [agency]) if shared else []
    try:
        with session_scope(db) as session:
            feed = feed_named(session, name)
            if shared:
                _authorise_stored(session, engine, policies, feed, asked)
            agencies = set(json.loads(feed.agencies_json))
            agencies = agencies | {agency} if shared else agencies - {agency}
            feed.agencies_json = json.dumps(sorted(agencies))
            session.add(feed)
            record(session, caller, "feed.share" if shared else "feed.unshare", f"feed:{name}", agency=agency)
    except consumers.ConsumerRefused as refused:
        with session_scope(db) as session:
            record(session, caller, "feed.share", f"feed:{name}", "denied", reason=refused.reason,
                   rule=refused.rule, agency=agency, spec=refused.spec)
        raise
    if shared:
        policies.register_feed(name, agency)
    else:
        policies.unassign(f"feed:{name}", "feed:*", agency)
    return sorted(agencies)


def _authorise_stored(session: Session, engine: Engine, policies: PolicyStore, feed: Feed,
                      agencies: list[str]) -> None:
    """A stored feed's specs, planned against its dataset as registered now, as queries by ``agencies``."""
    row = session.exec(select(Dataset).where(Dataset.name == feed.dataset)).first()
    if row is None:
        raise Conflict(f"feed '{feed.name}' reads dataset {feed.dataset!r}, which is no longer registered; "
                       "it cannot be shared")
    plans = plan_specs(engine, row, json.loads(feed.specs_json))
    consumers.authorise(policies, feed.name, plans, agencies)
