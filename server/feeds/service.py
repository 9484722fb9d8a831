"""Agency feeds: scheduled, signed aggregate releases, charged once and read by many.

A steward **defines** a feed — a dataset, query specs, a schedule and the agencies
that may read it. The specs are planned at once (cost known, no data read): their
losses add up to the loss per release, and the announced total (loss per release x
releases announced) must fit the dataset's lifetime budget left after the other
feeds' outstanding allocations, while the most releases of any calendar month must fit
the dataset's monthly cap. The total becomes the feed's own ledger scope (``feed``,
subject the feed's name, period ``lifetime``), so the feed can never spend more than
it announced. The definition is **frozen at approval**: a :class:`FeedApproval` stores
the loss per release and a fingerprint of everything that loss and the sensitivity
depend on (:func:`approval_basis`: each plan's loss, contribution bound and mechanisms
with their sensitivities and scales, the dataset's bounding parameters, and the
metadata — bounds, resolution, keys — of every column the specs read). A release
against a dataset version whose metadata changes any of it is refused before any
charge, naming what changed: a new feed definition is needed.

A **release** is made when its period is due (the scheduler, :mod:`civicdp.server.feeds.scheduler`)
or when a steward triggers the next one. The loss is **spent before the data is read**:

1. plan the specs against the registered metadata, check them against the approval,
   pre-check the budgets (read-only) — a refusal here charges nothing and is stored;
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

import csv
import hashlib
import io
import json
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy import func, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session, select

from civicdp.audit.release_signature import FORMAT, canonical_bytes, sign_release
from civicdp.audit.signing import SigningKey
from civicdp.policies.actions import Action
from civicdp.policies.enforcer import PolicyStore
from civicdp.privacy.errors import PrivacyError
from civicdp.privacy.loss import MICRO
from civicdp.queries.engine import AnalysisPlan, Engine, Plan
from civicdp.queries.errors import QueryError
from civicdp.queries.metadata import DatasetMetadata
from civicdp.queries.request import Request, parse_request
from civicdp.server.state import ledger, registry
from civicdp.server.auditlog.append import record
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import reader, session_scope
from civicdp.server.state.errors import Conflict, InvalidRequest, NotFound
from civicdp.server.state.feed_models import CHARGED, FAILED, RELEASED, Feed, FeedApproval, FeedClaim, FeedRefusal, FeedRelease
from civicdp.server.feeds.schedule import Schedule, parse_schedule, period_label
from civicdp.server.feeds.schemas import FeedDefinition, FeedOverview, FeedReleaseOut, FeedSummary
from civicdp.server.state.models import AuditEntry, BudgetCap, Dataset, LedgerEntry, Release

logger = logging.getLogger("civicdp.feeds")
SCHEDULER, STEWARD = "scheduler", "steward"
RESERVED = {"overview"}  # path segments under /v1/feeds that are not feeds
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

    def __init__(self, reason: str, budget: ledger.BudgetRefused | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.budget = budget


class FeedFailed(FeedRefused):
    """A release charged and then not produced (computing failed, or its process stopped): the charge stands."""


class FeedBusy(Conflict):
    """Another process or steward holds the period's claim: nothing was charged or computed here."""


class _Superseded(Exception):
    """The claim was marked failed (timed out) before the release could be stored."""


class _Lost(Exception):
    """Another producer holds the period's claim."""


@dataclass(frozen=True)
class _Claim:
    """A period claimed and charged: what the later steps refer to."""

    id: int
    attempt: int
    number: int
    period: str
    loss_micro: int
    origin: str
    charge_seq: int
    ledger_ids: tuple[int, ...]


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

    def out(self) -> FeedReleaseOut:
        return FeedReleaseOut(feed=self.feed, number=self.number, period=self.period, sha256=self.sha256,
                              signature=self.signature, epsilon=self.loss_micro / MICRO, loss_micro=self.loss_micro,
                              origin=self.origin, created_at=self.created_at, fresh=self.fresh,
                              url=release_url(self.feed, self.number))


def release_url(feed: str, number: int | str) -> str:
    return f"/v1/feeds/{feed}/releases/{number}"


def feed_scopes(feed: str, now: datetime) -> list[ledger.Scope]:
    """What one release of ``feed`` is charged to: its allocation, the dataset's month and lifetime."""
    return [ledger.Scope(ledger.FEED, feed, ledger.LIFETIME_PERIOD),
            ledger.Scope(ledger.DATASET, ledger.ANY, ledger.period_of(now)),
            ledger.Scope(ledger.LIFETIME, ledger.ANY, ledger.LIFETIME_PERIOD)]


