"""State that checks itself: budgets against their ledger and the audit log, stored answers against theirs.

The audit log holds the evidence of every charge and every release
(:mod:`civicdp.server.auditlog.evidence`). This module reads a database in one snapshot
and compares it with that evidence: budgets (:mod:`civicdp.server.auditlog.budgets`) and
stored answers (:mod:`civicdp.server.auditlog.answers`).

The server runs :func:`check_state` when it starts and periodically (the
``state_check`` of :class:`civicdp.server.auditlog.log.AuditLog`, which the server wires),
and refuses to spend from a budget that disagrees (the ledger's spend check,
:func:`civicdp.server.auditlog.budgets.refuse_disagreeing_budgets`) and to serve a cached
answer that fails its check (:func:`civicdp.server.auditlog.answers.check_stored_answer`);
both are answered 503, raise an alarm (readiness lists them) and are audited
(``integrity.alarm``, and ``integrity.restored`` once they agree again). ``civicdp audit
reconcile`` runs the same comparison offline, between an exported bundle (verified
first) and a database (:mod:`civicdp.server.auditlog.offline`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select
from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session

from civicdp.server.auditlog.alarms import Alarm, alarms_for, budget_key, release_key
from civicdp.server.auditlog.answers import check_releases
from civicdp.server.auditlog.append import record
from civicdp.server.auditlog.budgets import AuditFolds, compare
from civicdp.server.auditlog.evidence import BudgetRow, Disagreement, LedgerRow, ReleaseRow
from civicdp.server.auditlog.integrity import snapshot
from civicdp.server.auditlog.kept import Kept, keep, stored
from civicdp.server.auditlog.ledger_folds import LedgerFolds
from civicdp.server.state.db import session_scope
from civicdp.server.state.models import AuditEntry, Budget, LedgerEntry, Release

if TYPE_CHECKING:
    from civicdp.server.auditlog.log import AuditLog

logger = logging.getLogger("civicdp.integrity")


# -- reading a database ------------------------------------------------------------------------------


def budget_rows(session: Session) -> list[BudgetRow]:
    return [BudgetRow(*row) for row in session.execute(
        select(Budget.id, Budget.dataset, Budget.scope, Budget.subject, Budget.period, Budget.cap_micro,
               Budget.spent_micro))]


def _ledger_rows(session: Session) -> list[LedgerRow]:
    return [LedgerRow(*row) for row in session.execute(
        select(LedgerEntry.id, LedgerEntry.budget_id, LedgerEntry.amount_micro, LedgerEntry.spent_before_micro,
               LedgerEntry.spent_after_micro))]


def release_rows(session: Session, after: int = 0) -> Iterator[ReleaseRow]:
    for row in session.execute(select(Release.id, Release.dataset, Release.dataset_version, Release.query_hash,
                                      Release.result_json, Release.result_hash)
                               .where(Release.id > after).order_by(Release.id)):  # type: ignore[arg-type, operator]
        yield ReleaseRow(*row)


def _evidence_rows(session: Session, after: int = -1, below: int | None = None) -> Iterator[tuple[int, str]]:
    """Stored entries that may be charges or releases, oldest first, numbered ``after + 1`` on (and below ``below``)."""
    query = (select(AuditEntry.seq, AuditEntry.entry_json)
             .where(AuditEntry.seq > after,
                    or_(AuditEntry.entry_json.like('%"ledger":[%'), AuditEntry.entry_json.like('%"release_id":%')))
             .order_by(AuditEntry.seq))
    if below is not None:
        query = query.where(AuditEntry.seq < below)
    yield from session.execute(query)


def fold_verified(session: Session, folds: AuditFolds, below: int) -> AuditFolds:
    """Fold into ``folds`` the entries after its ``upto`` and below ``below`` (a size the log's check verified)."""
    if below - 1 <= folds.upto:
        return folds
    key_of = {b.id: b.key for b in budget_rows(session)}
    for seq, text in _evidence_rows(session, after=folds.upto, below=below):
        folds.add(seq, text, key_of)
    folds.upto = below - 1
    return folds


def _fold_database(session: Session, folds: AuditFolds | None = None, kept: Kept | None = None
                   ) -> tuple[list[Disagreement], AuditFolds, LedgerFolds, int]:
    """Fold the entries after ``folds.upto`` and compare: every budget, and the stored answers.

    With ``kept`` (a start), the ledger is folded from ``kept.ledger`` on unless its entries
    no longer add up to it, and only the answers stored after ``kept.releases`` are
    checked. Also gives the ledger's folds and the last release checked.
    """
    budgets = budget_rows(session)
    key_of = {b.id: b.key for b in budgets}
    folds = folds or AuditFolds()
    top = session.execute(select(func.max(AuditEntry.seq))).scalar_one_or_none()
    for seq, text in _evidence_rows(session, after=folds.upto):
        folds.add(seq, text, key_of)
    folds.upto = max(folds.upto, -1 if top is None else int(top))
    if kept is not None and kept.ledger is not None and not kept.ledger.changed(session):
        ledger = kept.ledger.extend(session)
    else:
        ledger = LedgerFolds.full(session)
    found = compare(budgets, ledger.summaries(), folds)
    after = 0 if kept is None else kept.releases
    releases = list(release_rows(session, after))
    # Packed claims are all of releases up to ``kept.releases``: only a check of those reads them.
    claims = folds.claims if folds.packed is None or after >= folds.packed_upto else folds.unpack()
    found += check_releases(releases, claims)
    return found, folds, ledger, max([after, *(r.id for r in releases)])


def reconcile_database(db: DbEngine) -> list[Disagreement]:
    """Budgets and stored answers of ``db`` against the audit entries stored with them (one snapshot)."""
    with snapshot(db) as session:
        return _fold_database(session)[0]


# -- in the server --------------------------------------------------------------------------------


def check_state(db: DbEngine, log: AuditLog | None = None, quick: bool = False) -> list[Disagreement]:
    """Reconcile the database now: hold what disagrees, release what agrees again, audit both.

    With the server's ``log``, the folds of the entries its last check verified are kept
    (:mod:`civicdp.server.auditlog.kept`, also in the database); ``quick`` (a start) then
    folds the ledger from the kept folds and checks only the answers stored since.
    """
    alarms = alarms_for(db)
    alarms.refresh()  # the alarms other processes raised: cleared here only if this check finds them gone
    ok = alarms.log is None
    cached = alarms.evidence if ok and isinstance(alarms.evidence, AuditFolds) else None
    kept = alarms.kept if ok and isinstance(alarms.kept, Kept) else None
    alarms.evidence = alarms.kept = None  # taken: a failure part-way leaves nothing half-folded behind
    below = log.checked_size if ok and log is not None else None
    with snapshot(db) as session:
        if below is not None:
            kept = kept or stored(log) or Kept()  # type: ignore[arg-type]
            kept.folds = fold_verified(session, kept.folds, below)
            cached = cached or kept.folds.copy()
        found, folds, ledger, checked = _fold_database(session, cached, kept if quick else None)
    unchecked = kept.releases if quick and kept is not None else 0  # their alarms stand
    if alarms.log is None:
        alarms.evidence = folds
        if kept is not None and log is not None:
            kept.ledger = ledger
            kept.releases = max(kept.releases, checked) if quick else checked
            alarms.kept = kept
            keep(log, kept, only_if_none=quick)
    now = datetime.now(timezone.utc)
    budgets = {f.key: f for f in found if f.kind == "budget"}
    releases = {f.release_id: f for f in found if f.kind == "release"}
    raised: list[tuple[str, Alarm]] = []
    restored: list[tuple[str, str, Alarm]] = []  # audit target, shared key, alarm
    with alarms.lock:
        for key, disagreement in budgets.items():
            alarm = alarms.budgets.get(key)  # type: ignore[arg-type]
            if alarm is None or alarm.detail != disagreement.detail:
                alarms.budgets[key] = Alarm(disagreement.problem, disagreement.detail,  # type: ignore[index]
                                            alarm.since if alarm else now, disagreement.info)
                raised.append((budget_key(key), alarms.budgets[key]))  # type: ignore[arg-type, index]
                logger.critical("INTEGRITY ALARM: %s; no charge is made to it", disagreement.line())
        for key in [k for k in alarms.budgets if k not in budgets]:
            alarm = alarms.budgets.pop(key)
            restored.append((f"budget:{alarm.info.get('budget_id')}", budget_key(key), alarm))
        for release_id, disagreement in releases.items():
            alarm = alarms.releases.get(release_id)  # type: ignore[arg-type]
            if alarm is None or alarm.detail != disagreement.detail:
                alarms.releases[release_id] = Alarm(disagreement.problem, disagreement.detail,  # type: ignore[index]
                                                    alarm.since if alarm else now, disagreement.info,
                                                    alarm.recorded if alarm else False)
                raised.append((release_key(release_id), alarms.releases[release_id]))  # type: ignore[arg-type, index]
                if alarm is None:
                    logger.critical("INTEGRITY ALARM: %s; it is not served", disagreement.line())
        for release_id in [r for r in alarms.releases if r not in releases and r > unchecked]:
            restored.append((f"release:{release_id}", release_key(release_id), alarms.releases.pop(release_id)))
        unrecorded = [(f"budget:{a.info.get('budget_id')}", budget_key(k), a)
                      for k, a in alarms.budgets.items() if not a.recorded]
        unrecorded += [(f"release:{r}", release_key(r), a) for r, a in alarms.releases.items() if not a.recorded]
    for key, alarm in raised:
        alarms.share(key, alarm)
    if alarms.log is not None:
        return found  # the log is frozen: these are recorded once it verifies again
    for target, key, alarm in unrecorded:
        with session_scope(db) as session:
            record(session, None, "integrity.alarm", target, "alarm", problem=alarm.problem, found=alarm.detail,
                   since=alarm.since, **_info(alarm))
        alarm.recorded = True
        alarms.share(key, alarm)
    if restored:
        alarms.flush()
    for target, key, alarm in restored:
        with session_scope(db) as session:
            # Recorded once: by the process that raised it, or that took it up and removes its row.
            if alarms.unshare(key, session) or not alarm.adopted:
                record(session, None, "integrity.restored", target, "restored", problem=alarm.problem,
                       since=alarm.since, **_info(alarm))
        logger.warning("integrity restored: %s (%s)", target, alarm.problem)
    return found


def _info(alarm: Alarm) -> dict[str, Any]:
    return {k: v for k, v in alarm.info.items() if k in ("dataset", "scope", "period", "budget_id", "release_id")}
