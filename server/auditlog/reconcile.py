"""State that checks itself: budgets against their ledger and the audit log, stored answers against theirs.

The audit log holds the evidence of every charge and every release: a charge's entry
(``query.run``, ``feed.charge``, a monitor's definition) lists each budget it moved with
``before_micro`` and ``after_micro``; a release's entry (``query.release``,
``feed.release``) names the release and the SHA-256 of its bytes (``result_hash``).
This module compares the database with that evidence:

- **budgets** (:func:`compare`): each budget row's ``spent_micro`` must equal
  the sum of its ledger entries and the ``after`` of its last ledger entry and of its
  last audited charge; its ledger entries and its audited charges must be the same
  charges, in order, each starting where the previous one ended (``before`` never goes
  back), each moving the budget by the entry's loss;
- **stored answers** (:func:`check_releases`): a release's bytes must hash to its
  ``result_hash``, and an audit entry must record that hash for that release (and its
  dataset, version and question).

The server runs both when it starts and periodically (:meth:`civicdp.server.auditlog.log.AuditLog.tick`)
and refuses to spend from a budget that disagrees (a hook in :func:`civicdp.server.state.ledger.charge`,
which also compares, in the charging transaction, the row's ``spent_micro`` with its last
ledger entry) and to serve a cached answer that fails its check
(:func:`check_stored_answer`, from ``server/services/query_service.py``); both are answered 503, raise an
alarm (readiness lists them) and are audited (``integrity.alarm``, and
``integrity.restored`` once they agree again). ``civicdp audit reconcile`` runs the same
comparison offline, between an exported bundle (verified first) and a database
(:func:`reconcile_export`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import case, func, or_, select
from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session

from civicdp.server.state import ledger
from civicdp.server.auditlog.log import Alarm, Alarms, AuditLog, IntegrityFailure, alarms_for, checked_leaf, current_slot, record
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import reader, session_scope
from civicdp.server.state.models import AuditEntry, Budget, LedgerEntry, Release

logger = logging.getLogger("civicdp.integrity")

ScopeKey = tuple[str, str, str, str]  # dataset, scope kind, subject, period
#: Entries that record a release and the hash of its bytes (``query.run``: before charge-first).
RELEASE_ACTIONS = ("query.release", "feed.release")
LEGACY_RELEASE_ACTION = "query.run"
_VERIFIED_MAX = 50_000


# -- what is compared ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetRow:
    id: int
    dataset: str
    scope: str
    subject: str
    period: str
    cap_micro: int
    spent_micro: int

    @property
    def key(self) -> ScopeKey:
        return (self.dataset, self.scope, self.subject, self.period)


@dataclass(frozen=True)
class LedgerRow:
    id: int
    budget_id: int
    amount_micro: int
    before_micro: int
    after_micro: int


@dataclass(frozen=True)
class Charge:
    """One budget moved by one audited charge (one item of an entry's ``ledger``)."""

    seq: int
    before_micro: int
    after_micro: int
    loss_micro: int | None
    key: ScopeKey | None = None  # query entries name the scope ...
    budget_id: int | None = None  # ... feed and monitor entries the budget row
    cap_micro: int | None = None


@dataclass(frozen=True)
class ReleaseClaim:
    """What an audit entry says about a release."""

    seq: int
    release_id: int
    result_hash: str
    dataset: str | None
    dataset_version: str | None
    query_hash: str | None


@dataclass(frozen=True)
class ReleaseRow:
    id: int
    dataset: str
    dataset_version: str
    query_hash: str
    result_json: str
    result_hash: str


@dataclass
class Disagreement:
    """State that disagrees with its evidence.

    ``problem`` is what readiness shows (no amounts, no contents); ``detail`` the full
    explanation (audit entry, server log, ``civicdp audit reconcile``).
    """

    kind: str  # budget | release | log
    problem: str
    detail: str
    key: ScopeKey | None = None
    budget_id: int | None = None
    release_id: int | None = None

    @property
    def info(self) -> dict[str, Any]:
        if self.kind == "budget":
            dataset, scope, subject, period = self.key or ("?", "?", "?", "?")
            return {"budget_id": self.budget_id, "dataset": dataset, "scope": scope, "period": period}
        if self.kind == "release":
            return {"release_id": self.release_id}
        return {}

    def line(self) -> str:
        if self.kind == "budget":
            dataset, scope, subject, period = self.key or ("?", "?", "?", "?")
            return f"budget {scope}/{subject}/{period} of {dataset}: {self.detail}"
        if self.kind == "release":
            return f"release {self.release_id}: {self.detail}"
        return f"audit log: {self.detail}"


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def charges_of(seq: int, entry: Any) -> list[Charge]:
    """The budget moves an entry records (an allowed entry with a ``ledger`` list in its detail)."""
    if not isinstance(entry, dict) or entry.get("decision") != "allowed":
        return []
    detail = entry.get("detail")
    if not isinstance(detail, dict) or not isinstance(detail.get("ledger"), list):
        return []
    dataset = detail.get("dataset")
    loss = _int(detail.get("loss_micro"))
    charges = []
    for item in detail["ledger"]:
        if not isinstance(item, dict):
            charges.append(Charge(seq, -1, -1, loss))  # malformed: disagrees with everything
            continue
        before, after = _int(item.get("before_micro")), _int(item.get("after_micro"))
        if before is None or after is None:
            charges.append(Charge(seq, -1, -1, loss))
            continue
        budget_id = _int(item.get("budget_id"))
        key = None
        if budget_id is None:
            key = (str(dataset), str(item.get("scope")), str(item.get("subject")), str(item.get("period")))
        charges.append(Charge(seq, before, after, loss, key, budget_id, _int(item.get("cap_micro"))))
    return charges


def release_claim(seq: int, entry: Any) -> ReleaseClaim | None:
    """What an entry says about a release: ``query.release``/``feed.release``, or a legacy ``query.run``."""
    if not isinstance(entry, dict):
        return None
    action, decision, detail = entry.get("action"), entry.get("decision"), entry.get("detail")
    if not isinstance(detail, dict):
        return None
    if not (action in RELEASE_ACTIONS and decision in ("released", "allowed")
            or action == LEGACY_RELEASE_ACTION and decision == "allowed"):
        return None
    release_id, result_hash = _int(detail.get("release_id")), detail.get("result_hash")
    if release_id is None or not isinstance(result_hash, str):
        return None
    return ReleaseClaim(seq, release_id, result_hash, detail.get("dataset"), detail.get("dataset_version"),
                        detail.get("query_hash"))


# -- budgets -----------------------------------------------------------------------------------


@dataclass
class Fold:
    """One budget's charges folded in order: how many, their total, where they end, the first problem.

    ``sum_after`` (the sum of where each charge ended) fingerprints the sequence, so a
    ledger and an audit trail with the same count and end but other steps still differ.
    """

    count: int = 0
    total: int = 0
    end: int = 0
    sum_after: int = 0
    problem: tuple[str, str] | None = None

    def add(self, before: int, after: int, *, amount: int | None = None, loss: int | None = None,
            cap: int | None = None, where: str = "") -> None:
        index = self.count + 1
        if self.problem is None:
            what = f"charge {index}{where}"
            if before != self.end:
                direction = "went back" if before < self.end else "skipped ahead"
                self.problem = ("do not follow on from each other",
                                f"{what} starts at {before} but the one before ended at {self.end} "
                                f"(the spent amount {direction})")
            elif after <= before or (amount is not None and (amount <= 0 or after - before != amount)):
                self.problem = ("do not follow on from each other",
                                f"{what} moves it from {before} to {after}"
                                + (f" but its amount is {amount}" if amount is not None else ""))
            elif loss is not None and after - before != loss:
                self.problem = ("differ from their entries' losses",
                                f"{what} moves it by {after - before} but its entry's loss is {loss}")
            elif cap is not None and after > cap:
                self.problem = ("went beyond the caps they record", f"{what} ends at {after}, above its cap {cap}")
        self.count += 1
        self.total += after - before if amount is None else amount
        self.end = after
        self.sum_after += after


class AuditFolds:
    """The audited charges of every budget and the release claims, folded from entries in log order.

    In the server this is kept between reconciliations and only entries after ``upto``
    are read again: the stored log is verified against its signed checkpoints, so older
    entries cannot change without the log's alarm (which discards it).
    """

    def __init__(self) -> None:
        self.by_key: dict[ScopeKey, Fold] = {}
        self.orphans: dict[int, Fold] = {}  # charges naming a budget row id that is not in the database
        self.claims: dict[int, list[ReleaseClaim]] = defaultdict(list)
        self.upto = -1

    def add(self, seq: int, data: bytes | str, key_of: dict[int, ScopeKey]) -> None:
        raw = data.encode() if isinstance(data, str) else data
        if b'"ledger":[' not in raw and b'"release_id":' not in raw:
            return
        try:
            entry = json.loads(raw)
        except ValueError:
            return
        for charge in charges_of(seq, entry):
            key = charge.key or key_of.get(charge.budget_id if charge.budget_id is not None else -1)
            if key is None:
                fold = self.orphans.setdefault(charge.budget_id if charge.budget_id is not None else -1, Fold())
            else:
                fold = self.by_key.setdefault(key, Fold())
            fold.add(charge.before_micro, charge.after_micro, loss=charge.loss_micro, cap=charge.cap_micro,
                     where=f" (entry {seq})")
        claim = release_claim(seq, entry)
        if claim is not None:
            self.claims[claim.release_id].append(claim)


def fold_ledger(rows: Iterable[LedgerRow]) -> dict[int, Fold]:
    folds: dict[int, Fold] = {}
    for row in sorted(rows, key=lambda r: r.id):
        folds.setdefault(row.budget_id, Fold()).add(row.before_micro, row.after_micro, amount=row.amount_micro)
    return folds


def compare(budgets: Iterable[BudgetRow], ledger_folds: dict[int, Fold], audited: AuditFolds) -> list[Disagreement]:
    """Every budget whose spent amount, ledger entries and audited charges do not tell one story."""
    rows = {b.id: b for b in budgets}
    by_key = {b.key: b for b in rows.values()}
    found: list[Disagreement] = []
    for budget_id, fold in sorted(audited.orphans.items()):
        found.append(Disagreement("budget", "audited charges on a budget row that is not in the database",
                                  f"{fold.count} audited charges on budget row {budget_id}, which is not in the "
                                  "database", ("?", "?", "?", "?"), budget_id))
    for budget_id in sorted(set(ledger_folds) - set(rows)):
        found.append(Disagreement("budget", "ledger entries of a budget row that is not in the database",
                                  f"{ledger_folds[budget_id].count} ledger entries charge budget row {budget_id}, "
                                  "which is not in the database", ("?", "?", "?", "?"), budget_id))
    for key in sorted(set(by_key) | set(audited.by_key)):
        budget = by_key.get(key)
        charged = audited.by_key.get(key, Fold())
        problems: list[tuple[str, str]] = []
        if budget is None:
            problems.append(("audited charges on a budget row that is not in the database",
                             f"{charged.count} audited charges ending at {charged.end}, but no budget row"))
        else:
            spent = budget.spent_micro
            own = ledger_folds.get(budget.id, Fold())
            if own.total != spent:
                problems.append(("spent amount differs from the sum of its ledger entries",
                                 f"spent_micro is {spent} but its {own.count} ledger entries add up to {own.total}"))
            if own.end != spent:
                problems.append(("spent amount differs from its last ledger entry",
                                 f"spent_micro is {spent} but its last ledger entry ended at {own.end}"))
            if own.problem is not None:
                problems.append((f"its ledger entries {own.problem[0]}", f"ledger: {own.problem[1]}"))
            if charged.end != spent:
                problems.append(("spent amount differs from its audited charges",
                                 f"spent_micro is {spent} but the audit log's {charged.count} charges end at "
                                 f"{charged.end}"))
            if (own.count, own.end, own.sum_after) != (charged.count, charged.end, charged.sum_after):
                problems.append(("its ledger entries differ from its audited charges",
                                 f"{own.count} ledger entries ending at {own.end} and {charged.count} audited "
                                 f"charges ending at {charged.end}"
                                 + (" (with different steps)" if (own.count, own.end) == (charged.count, charged.end)
                                    else "")))
        if charged.problem is not None:
            problems.append((f"its audited charges {charged.problem[0]}", f"audit log: {charged.problem[1]}"))
        if problems:
            found.append(Disagreement("budget", problems[0][0], "; ".join(d for _, d in problems), key,
                                      budget.id if budget else None))
    return found


def reconcile_budgets(budgets: Iterable[BudgetRow], ledger_rows: Iterable[LedgerRow],
                      charges: Iterable[Charge]) -> list[Disagreement]:
    """:func:`compare` for rows and charges in memory (charges in log order)."""
    budgets = list(budgets)
    key_of = {b.id: b.key for b in budgets}
    audited = AuditFolds()
    for charge in sorted(charges, key=lambda c: c.seq):
        key = charge.key or key_of.get(charge.budget_id if charge.budget_id is not None else -1)
        fold = (audited.by_key.setdefault(key, Fold()) if key is not None
                else audited.orphans.setdefault(charge.budget_id if charge.budget_id is not None else -1, Fold()))
        fold.add(charge.before_micro, charge.after_micro, loss=charge.loss_micro, cap=charge.cap_micro,
                 where=f" (entry {charge.seq})")
    return compare(budgets, fold_ledger(ledger_rows), audited)


# -- stored answers ------------------------------------------------------------------------------


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


# -- reading a database ------------------------------------------------------------------------------


def snapshot(db: DbEngine) -> Session:
    """A read-only session whose statements all see one state (charges commit with their entries)."""
    if db.dialect.name == "sqlite":
        return Session(reader(db))
    return Session(db.execution_options(isolation_level="REPEATABLE READ"))


def _budget_rows(session: Session) -> list[BudgetRow]:
    return [BudgetRow(*row) for row in session.execute(
        select(Budget.id, Budget.dataset, Budget.scope, Budget.subject, Budget.period, Budget.cap_micro,
               Budget.spent_micro))]


def ledger_summaries(session: Session) -> dict[int, Fold]:
    """Each budget row's ledger entries folded in the database (one pass, window functions)."""
    entry = LedgerEntry.__table__.c  # type: ignore[attr-defined]
    previous = func.lag(entry.spent_after_micro, 1, 0).over(partition_by=entry.budget_id, order_by=entry.id)
    newest = func.row_number().over(partition_by=entry.budget_id, order_by=entry.id.desc())
    inner = select(entry.budget_id.label("budget"), entry.amount_micro.label("amount"),
                   entry.spent_before_micro.label("before"), entry.spent_after_micro.label("after"),
                   previous.label("previous"), newest.label("newest")).subquery()
    broken = case((or_(inner.c.before != inner.c.previous, inner.c.amount <= 0,
                       inner.c.after - inner.c.before != inner.c.amount), 1), else_=0)
    rows = session.execute(select(inner.c.budget, func.count(), func.sum(inner.c.amount), func.sum(inner.c.after),
                                  func.sum(broken), func.max(case((inner.c.newest == 1, inner.c.after))))
                           .group_by(inner.c.budget))
    folds = {}
    for budget_id, count, total, sum_after, bad, end in rows:
        fold = Fold(int(count), int(total or 0), int(end or 0), int(sum_after or 0))
        if bad:
            fold.problem = ("do not follow on from each other",
                            f"{int(bad)} of its {int(count)} ledger entries do not start where the one before "
                            "ended or do not move it by their amount")
        folds[int(budget_id)] = fold
    return folds


def _ledger_rows(session: Session) -> list[LedgerRow]:
    return [LedgerRow(*row) for row in session.execute(
        select(LedgerEntry.id, LedgerEntry.budget_id, LedgerEntry.amount_micro, LedgerEntry.spent_before_micro,
               LedgerEntry.spent_after_micro))]


def _release_rows(session: Session) -> Iterator[ReleaseRow]:
    for row in session.execute(select(Release.id, Release.dataset, Release.dataset_version, Release.query_hash,
                                      Release.result_json, Release.result_hash).order_by(Release.id)):
        yield ReleaseRow(*row)


def _evidence_rows(session: Session, after: int = -1) -> Iterator[tuple[int, str]]:
    """Stored entries that may be charges or releases, oldest first, from number ``after + 1`` on."""
    query = (select(AuditEntry.seq, AuditEntry.entry_json)
             .where(AuditEntry.seq > after,
                    or_(AuditEntry.entry_json.like('%"ledger":[%'), AuditEntry.entry_json.like('%"release_id":%')))
             .order_by(AuditEntry.seq))
    yield from session.execute(query)


def _fold_database(session: Session, folds: AuditFolds | None = None
                   ) -> tuple[list[Disagreement], AuditFolds]:
    budgets = _budget_rows(session)
    key_of = {b.id: b.key for b in budgets}
    folds = folds or AuditFolds()
    top = session.execute(select(func.max(AuditEntry.seq))).scalar_one_or_none()
    for seq, text in _evidence_rows(session, after=folds.upto):
        folds.add(seq, text, key_of)
    folds.upto = max(folds.upto, -1 if top is None else int(top))
    found = compare(budgets, ledger_summaries(session), folds)
    found += check_releases(_release_rows(session), folds.claims)
    return found, folds


def reconcile_database(db: DbEngine) -> list[Disagreement]:
    """Budgets and stored answers of ``db`` against the audit entries stored with them (one snapshot)."""
    with snapshot(db) as session:
        return _fold_database(session)[0]


# -- in the server ---------------------------------------------------------------------------------


class BudgetHeld(IntegrityFailure):
    """A charge from a budget that failed reconciliation: nothing was charged."""

    def __init__(self, dataset: str, scope: str, period: str, problem: str) -> None:
        super().__init__(f"the {scope} budget of dataset {dataset} for {period} failed its integrity check "
                         f"({problem}); nothing was charged, and nothing is charged to it until its spent amount "
                         "agrees with its ledger and the audit log again (GET /v1/ready lists held budgets)")


class StoredAnswerFailed(IntegrityFailure):
    """A stored answer whose bytes are not what its audit entry recorded: not served."""

    def __init__(self, release_id: int, problem: str) -> None:
        super().__init__(f"the stored answer (release {release_id}) failed its integrity check ({problem}); it is "
                         "not served, and nothing was charged (GET /v1/ready lists refused releases)")


def _hold(alarms: Alarms, found: Disagreement) -> Alarm:
    with alarms.lock:
        alarm = alarms.budgets.get(found.key)  # type: ignore[arg-type]
        if alarm is None:
            alarm = Alarm(found.problem, found.detail, datetime.now(timezone.utc), found.info)
            alarms.budgets[found.key] = alarm  # type: ignore[index]
            logger.critical("INTEGRITY ALARM: %s; no charge is made to it", found.line())
        return alarm


def refuse_disagreeing_budgets(session: Session, dataset: str, budgets: list[ledger.BudgetStatus]) -> None:
    """The ledger's spend check: refuse a held budget, or one whose spent amount is not its last entry's.

    One statement reads each row's ``spent_micro`` and the ``after`` of its last ledger
    entry together (one snapshot), before the charge updates anything.
    """
    alarms = alarms_for(session.get_bind())
    for status in budgets:
        held = alarms.budgets.get((dataset, status.scope, status.subject, status.period))
        if held is not None:
            _refuse(BudgetHeld(dataset, status.scope, status.period, held.problem))
    ids = [s.budget_id for s in budgets if s.budget_id is not None]
    if not ids:
        return
    last = (select(LedgerEntry.spent_after_micro).where(LedgerEntry.budget_id == Budget.id)
            .order_by(LedgerEntry.id.desc()).limit(1).correlate(Budget).scalar_subquery())  # type: ignore[union-attr]
    rows = session.execute(select(Budget.id, Budget.scope, Budget.subject, Budget.period, Budget.spent_micro, last)
                           .where(Budget.id.in_(ids))).all()  # type: ignore[union-attr]
    for budget_id, scope, subject, period, spent, after in rows:
        if spent != (after or 0):
            found = Disagreement("budget", "spent amount differs from its last ledger entry",
                                 f"spent_micro is {spent} but its last ledger entry ended at {after or 0} "
                                 "(found when charging)", (dataset, scope, subject, period), budget_id)
            _refuse(BudgetHeld(dataset, scope, period, _hold(alarms, found).problem))


def _refuse(failure: IntegrityFailure) -> None:
    slot = current_slot()
    if slot is not None:
        slot.reason = str(failure.detail)
    raise failure


if refuse_disagreeing_budgets not in ledger.SPEND_CHECKS:
    ledger.SPEND_CHECKS.append(refuse_disagreeing_budgets)


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
    alarm.recorded = True
    raise failure


def check_state(db: DbEngine, log: AuditLog | None = None) -> list[Disagreement]:
    """Reconcile the database now: hold what disagrees, release what agrees again, audit both."""
    alarms = alarms_for(db)
    cached = alarms.evidence if alarms.log is None and isinstance(alarms.evidence, AuditFolds) else None
    alarms.evidence = None  # taken: a failure part-way leaves nothing half-folded behind
    with snapshot(db) as session:
        found, folds = _fold_database(session, cached)
    if alarms.log is None:
        alarms.evidence = folds
    now = datetime.now(timezone.utc)
    budgets = {f.key: f for f in found if f.kind == "budget"}
    releases = {f.release_id: f for f in found if f.kind == "release"}
    restored: list[tuple[str, Alarm]] = []
    with alarms.lock:
        for key, disagreement in budgets.items():
            alarm = alarms.budgets.get(key)  # type: ignore[arg-type]
            if alarm is None or alarm.detail != disagreement.detail:
                alarms.budgets[key] = Alarm(disagreement.problem, disagreement.detail,  # type: ignore[index]
                                            alarm.since if alarm else now, disagreement.info)
                logger.critical("INTEGRITY ALARM: %s; no charge is made to it", disagreement.line())
        for key in [k for k in alarms.budgets if k not in budgets]:
            restored.append((f"budget:{alarms.budgets[key].info.get('budget_id')}", alarms.budgets.pop(key)))
        for release_id, disagreement in releases.items():
            alarm = alarms.releases.get(release_id)  # type: ignore[arg-type]
            if alarm is None or alarm.detail != disagreement.detail:
                alarms.releases[release_id] = Alarm(disagreement.problem, disagreement.detail,  # type: ignore[index]
                                                    alarm.since if alarm else now, disagreement.info,
                                                    alarm.recorded if alarm else False)
                if alarm is None:
                    logger.critical("INTEGRITY ALARM: %s; it is not served", disagreement.line())
        for release_id in [r for r in alarms.releases if r not in releases]:
            restored.append((f"release:{release_id}", alarms.releases.pop(release_id)))
        unrecorded = [(f"budget:{a.info.get('budget_id')}", a) for a in alarms.budgets.values() if not a.recorded]
        unrecorded += [(f"release:{r}", a) for r, a in alarms.releases.items() if not a.recorded]
    if alarms.log is not None:
        return found  # the log is frozen: these are recorded once it verifies again
    for target, alarm in unrecorded:
        with session_scope(db) as session:
            record(session, None, "integrity.alarm", target, "alarm", problem=alarm.problem, found=alarm.detail,
                   since=alarm.since, **_info(alarm))
        alarm.recorded = True
    for target, alarm in restored:
        with session_scope(db) as session:
            record(session, None, "integrity.restored", target, "restored", problem=alarm.problem,
                   since=alarm.since, **_info(alarm))
        logger.warning("integrity restored: %s (%s)", target, alarm.problem)
    return found


def _info(alarm: Alarm) -> dict[str, Any]:
    return {k: v for k, v in alarm.info.items() if k in ("dataset", "scope", "period", "budget_id", "release_id")}


# -- offline: an export and a database ---------------------------------------------------------------


@dataclass
class OfflineReport:
    entries: int  # in the export
    database_entries: int
    budgets: int
    releases: int
    found: list[Disagreement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        head = [f"compared {self.entries:,} exported entries with the database's {self.database_entries:,}, "
                f"{self.budgets:,} budgets and {self.releases:,} stored answers"]
        if not self.found:
            return [*head, "OK: every budget's spent amount is the sum of its ledger entries and of its audited "
                           "charges, charges follow on from each other, and every stored answer hashes to the "
                           "hash its audit entry records", *self.notes]
        return [*head, *(f"DISAGREES: {f.line()}" for f in self.found), *self.notes]


def reconcile_export(lines: list[bytes], db: DbEngine) -> OfflineReport:
    """Compare a (verified) export's entries with a database: its log, budgets and stored answers.

    Entries in the database beyond the export are used too (they are not vouched for by
    the export's signatures; a note says how many).
    """
    found: list[Disagreement] = []
    notes: list[str] = []
    with snapshot(db) as session:
        stored = 0
        beyond: list[tuple[int, str]] = []
        mismatch: str | None = None
        rows = session.execute(select(AuditEntry.seq, AuditEntry.entry_json).order_by(AuditEntry.seq))
        for seq, text in rows:
            stored += 1
            if seq >= len(lines):
                beyond.append((seq, text))
                continue
            if mismatch is None and (seq != stored - 1 or text.encode() != lines[seq]):
                expected = stored - 1
                mismatch = (f"entry {expected} is missing from the database (the next stored is {seq})"
                            if seq != expected else
                            f"entry {seq} in the database differs from the exported one (changed or reordered)")
        if mismatch is None and stored < len(lines):
            mismatch = (f"the database holds {stored:,} entries, the export {len(lines):,}: entries were deleted "
                        "from the database")
        if mismatch is not None:
            found.append(Disagreement("log", "the database's log differs from the export", mismatch))
        if beyond:
            notes.append(f"note: {len(beyond):,} entries in the database came after the export and are not covered "
                         "by its signatures (export again to cover them)")
        budgets = _budget_rows(session)
        key_of = {b.id: b.key for b in budgets}
        folds = AuditFolds()
        for seq, data in [*enumerate(lines), *beyond]:
            folds.add(seq, data, key_of)
        found += compare(budgets, ledger_summaries(session), folds)
        releases = 0
        for release in _release_rows(session):
            releases += 1
            problem = release_problem(release, folds.claims.get(release.id, []))
            if problem is not None:
                found.append(Disagreement("release", problem[0], problem[1], release_id=release.id))
    return OfflineReport(len(lines), stored, len(budgets), releases, found, notes)