@lru_cache(maxsize=256)
def _schedule(text: str, start: datetime, releases: int) -> Schedule:
    return parse_schedule(text, start, releases)


def schedule_of(feed: Feed) -> Schedule:
    start = feed.start if feed.start.utcoffset() is not None else feed.start.replace(tzinfo=timezone.utc)
    return _schedule(feed.schedule, start, feed.releases)


def _plain(value: Any) -> Any:
    """A JSON value with one written form: no NaN or infinity (null), times in ISO form."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return (value.astimezone(timezone.utc) if value.utcoffset() is not None else value).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=timezone.utc) if when.utcoffset() is None else when


def _insert_ignoring_duplicates(session: Session, model: type, row: dict[str, Any], keys: list[str]) -> int:
    """Insert ``row`` unless one with the same ``keys`` exists: 1 if inserted, 0 if not.

    Core on the table with RETURNING, not the ORM's insert of the model: through the ORM's
    bulk path, a PostgreSQL ``ON CONFLICT DO NOTHING`` that inserted nothing can still report
    a row count, and two producers would both think they hold a period's claim."""
    dialect = session.get_bind().dialect.name
    builder = postgresql.insert if dialect == "postgresql" else sqlite.insert
    table = model.__table__  # type: ignore[attr-defined]
    inserted = session.connection().execute(builder(table).values(**row).on_conflict_do_nothing(
        index_elements=keys).returning(table.c.id)).first()
    return 0 if inserted is None else 1


def _charge(row: Dataset, plans: list[tuple[Request, Plan | AnalysisPlan]]) -> int:
    """One release's charge in the dataset's ledger unit (micro-epsilon, or nano-rho on zCDP)."""
    accounting = registry.metadata_of(row).accounting.rule
    return sum(accounting.charge_of(plan.loss) for _, plan in plans)


def _loss_document(row: Dataset, amount: int) -> dict[str, Any]:
    """A release's loss as its signed document states it (pure: micro-epsilon; zCDP: nano-rho and epsilon)."""
    accounting = registry.metadata_of(row).accounting.rule
    if not accounting.zcdp:
        return {"epsilon_micro": amount, "delta": 0}
    return {"rho_nano": amount, "epsilon": accounting.shown(amount)["epsilon"], "delta": accounting.delta}


def approval_basis(engine: Engine, metadata: DatasetMetadata,
                   plans: list[tuple[Request, Plan | AnalysisPlan]]) -> dict[str, Any]:
    """What a feed's loss and sensitivity depend on, computed without data (its fingerprint is frozen
    at definition): each plan's loss, contribution bound and mechanisms (sensitivity, scale, epsilon),
    the dataset's bounding parameters, and the metadata of every column the specs read."""
    used: set[str] = set()
    for _, plan in plans:
        used |= plan.columns()
    columns = {f"{tname}.{cname}": column.model_dump(mode="json")
               for tname, table in sorted(metadata.tables.items())
               for cname, column in sorted(table.columns.items())
               if cname in used or cname == metadata.privacy_unit}
    specs = []
    for _, plan in plans:
        estimate = engine.describe(plan)
        specs.append({"loss_micro": metadata.accounting.rule.charge_of(plan.loss),
                      "contributions": estimate.contributions,
                      "mechanisms": estimate.mechanisms})
    return _plain({"privacy_unit": metadata.privacy_unit, "max_contributions": metadata.max_contributions,
                   "max_contributions_limit": metadata.max_contributions_limit,
                   "privacy_unit_via": {t: table.privacy_unit_via for t, table in sorted(metadata.tables.items())
                                        if table.privacy_unit_via},
                   "columns": columns, "specs": specs})


def fingerprint(basis: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_bytes(basis)).hexdigest()


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
    if items is None:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in items:
        out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out or {prefix: value}


