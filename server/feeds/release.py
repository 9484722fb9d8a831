"""Computing, signing and storing a feed's release — only after its period was claimed and charged.

:func:`compute` reads the data, computes every spec and signs the canonical bytes of the
release document. :func:`store` is the second transaction: the ``release`` and
``feedrelease`` rows, the charge's ledger entries pointed at the release, the claim
marked ``released`` and the ``feed.release`` audit entry with the result's hash. A claim
marked failed meanwhile (timed out: :mod:`civicdp.server.feeds.recovery`) is not
released: its late result is discarded (:class:`Superseded`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Engine as DbEngine

from civicdp.audit.release_signature import FORMAT, canonical_bytes, sign_release
from civicdp.audit.signing import SigningKey
from civicdp.queries.engine import Engine
from civicdp.server.auditlog.append import record
from civicdp.server.feeds.approval import Plans, charge_of, plain
from civicdp.server.feeds.outcomes import ReleaseView
from civicdp.server.feeds.periods import Claim
from civicdp.server.state import registry
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import session_scope
from civicdp.server.state.feed_models import CHARGED, RELEASED, Feed, FeedClaim, FeedRelease
from civicdp.server.state.models import Dataset, LedgerEntry, Release


class Superseded(Exception):
    """The claim was marked failed (timed out) before the release could be stored."""


def loss_document(row: Dataset, amount: int) -> dict[str, Any]:
    """A release's loss as its signed document states it (pure: micro-epsilon; zCDP: nano-rho and epsilon)."""
    accounting = registry.metadata_of(row).accounting.rule
    if not accounting.zcdp:
        return {"epsilon_micro": amount, "delta": 0}
    return {"rho_nano": amount, "epsilon": accounting.shown(amount)["epsilon"], "delta": accounting.delta}


def compute(engine: Engine, signing_key: Callable[[], SigningKey], feed: Feed, number: int, period: str, row: Dataset, plans: Plans,
            loss: int, now: datetime) -> tuple[bytes, str, str]:
    """Read the data and compute every spec, then the signed canonical bytes (after the charge only)."""
    results = [(spec, plan, engine.execute(plan)) for spec, plan in plans]
    key = signing_key()
    document = plain({
        "format": FORMAT, "feed": feed.name, "number": number, "releases": feed.releases, "period": period,
        "schedule": feed.schedule, "dataset": row.name, "dataset_version": row.version,
        "released_at": now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "loss": loss_document(row, loss),
        "signed_by": f"{key.name}+{key.verifier.id.hex()}",
        "results": [{"query": json.loads(spec.canonical()), "loss_micro": charge_of(row, [(spec, plan)]),
                     "columns": result.table.columns, "rows": result.table.to_dicts(),
                     "tables": {name: {"columns": t.columns, "rows": t.to_dicts()}
                                for name, t in result.tables.items()},
                     "contributions": result.contributions, "confidence": result.confidence,
                     "mechanisms": result.mechanisms, "notes": result.notes}
                    for spec, plan, result in results],
    })
    data = canonical_bytes(document)
    return data, hashlib.sha256(data).hexdigest(), sign_release(key, data)


def store(db: DbEngine, feed: Feed, claim: Claim, row: Dataset, caller: Caller | None, data: bytes, digest: str,
          signature: str, now: datetime) -> ReleaseView:
    """The second transaction: the release stored, its claim released, the charge linked to it."""
    feed_query = json.dumps({"feed": feed.name, "number": claim.number, "period": claim.period,
                             "specs": json.loads(feed.specs_json)}, sort_keys=True, separators=(",", ":"))
    with session_scope(db) as session:
        released = session.execute(update(FeedClaim).where(
            FeedClaim.id == claim.id, FeedClaim.attempt == claim.attempt, FeedClaim.state == CHARGED,
        ).values(state=RELEASED, finished_at=now)).rowcount
        if not released:
            raise Superseded  # marked failed meanwhile (timed out): this late result never leaves
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
        return ReleaseView.of(feed, made, fresh=True)
