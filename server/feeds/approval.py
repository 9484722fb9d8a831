"""A feed's specs planned without data, and what the feed was approved for.

The specs are planned against the registered metadata (cost known, no data read): their
losses add up to the loss per release. The definition is **frozen at approval**: a
:class:`FeedApproval` stores the loss per release and a fingerprint of everything that
loss and the sensitivity depend on (:func:`approval_basis`: each plan's loss,
contribution bound and mechanisms with their sensitivities and scales, the dataset's
bounding parameters, and the metadata — bounds, resolution, keys — of every column the
specs read). A release against a dataset version whose metadata changes any of it is
refused before any charge, naming what changed (:func:`approval_change`): a new feed
definition is needed.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session, select

from civicdp.audit.release_signature import canonical_bytes
from civicdp.privacy.errors import PrivacyError
from civicdp.queries.engine import AnalysisPlan, Engine, Plan
from civicdp.queries.errors import QueryError
from civicdp.queries.metadata import DatasetMetadata
from civicdp.queries.request import Request, parse_request
from civicdp.server.auditlog.append import record
from civicdp.server.feeds.periods import insert_ignoring_duplicates, refuse
from civicdp.server.state import registry
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import reader, session_scope
from civicdp.server.state.errors import InvalidRequest
from civicdp.server.state.feed_models import Feed, FeedApproval
from civicdp.server.state.models import AuditEntry, Dataset

Plans = list[tuple[Request, Plan | AnalysisPlan]]


def plan_specs(engine: Engine, row: Dataset, specs: list[Any]) -> Plans:
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
            plan = engine.plan(spec, metadata, Path(row.path))
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


def charge_of(row: Dataset, plans: Plans) -> int:
    """One release's charge in the dataset's ledger unit (micro-epsilon, or nano-rho on zCDP)."""
    accounting = registry.metadata_of(row).accounting.rule
    return sum(accounting.charge_of(plan.loss) for _, plan in plans)


def plain(value: Any) -> Any:
    """A JSON value with one written form: no NaN or infinity (null), times in ISO form."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, datetime):
        return (value.astimezone(timezone.utc) if value.utcoffset() is not None else value).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def approval_basis(engine: Engine, metadata: DatasetMetadata, plans: Plans) -> dict[str, Any]:
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
    return plain({"privacy_unit": metadata.privacy_unit, "max_contributions": metadata.max_contributions,
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


def approval_change(feed: Feed, row: Dataset, approval: FeedApproval, basis: dict[str, Any], loss: int) -> str | None:
    """Why a release of ``feed`` against ``row`` would not be what was approved (None if it would be)."""
    if fingerprint(basis) == approval.fingerprint and loss == approval.loss_micro and loss == feed.loss_micro:
        return None
    changes = basis_changes(json.loads(approval.basis_json), basis) or \
        f"loss per release: {feed.loss_micro} -> {loss} micro-epsilon"
    return (f"dataset {row.name} version {row.version} changes what the feed was approved for at its "
            f"definition (version {approval.dataset_version}): {changes}. Its releases would not "
            "have the privacy loss and sensitivity that were approved; a new feed definition is "
            "needed for this dataset version")


def approve_unrecorded(db: DbEngine, feed: Feed, row: Dataset, basis: dict[str, Any], loss: int, number: int,
                       period: str, caller: Caller | None, origin: str) -> FeedApproval:
    """The approval of a feed defined before approvals were stored, taken from the current metadata
    only if the audit log shows the dataset at the feed's definition was this very version (and no
    other version was registered since); otherwise the release is refused."""
    with Session(reader(db)) as session:
        defined = session.execute(select(AuditEntry.seq).where(
            AuditEntry.action == "feed.define", AuditEntry.target == f"feed:{feed.name}",
            AuditEntry.decision == "allowed")).scalars().first()
        registrations = session.execute(select(AuditEntry.seq, AuditEntry.entry_json).where(
            AuditEntry.action == "dataset.register", AuditEntry.dataset == feed.dataset)).all()
    versions = sorted((seq, json.loads(entry)["detail"].get("version")) for seq, entry in registrations)
    before = [version for seq, version in versions if defined is not None and seq < defined]
    since = {version for seq, version in versions if defined is not None and seq > defined}
    if not before or before[-1] != row.version or since - {row.version}:
        refuse(db, feed, number, period, caller, origin,
               f"the feed was defined before approvals were recorded, and dataset {row.name} version "
               f"{row.version} cannot be shown to be the version it was approved for; a new feed "
               "definition is needed for this dataset version")
    with session_scope(db) as session:
        insert_ignoring_duplicates(session, FeedApproval, {
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