def basis_changes(approved: dict[str, Any], now: dict[str, Any], most: int = 4) -> str:
    """The first differences between two bases, in words ("max_contributions: 3 -> 5")."""
    old, new = _flat(approved), _flat(now)
    missing = object()
    changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k, missing) != new.get(k, missing)]

    def show(v: Any) -> str:
        return "(none)" if v is missing else json.dumps(v)[:60]

    words = [f"{k}: {show(old.get(k, missing))} -> {show(new.get(k, missing))}" for k in changed[:most]]
    more = len(changed) - most
    return "; ".join(words) + (f"; and {more} more" if more > 0 else "")


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

    # -- planning ------------------------------------------------------------------------

    def _plan_specs(self, row: Dataset, specs: list[Any]) -> list[tuple[Request, Plan | AnalysisPlan]]:
        """Every spec planned against ``row`` (no data read); InvalidRequest names the spec and field."""
        plans = []
        metadata = registry.metadata_of(row)
        for i, raw in enumerate(specs):
            where = f"specs[{i}]"
            if not isinstance(raw, dict):
                raise InvalidRequest(where, "a spec is a JSON object", "Write each spec as in POST /v1/queries")
            if raw.get("dataset", row.name) != row.name:
                raise InvalidRequest(f"{where}.dataset", f"names {raw.get('dataset')!r}, not the feed's dataset "
                                     f"{row.name!r}", "Leave 'dataset' out of feed specs, or name the feed's dataset")
            try:
                spec = parse_request({**raw, "dataset": row.name})
                plan = self.engine.plan(spec, metadata, Path(row.path))
            except QueryError as exc:
                raise InvalidRequest(f"{where}.{exc.field}" if exc.field else where, exc.problem,
                                     exc.fix or "See the query spec fields in the README") from None
            except PrivacyError as exc:
                raise InvalidRequest(f"{where}.epsilon", str(exc), "Give a finite privacy loss greater than 0") from None
            if plan.loss.delta != 0:
                raise InvalidRequest(where, "the spec spends delta, which feeds do not account",
                                     "Use a pure-epsilon spec")
            plans.append((spec, plan))
        return plans

    # -- definition -------------------------------------------------------------------------

    def define(self, caller: Caller | None, body: FeedDefinition, now: datetime | None = None) -> FeedOverview:
        """Check and store a feed definition, open its allocation and share it; nothing changes if refused."""
        now = now or datetime.now(timezone.utc)
        if body.name in RESERVED:
            raise InvalidRequest("name", f"{body.name!r} is reserved", "Choose another feed name")
        agencies = sorted(set(body.agencies))
        start = _utc(body.start) if body.start else now
        schedule = parse_schedule(body.schedule, start, body.releases)
        with session_scope(self.db) as session:
            if session.exec(select(Feed).where(Feed.name == body.name)).first() is not None:
                raise Conflict(f"a feed named '{body.name}' exists already; choose another name")
            row = session.exec(select(Dataset).where(Dataset.name == body.dataset)).first()
            if row is None:
                known = [d.name for d in registry.all_datasets(session)]
                raise InvalidRequest("dataset", f"no dataset named {body.dataset!r}",
                                     f"Use one of {known}" if known else "Register the dataset first")
            plans = self._plan_specs(row, body.specs)
            loss = _charge(row, plans)
            basis = approval_basis(self.engine, registry.metadata_of(row), plans)
            total = loss * body.releases
            self._check_announcement(session, row.name, body.name, loss, total, schedule, now)
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
        # After the commit: a link for a feed that was never stored would be harmless, but pointless.
        for agency in agencies:
            self.policies.register_feed(body.name, agency)
        return self.overview_of(body.name, now)

    def _check_announcement(self, session: Session, dataset: str, name: str, loss: int, total: int,
                            schedule: Schedule, now: datetime) -> None:
        month, lifetime = ledger.statuses(session, dataset, [
            ledger.Scope(ledger.DATASET, ledger.ANY, ledger.period_of(now)),
            ledger.Scope(ledger.LIFETIME, ledger.ANY, ledger.LIFETIME_PERIOD)], defaults=self.caps)
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
                                            defaults=self.caps)
            committed += max(other.total_micro - allocation.spent_micro, 0)
        room = lifetime.remaining_micro - committed
        if total > room:
            raise InvalidRequest("releases", f"the feed announces epsilon {total / MICRO:g} in total "
                                 f"({loss / MICRO:g} per release x {schedule.releases} releases), but the dataset's "
                                 f"lifetime budget has {lifetime.remaining_micro / MICRO:g} left, of which "
                                 f"{committed / MICRO:g} is committed to other feeds",
                                 f"Announce at most {max(room, 0) // max(loss, 1)} releases, or spend less per release")

    def share(self, caller: Caller | None, name: str, agency: str, *, shared: bool = True) -> list[str]:
        """Let ``agency``'s feed consumers read the feed (or stop them); the agencies afterwards."""
        with session_scope(self.db) as session:
            feed = self._feed(session, name)
            agencies = set(json.loads(feed.agencies_json))
            agencies = agencies | {agency} if shared else agencies - {agency}
            feed.agencies_json = json.dumps(sorted(agencies))
            session.add(feed)
            record(session, caller, "feed.share" if shared else "feed.unshare", f"feed:{name}", agency=agency)
        if shared:
            self.policies.register_feed(name, agency)
        else:
            self.policies.unassign(f"feed:{name}", "feed:*", agency)
        return sorted(agencies)

    # -- releases -------------------------------------------------------------------------

    @staticmethod
    def _feed(session: Session, name: str) -> Feed:
        feed = session.exec(select(Feed).where(Feed.name == name)).first()
        if feed is None:
            raise NotFound(f"no feed named '{name}'")
        return feed

    @staticmethod
    def _view(feed: Feed, row: FeedRelease, fresh: bool = False) -> ReleaseView:
        return ReleaseView(feed.name, row.number, row.period, row.sha256, row.signature, row.loss_micro, row.origin,
                           _utc(row.created_at), row.release_id, fresh)

    def trigger(self, caller: Caller | None, name: str, now: datetime | None = None) -> ReleaseView:
        """Produce the feed's earliest release not produced yet (due or not); FeedRefused if it cannot be.

        A period whose charged attempt failed is tried again, and charged again; FeedBusy (409) if
        another process or steward is producing it now."""
        now = now or datetime.now(timezone.utc)
        self.recover(now)
        with Session(reader(self.db)) as session:
            feed = self._feed(session, name)
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
                return self._view(feed, existing)
            row = session.exec(select(Dataset).where(Dataset.name == feed.dataset)).first()
            approval = session.exec(select(FeedApproval).where(FeedApproval.feed_id == feed.id)).first()
        if row is None:
            self._refuse(feed, number, period, caller, origin, f"dataset {feed.dataset!r} is no longer registered")
        try:
            plans = self._plan_specs(row, json.loads(feed.specs_json))
        except InvalidRequest as exc:
            self._refuse(feed, number, period, caller, origin,
                         f"a spec no longer fits dataset {row.name} version {row.version}: {exc}")
        loss = _charge(row, plans)
        basis = approval_basis(self.engine, registry.metadata_of(row), plans)
        if approval is None:
            approval = self._approve_unrecorded(feed, row, basis, loss, number, period, caller, origin)
        if fingerprint(basis) != approval.fingerprint or loss != approval.loss_micro or loss != feed.loss_micro:
            changes = basis_changes(json.loads(approval.basis_json), basis) or \
                f"loss per release: {feed.loss_micro} -> {loss} micro-epsilon"
            self._refuse(feed, number, period, caller, origin,
                         f"dataset {row.name} version {row.version} changes what the feed was approved for at its "
                         f"definition (version {approval.dataset_version}): {changes}. Its releases would not "
                         "have the privacy loss and sensitivity that were approved; a new feed definition is "
                         "needed for this dataset version")
        scopes = feed_scopes(feed.name, now)
        try:
            with Session(reader(self.db)) as session:
                ledger.precheck(session, feed.dataset, scopes, loss, defaults=self.caps)
        except ledger.BudgetRefused as refused:
            self._refuse(feed, number, period, caller, origin, str(refused), refused)
        claim = self._claim(feed, number, period, row, loss, scopes, caller, origin, now)
        if isinstance(claim, ReleaseView):
            return claim
        # The loss is spent. From here on every outcome keeps the charge and is recorded against it.
        try:
            data, digest, signature = self._compute(feed, number, period, row, plans, loss, now)
        except Exception as exc:  # noqa: BLE001 - ANY failure on the data: one fixed, data-independent answer
            # Only the exception's type is logged: its message could quote a value from the data.
            logger.warning("feed %s: release %d was charged and computing it failed (%s)", feed.name, number,
                           type(exc).__name__)
            self._fail(feed, claim, caller, FAILED_REASON, now)
        try:
            return self._store(feed, claim, row, caller, data, digest, signature, now)
        except _Superseded:
            raise FeedFailed(self._failed_text(feed, claim, STALE_REASON)) from None
        except Exception as exc:  # noqa: BLE001 - the charge stands; the claim is marked failed
            logger.warning("feed %s: release %d was charged and storing it failed (%s)", feed.name, number,
                           type(exc).__name__)
            self._fail(feed, claim, caller, FAILED_REASON, now)

    def _approve_unrecorded(self, feed: Feed, row: Dataset, basis: dict[str, Any], loss: int, number: int,
                            period: str, caller: Caller | None, origin: str) -> FeedApproval:
        """The approval of a feed defined before approvals were stored, taken from the current metadata
        only if the audit log shows the dataset at the feed's definition was this very version (and no
        other version was registered since); otherwise the release is refused."""
        with Session(reader(self.db)) as session:
            defined = session.execute(select(AuditEntry.seq).where(
                AuditEntry.action == "feed.define", AuditEntry.target == f"feed:{feed.name}",
                AuditEntry.decision == "allowed")).scalars().first()
            registrations = session.execute(select(AuditEntry.seq, AuditEntry.entry_json).where(
                AuditEntry.action == "dataset.register", AuditEntry.dataset == feed.dataset)).all()
        versions = sorted((seq, json.loads(entry)["detail"].get("version")) for seq, entry in registrations)
        before = [version for seq, version in versions if defined is not None and seq < defined]
        since = {version for seq, version in versions if defined is not None and seq > defined}
        if not before or before[-1] != row.version or since - {row.version}:
            self._refuse(feed, number, period, caller, origin,
                         f"the feed was defined before approvals were recorded, and dataset {row.name} version "
                         f"{row.version} cannot be shown to be the version it was approved for; a new feed "
                         "definition is needed for this dataset version")
        with session_scope(self.db) as session:
            _insert_ignoring_duplicates(session, FeedApproval, {
                "feed_id": feed.id, "dataset_version": row.version, "loss_micro": loss,
                "fingerprint": fingerprint(basis), "basis_json": json.dumps(basis, sort_keys=True),
                "created_at": datetime.now(timezone.utc)}, ["feed_id"])
            approval = session.exec(select(FeedApproval).where(FeedApproval.feed_id == feed.id)).one()
            if approval.fingerprint == fingerprint(basis):
                record(session, None, "feed.approve", f"feed:{feed.name}", dataset=row.name,
                       dataset_version=row.version, approval_fingerprint=approval.fingerprint, loss_micro=0,
                       unrecorded_at_definition=True)
            session.expunge(approval)
        return approval

    def _claim(self, feed: Feed, number: int, period: str, row: Dataset, loss: int, scopes: list[ledger.Scope],
               caller: Caller | None, origin: str, now: datetime) -> _Claim | ReleaseView:
        """ONE transaction: claim the period, charge every scope, write the charge's audit entry.

        The claim comes first, so a second producer of the period loses before charging anything:
        FeedBusy, or the stored release if the winner has finished."""
        account_id = caller.account_id if caller else None
        try:
            with session_scope(self.db) as session:
                claimed = _insert_ignoring_duplicates(session, FeedClaim, {
                    "feed_id": feed.id, "number": number, "period": period, "attempt": 1, "state": CHARGED,
                    "dataset_version": row.version, "loss_micro": loss, "origin": origin, "ledger_json": "[]",
                    "charged_at": now}, ["feed_id", "period"])
                if not claimed and origin == STEWARD:
                    # A steward's explicit trigger tries a failed period again: a new attempt, charged again.
                    claimed = int(session.execute(update(FeedClaim).where(
                        FeedClaim.feed_id == feed.id, FeedClaim.period == period, FeedClaim.state == FAILED,
                    ).values(attempt=FeedClaim.attempt + 1, state=CHARGED, number=number, origin=origin,
                             dataset_version=row.version, loss_micro=loss, charged_at=now, finished_at=None,
                             reason=None, charge_seq=None, ledger_json="[]")).rowcount)
                if not claimed:
                    raise _Lost
                claim = session.exec(select(FeedClaim).where(FeedClaim.feed_id == feed.id,
                                                             FeedClaim.period == period)).one()
                charges = ledger.charge(session, row.name, scopes, loss, defaults=self.caps, account_id=account_id)
                entry = record(session, caller, "feed.charge", f"feed:{feed.name}", dataset=row.name,
                               dataset_version=row.version, feed=feed.name, number=number, period=period,
                               origin=origin, attempt=claim.attempt, loss_micro=loss,
                               ledger=[{"budget_id": c.budget_id, "before_micro": c.spent_before_micro,
                                        "after_micro": c.spent_after_micro} for c in charges])
                ids = tuple(int(c.id) for c in charges if c.id is not None)
                claim.charge_seq, claim.ledger_json = entry.seq, json.dumps(list(ids))
                session.add(claim)
                session.flush()
                return _Claim(int(claim.id), claim.attempt, number, period, loss, origin, entry.seq, ids)  # type: ignore[arg-type]
        except ledger.BudgetRefused as refused:  # the claim rolled back with the charge: nothing spent
            self._refuse(feed, number, period, caller, origin, str(refused), refused)
        except _Lost:
            pass
        with Session(reader(self.db)) as session:
            existing = session.exec(select(FeedRelease).where(FeedRelease.feed_id == feed.id,
                                                              FeedRelease.period == period)).first()
            if existing is not None:
                return self._view(feed, existing)
            held = session.exec(select(FeedClaim).where(FeedClaim.feed_id == feed.id,
                                                        FeedClaim.period == period)).first()
        if held is not None and held.state == FAILED:
            raise FeedBusy(f"release {number} of feed '{feed.name}' (period {period}) failed after its charge; "
                           "the scheduler does not try it again: a steward may trigger it (charged again)")
        raise FeedBusy(f"release {number} of feed '{feed.name}' (period {period}) is being produced by another "
                       "process or steward; it is charged once. Ask again in a moment")

    def _compute(self, feed: Feed, number: int, period: str, row: Dataset,
                 plans: list[tuple[Request, Plan | AnalysisPlan]], loss: int,
                 now: datetime) -> tuple[bytes, str, str]:
        """Read the data and compute every spec, then the signed canonical bytes (after the charge only)."""
        results = [(spec, plan, self.engine.execute(plan)) for spec, plan in plans]
        key = self._signing_key()
        document = _plain({
            "format": FORMAT, "feed": feed.name, "number": number, "releases": feed.releases, "period": period,
            "schedule": feed.schedule, "dataset": row.name, "dataset_version": row.version,
            "released_at": now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "loss": _loss_document(row, loss),
            "signed_by": f"{key.name}+{key.verifier.id.hex()}",
            "results": [{"query": json.loads(spec.canonical()), "loss_micro": _charge(row, [(spec, plan)]),
                         "columns": result.table.columns, "rows": result.table.to_dicts(),
                         "tables": {name: {"columns": t.columns, "rows": t.to_dicts()}
                                    for name, t in result.tables.items()},
                         "contributions": result.contributions, "confidence": result.confidence,
                         "mechanisms": result.mechanisms, "notes": result.notes}
                        for spec, plan, result in results],
        })
        data = canonical_bytes(document)
        return data, hashlib.sha256(data).hexdigest(), sign_release(key, data)

    def _store(self, feed: Feed, claim: _Claim, row: Dataset, caller: Caller | None, data: bytes, digest: str,
               signature: str, now: datetime) -> ReleaseView:
        """The second transaction: the release stored, its claim released, the charge linked to it."""
        feed_query = json.dumps({"feed": feed.name, "number": claim.number, "period": claim.period,
                                 "specs": json.loads(feed.specs_json)}, sort_keys=True, separators=(",", ":"))
        with session_scope(self.db) as session:
            released = session.execute(update(FeedClaim).where(
                FeedClaim.id == claim.id, FeedClaim.attempt == claim.attempt, FeedClaim.state == CHARGED,
            ).values(state=RELEASED, finished_at=now)).rowcount
            if not released:
                raise _Superseded  # marked failed meanwhile (timed out): this late result never leaves
            stored = Release(dataset=row.name, dataset_version=row.version,
                             query_hash=hashlib.sha256(feed_query.encode()).hexdigest(),
                             canonical_query=feed_query, loss_micro=claim.loss_micro, result_json=data.decode(),
                             result_hash=digest, account_id=caller.account_id if caller else None)
            session.add(stored)
            session.flush()
            made = FeedRelease(feed_id=feed.id, number=claim.number, period=claim.period, release_id=stored.id,
                               sha256=digest, signature=signature, loss_micro=claim.loss_micro, origin=claim.origin)
            session.add(made)
            if claim.ledger_ids:
                session.execute(update(LedgerEntry).where(LedgerEntry.id.in_(claim.ledger_ids))  # type: ignore[union-attr]
                                .values(release_id=stored.id))
            session.flush()
            record(session, caller, "feed.release", f"feed:{feed.name}", dataset=row.name,
                   dataset_version=row.version, feed=feed.name, number=claim.number, period=claim.period,
                   origin=claim.origin, attempt=claim.attempt, release_id=stored.id, charge_seq=claim.charge_seq,
                   charged_micro=claim.loss_micro, loss_micro=0, result_hash=digest, signature=signature)
            return self._view(feed, made, fresh=True)

    @staticmethod
    def _failed_text(feed: Feed, claim: _Claim, reason: str) -> str:
        return (f"release {claim.number} of feed '{feed.name}' (period {claim.period}) was charged epsilon "
                f"{claim.loss_micro / MICRO:g} and not produced: {reason}")

    def _fail(self, feed: Feed, claim: _Claim, caller: Caller | None, reason: str, now: datetime) -> NoReturn:
        """Mark the claim failed with a fixed reason and record it against its charge; raise FeedFailed."""
        with session_scope(self.db) as session:
            moved = session.execute(update(FeedClaim).where(
                FeedClaim.id == claim.id, FeedClaim.attempt == claim.attempt, FeedClaim.state == CHARGED,
            ).values(state=FAILED, reason=reason, finished_at=now)).rowcount
            if moved:
                record(session, caller, "feed.failed", f"feed:{feed.name}", "failed", reason=reason,
                       dataset=feed.dataset, feed=feed.name, number=claim.number, period=claim.period,
                       origin=claim.origin, attempt=claim.attempt, charge_seq=claim.charge_seq,
                       charged_micro=claim.loss_micro, loss_micro=0)
        raise FeedFailed(self._failed_text(feed, claim, reason))

    def recover(self, now: datetime | None = None) -> int:
        """Mark claims charged longer than the claim timeout ago, never released, as failed (the
        charge stands), each with an audit entry; how many. Run before every scheduler check."""
        now = now or datetime.now(timezone.utc)
        with Session(reader(self.db)) as session:
            stale = [c for c in session.exec(select(FeedClaim).where(FeedClaim.state == CHARGED))
                     if _utc(c.charged_at) < now - self.claim_timeout]
            feeds = {f.id: (f.name, f.dataset) for f in session.exec(select(Feed))} if stale else {}
        recovered = 0
        for claim in stale:
            with session_scope(self.db) as session:
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
                           charged_at=_utc(claim.charged_at))
        if recovered:
            logger.warning("feeds: %d charged release(s) never stored, marked failed", recovered)
        return recovered

    def _refuse(self, feed: Feed, number: int, period: str, caller: Caller | None, origin: str, reason: str,
                budget: ledger.BudgetRefused | None = None) -> NoReturn:
        """Store and record the refusal (once per scheduler period), then raise FeedRefused; nothing is charged."""
        with session_scope(self.db) as session:
            if origin == SCHEDULER:
                attempt = 0
            else:
                latest = session.execute(select(func.max(FeedRefusal.attempt)).where(
                    FeedRefusal.feed_id == feed.id, FeedRefusal.period == period)).scalar_one_or_none()
                attempt = (latest or 0) + 1
            inserted = _insert_ignoring_duplicates(session, FeedRefusal, {
                "feed_id": feed.id, "number": number, "period": period, "attempt": attempt, "reason": reason,
                "origin": origin, "created_at": datetime.now(timezone.utc)}, ["feed_id", "period", "attempt"])
            if inserted:
                record(session, caller, "feed.release", f"feed:{feed.name}", "refused", reason=reason,
                       dataset=feed.dataset, feed=feed.name, number=number, period=period, origin=origin,
                       loss_micro=0)
        raise FeedRefused(f"release {number} of feed '{feed.name}' (period {period}) was not produced: {reason}",
                          budget)

    # -- reading --------------------------------------------------------------------------

    def readable(self, caller: Caller, now: datetime | None = None) -> list[FeedSummary]:
        """The feeds ``caller`` may read (decided by the policy store, feed by feed)."""
        now = now or datetime.now(timezone.utc)
        with Session(reader(self.db)) as session:
            feeds = list(session.exec(select(Feed).order_by(Feed.name)))
            out = []
            for feed in feeds:
                if not self.policies.check(caller.subject, caller.agency, f"feed:{feed.name}",
                                           Action.FEED_READ).allowed:
                    continue
                numbers = list(session.exec(select(FeedRelease.number).where(FeedRelease.feed_id == feed.id)))
                out.append(FeedSummary(name=feed.name, dataset=feed.dataset, schedule=feed.schedule,
                                       releases=feed.releases, produced=len(numbers),
                                       latest=max(numbers) if numbers else None,
                                       next_release_at=schedule_of(feed).next_after(now) if feed.active else None,
                                       epsilon_per_release=feed.loss_micro / MICRO, url=f"/v1/feeds/{feed.name}"))
        return out

    def release(self, name: str, which: str) -> tuple[Feed, FeedRelease, bytes]:
        """The feed, the release (``latest`` or its number) and its signed bytes; NotFound if none."""
        with Session(reader(self.db)) as session:
            feed = self._feed(session, name)
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

    def index(self, name: str, base_url: str, public_key: str) -> dict[str, Any]:
        """The feed's releases as a JSON Feed 1.1 document (newest first), with civicdp extensions."""
        with Session(reader(self.db)) as session:
            feed = self._feed(session, name)
            rows = list(session.exec(select(FeedRelease).where(FeedRelease.feed_id == feed.id)
                                     .order_by(FeedRelease.number.desc())))  # type: ignore[attr-defined]
        schedule = schedule_of(feed)
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
                "date_published": _utc(row.created_at).isoformat(),
                "_civicdp": {"number": row.number, "period": row.period, "sha256": row.sha256,
                             "signature": row.signature, "loss_micro": row.loss_micro,
                             "csv_url": f"{base}{release_url(feed.name, row.number)}?format=csv",
                             "signature_url": f"{base}{release_url(feed.name, row.number)}/signature"},
            } for row in rows],
            "_civicdp": {"dataset": feed.dataset, "schedule": feed.schedule, "cron": feed.cron,
                         "releases": feed.releases, "loss_micro_per_release": feed.loss_micro,
                         "next_release_at": (lambda t: t.isoformat() if t else None)(
                             schedule.next_after(datetime.now(timezone.utc)) if feed.active else None),
                         "public_key": public_key},
        }

    # -- oversight ------------------------------------------------------------------------

    def overview(self, now: datetime | None = None) -> list[FeedOverview]:
        """Every feed: schedule, agencies, what it spent and what it will spend, the latest refusal."""
        now = now or datetime.now(timezone.utc)
        with Session(reader(self.db)) as session:
            names = list(session.exec(select(Feed.name).order_by(Feed.name)))
        return [self.overview_of(name, now) for name in names]

    def overview_of(self, name: str, now: datetime | None = None) -> FeedOverview:
        now = now or datetime.now(timezone.utc)
        with Session(reader(self.db)) as session:
            feed = self._feed(session, name)
            released = {period for (period,) in session.execute(
                select(FeedRelease.period).where(FeedRelease.feed_id == feed.id))}
            refusals = list(session.exec(select(FeedRefusal).where(FeedRefusal.feed_id == feed.id)
                                         .order_by(FeedRefusal.id)))  # type: ignore[arg-type]
            claims = list(session.exec(select(FeedClaim).where(FeedClaim.feed_id == feed.id)
                                       .order_by(FeedClaim.id)))  # type: ignore[arg-type]
            (allocation,) = ledger.statuses(session, feed.dataset, [
                ledger.Scope(ledger.FEED, feed.name, ledger.LIFETIME_PERIOD)], defaults=self.caps)
        schedule = schedule_of(feed)
        # Each period not released counts once, by its latest outcome; a charged claim counts as charged.
        pending = {c.period for c in claims if c.state == CHARGED}
        refused_at = {r.period: _utc(r.created_at) for r in refusals}
        failures = [c for c in claims if c.state == FAILED and c.period not in released | pending
                    and not refused_at.get(c.period, _utc(c.charged_at)) > _utc(c.finished_at or c.charged_at)]
        failed = {c.period for c in failures}
        last = refusals[-1] if refusals else None
        last_failure = max(failures, key=lambda c: _utc(c.finished_at or c.charged_at), default=None)
        return FeedOverview(
            name=feed.name, dataset=feed.dataset, schedule=feed.schedule, cron=feed.cron, start=_utc(feed.start),
            end=schedule.end, agencies=json.loads(feed.agencies_json), active=feed.active, releases=feed.releases,
            produced=len(released), refused=len(set(refused_at) - released - pending - failed),
            failed=len(failed), charged_not_released=len(pending),
            loss_micro_per_release=feed.loss_micro, announced_micro=feed.total_micro,
            spent_micro=allocation.spent_micro,
            planned_micro=max(feed.releases - len(released) - len(pending), 0) * feed.loss_micro,
            next_release_at=schedule.next_after(now) if feed.active else None,
            last_refusal=None if last is None else {"number": last.number, "period": last.period,
                                                    "time": _utc(last.created_at).isoformat(),
                                                    "origin": last.origin, "reason": last.reason},
            last_failure=None if last_failure is None else {
                "number": last_failure.number, "period": last_failure.period, "attempt": last_failure.attempt,
                "charged_at": _utc(last_failure.charged_at).isoformat(),
                "time": _utc(last_failure.finished_at or last_failure.charged_at).isoformat(),
                "origin": last_failure.origin, "charged_micro": last_failure.loss_micro,
                "reason": last_failure.reason},
            created_at=_utc(feed.created_at), created_by=feed.created_by)


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
