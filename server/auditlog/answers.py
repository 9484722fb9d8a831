"""Stored answers against the hash their release entry records.

A release's bytes must hash to its ``result_hash``, and an audit entry must record that
hash for that release (and its dataset, version and question): :func:`release_problem`.
The server serves a cached answer only if it passes (:func:`check_stored_answer`, from
``server/services/query_service.py``); otherwise 503 (:class:`StoredAnswerFailed`), an
alarm that readiness lists, and a refusal entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session

from civicdp.server.auditlog.alarms import Alarm, Alarms, IntegrityFailure, alarms_for, release_key
from civicdp.server.auditlog.append import record
from civicdp.server.auditlog.canonical import checked_leaf
from civicdp.server.auditlog.evidence import (
    LEGACY_RELEASE_ACTION, RELEASE_ACTIONS, Disagreement, ReleaseClaim, ReleaseRow, release_claim,
)
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import reader, session_scope
from civicdp.server.state.models import AuditEntry, Release

if TYPE_CHECKING:
    from civicdp.server.auditlog.log import AuditLog

logger = logging.getLogger("civicdp.integrity")
_VERIFIED_MAX = 50_000


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def release_problem(release: ReleaseRow, claims: list[ReleaseClaim], digest: str | None = None) -> tuple[str, str] | None:
    """(problem, detail) if the stored answer is not what its audit entry recorded, else None."""
    digest = digest or _digest(release.result_json)
    if digest != release.result_hash:
        return ("its stored bytes do not hash to its stored result hash",
                f"the stored answer hashes to {digest}, its row says {release.result_hash}: the answer was edited")
    if not claims:
        return ("no audit entry records this release",
                "no query.release or feed.release entry names this release: it was not released by the server, or "
                "its entry was removed")
    for claim in claims:
        if (claim.result_hash == digest and claim.dataset in (None, release.dataset)
                and claim.dataset_version in (None, release.dataset_version)
                and claim.query_hash in (None, release.query_hash)):
            return None
    claim = claims[-1]
    return ("its result hash differs from the one its audit entry records",
            f"audit entry {claim.seq} records result hash {claim.result_hash} for dataset {claim.dataset} "
            f"version {claim.dataset_version} and question {claim.query_hash}; the stored release has "
            f"{digest} for {release.dataset} version {release.dataset_version} and question {release.query_hash}")


def check_releases(releases: Iterable[ReleaseRow], claims: dict[int, list[ReleaseClaim]]) -> list[Disagreement]:
    found = []
    for release in releases:
        problem = release_problem(release, claims.get(release.id, []))
        if problem is not None:
            found.append(Disagreement("release", problem[0], problem[1], release_id=release.id))
    return found


# -- in the server --------------------------------------------------------------------------------


class StoredAnswerFailed(IntegrityFailure):
    """A stored answer whose bytes are not what its audit entry recorded: not served."""

    def __init__(self, release_id: int, problem: str) -> None:
        super().__init__(f"the stored answer (release {release_id}) failed its integrity check ({problem}); it is "
                         "not served, and nothing was charged (GET /v1/ready lists refused releases)")


def _stored_answer_problem(db: DbEngine, alarms: Alarms, stored: Release, digest: str) -> tuple[str, str] | None:
    row = ReleaseRow(int(stored.id or 0), stored.dataset, stored.dataset_version, stored.query_hash,
                     stored.result_json, stored.result_hash)
    if digest != stored.result_hash:
        return release_problem(row, [], digest)
    pattern = f'%"release_id":{row.id},%'
    claims: list[ReleaseClaim] = []
    log: AuditLog | None = alarms.audit_log() if alarms.audit_log is not None else None
    with Session(reader(db)) as session:
        for actions in (RELEASE_ACTIONS, (LEGACY_RELEASE_ACTION,)):
            for seq, text, hex_hash in session.execute(
                    select(AuditEntry.seq, AuditEntry.entry_json, AuditEntry.leaf_hash)
                    .where(AuditEntry.action.in_(actions), AuditEntry.entry_json.like(pattern))  # type: ignore[attr-defined]
                    .order_by(AuditEntry.seq)):
                leaf = checked_leaf(seq, text, hex_hash)
                if isinstance(leaf, str):
                    return ("its audit entry was changed", leaf)
                if log is not None and log.leaf(seq) not in (None, leaf):
                    return ("its audit entry is not the one the log signed",
                            f"entry {seq} differs from the entry this server read and signed")
                claim = release_claim(seq, json.loads(text))
                if claim is not None and claim.release_id == row.id:
                    claims.append(claim)
            if claims:
                break
    return release_problem(row, claims, digest)


def check_stored_answer(db: DbEngine, caller: Caller | None, stored: Release) -> None:
    """Serve a cached answer only if its bytes hash to its ``result_hash`` and its audit entry records that hash.

    Otherwise: the alarm (readiness lists the release), a refusal entry with the reason,
    and :class:`StoredAnswerFailed` (503). The log is searched once per release and
    process; afterwards only the bytes are hashed again.
    """
    alarms = alarms_for(db)
    digest = _digest(stored.result_json)
    vouched = (digest, stored.dataset, stored.dataset_version, stored.query_hash)
    release_id = int(stored.id or 0)
    if digest == stored.result_hash and alarms.verified.get(release_id) == vouched:
        return
    problem = _stored_answer_problem(db, alarms, stored, digest)
    if problem is None:
        with alarms.lock:
            if len(alarms.verified) >= _VERIFIED_MAX:
                alarms.verified.pop(next(iter(alarms.verified)))
            alarms.verified[release_id] = vouched
        return
    short, detail = problem
    with alarms.lock:
        alarm = alarms.releases.get(release_id)
        if alarm is None:
            alarm = alarms.releases[release_id] = Alarm(short, detail, datetime.now(timezone.utc),
                                                        {"release_id": release_id})
            logger.critical("INTEGRITY ALARM: release %s: %s; it is not served", release_id, detail)
        alarms.verified.pop(release_id, None)
    failure = StoredAnswerFailed(release_id, short)
    with session_scope(db) as session:
        record(session, caller, "query.run", stored.dataset, "refused", reason=str(failure.detail),
               dataset=stored.dataset, dataset_version=stored.dataset_version, release_id=release_id,
               query_hash=stored.query_hash, loss_micro=0, integrity=detail)
    if not alarm.recorded:
        alarm.recorded = True
        alarms.share(release_key(release_id), alarm)
    raise failure
