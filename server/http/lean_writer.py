"""The lean path's group-commit writer: one thread per process checks and records waiting requests.

The writer takes every request waiting (at most :data:`MAX_BATCH`), checks them and
appends their entries (consecutive numbers, one bump of the log's counter) in one
transaction, commits, and only then lets each answer go. An answer never leaves before
its entry is durable; a request whose checks fail writes nothing here and is handed to
the full path. Checked for every request: the key's HMAC against the remembered secret
hash, the policy decision and roles (the policy store, which follows the stored policy
version); and, *inside the transaction that writes the entry*, the key's row (not
revoked, not expired, same secret hash, account not disabled), the dataset's registered
version (a stale version is never answered), and the release row's bytes and hash
(compared with the checked ones, :mod:`civicdp.server.http.lean_memo`).

The writer keeps the time each stage took (:class:`Stages`), logged when the app stops
(``civicdp.lean``), which is what the W3 benchmark prints as the per-request profile.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import and_, bindparam, or_, select
from sqlmodel import Session

from civicdp.policies.actions import Action
from civicdp.server.state import ledger
from civicdp.server.auditlog.alarms import alarms_for
from civicdp.server.auditlog.append import append_many
from civicdp.server.http.lean_memo import KEY_COLUMNS, REMEMBERED, CachedRelease, Keys, Releases, release_key
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import write_turn
from civicdp.server.state.models import Account, ApiKey, Budget, Dataset, Release
from civicdp.server.services.schemas import BudgetOut
from civicdp.server.services.query_service import CachedQuestion

logger = logging.getLogger("civicdp.lean")

MAX_BATCH = 256
SWITCH_INTERVAL = 0.0005  # seconds
_BUDGETS = TypeAdapter(list[BudgetOut])


class Stages:
    """Wall time per stage of the lean path, summed over requests (thread-safe enough: one writer)."""

    NAMES = ("authentication", "planning", "policy", "key_recheck", "cache_read", "budgets", "audit_append",
             "commit", "serialisation")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.NAMES, 0.0)  # CPU time of the thread doing the stage
        self.wall = {"queue": 0.0, "commit": 0.0}  # waiting for the writer; the commit as the disk sees it
        self.answered = 0
        self.declined: dict[str, int] = {}
        self.batches = 0
        self.lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def decline(self, reason: str) -> None:
        with self.lock:
            self.declined[reason] = self.declined.get(reason, 0) + 1

    def report(self) -> dict[str, Any]:
        per = max(self.answered, 1)
        return {"answered": self.answered, "declined": dict(self.declined), "batches": self.batches,
                "mean_batch": round(self.answered / max(self.batches, 1), 2),
                "us_per_answer": {k: round(v / per * 1e6, 1) for k, v in self.seconds.items()},
                "wall_us_per_answer": {k: round(v / per * 1e6, 1) for k, v in self.wall.items()}}


@dataclass
class Job:
    """One request waiting for the writer."""

    prefix: str
    computed: str  # HMAC of the presented secret
    question: CachedQuestion
    method: str
    path: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    submitted: float = 0.0
    forget: bool = False  # its question was planned at a version no longer registered: plan it again
    loop_cpu: dict[str, float] = field(default_factory=dict)  # its stages on the event loop
    result: Any = None
    caller: Caller | None = None
    roles: list[str] = field(default_factory=list)
    rule: list[str] | None = None


@dataclass
class Answer:
    body: bytes
    caller: Caller
    roles: list[str]
    rule: list[str] | None
    dataset: str


class Writer:
    """The group-commit writer of one process: checks and records waiting requests, one transaction at a time."""

    def __init__(self, state: Any, stages: Stages) -> None:
        self.state = state
        self.stages = stages
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.keys = Keys(REMEMBERED)
        self.releases = Releases(REMEMBERED)
        self._conn: Any = None
        # The writer releases the GIL at every statement; getting it back from a busy event loop
        # waits up to the switch interval (5 ms by default), several times per group commit.
        if sys.getswitchinterval() > SWITCH_INTERVAL:
            sys.setswitchinterval(SWITCH_INTERVAL)
        self._thread = threading.Thread(target=self._run, name="civicdp-lean-writer", daemon=True)
        self._thread.start()

    def _connection(self) -> Any:
        """The writer's own connection (no pool checkout, no ping per batch), opened again after an error."""
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = self.state.db.connect()
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - it was already broken
                pass

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                self._drop_connection()
                return
            batch = [job]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    more = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            try:
                self._batch(batch)
            except Exception:  # noqa: BLE001 - every job goes to the full path, which decides and audits
                logger.exception("the lean path could not record a batch; its requests take the full path")
                self._drop_connection()
                for job in batch:
                    job.result = None
                    self.stages.decline("error")
            for job in batch:
                job.loop.call_soon_threadsafe(_resolve, job.future, job.result)
            if stop:
                self._drop_connection()
                return

    # -- one batch ----------------------------------------------------------------------------

    def _batch(self, jobs: list[Job]) -> None:
        state, stages = self.state, self.stages
        alarms = alarms_for(state.db)
        if alarms.log is not None:
            for job in jobs:
                stages.decline("log_failed")
            return
        clock = _Clock(stages)
        for job in jobs:
            stages.wall["queue"] += clock.wall - job.submitted
        self.keys.learn(state.db, [job.prefix for job in jobs if job.prefix not in self.keys])
        clock.lap("authentication")
        live = self._decide(jobs)
        clock.lap("policy")
        if not live:
            return
        now = datetime.now(timezone.utc)
        connection = self._connection()
        with write_turn(state.db), connection.begin():  # SQLite: BEGIN IMMEDIATE, the write lock; committed at the end
            live = self._recheck_keys(connection, live, now)
            clock.lap("key_recheck")
            releases = self._releases(connection, live, alarms)
            live = [job for job in live if releases[release_key(job.question)] is not None]
            clock.lap("cache_read")
            if not live:
                return
            budgets = self._budgets(connection, live, releases, now)
            clock.lap("budgets")
            entries = []
            for job in live:
                cached = releases[release_key(job.question)]
                assert cached is not None
                entries.append({
                    "caller": job.caller, "action": Action.QUERY_RUN.value, "target": job.question.dataset,
                    "decision": "cached", "rule": job.rule, "roles": job.roles,
                    "request": {"method": job.method, "path": job.path},
                    "detail": {"release_id": cached.release_id, "dataset_version": job.question.version,
                               "query": job.question.canonical, "query_hash": job.question.query_hash,
                               "loss_micro": 0, "result_hash": cached.result_hash},
                    "dataset": job.question.dataset})
            append_many(connection, entries)
            clock.lap("audit_append")
        clock.lap("commit", wall=True)
        for job in live:  # committed: the entries are durable, the answers may go
            cached = releases[release_key(job.question)]
            assert job.caller is not None and cached is not None
            job.result = Answer(cached.head + budgets[(job.caller.name, job.question.dataset)] + b"}",
                                job.caller, job.roles, job.rule, job.question.dataset)
        clock.lap("serialisation")
        with stages.lock:
            stages.answered += len(live)
            stages.batches += 1
            for job in live:  # counted for answers only (a fresh question's planning is the full path's cost)
                for name, seconds in job.loop_cpu.items():
                    stages.seconds[name] += seconds

    def _decide(self, jobs: list[Job]) -> list[Job]:
        """The policy decision and roles of each job (the store follows the stored policy version)."""
        policies = self.state.policies
        decisions: dict[tuple[Any, ...], Any] = {}
        roles: dict[str, list[str]] = {}
        live = []
        for job in jobs:
            facts = self.keys.get(job.prefix)
            if facts is None or not hmac.compare_digest(job.computed, facts.secret_hash):
                self.stages.decline("key")
                continue
            caller = Caller(account_id=facts.account_id, name=facts.name, agency=facts.agency)
            question = job.question
            key = (caller.subject, caller.agency, question.objects, question.epsilon)
            try:
                decision = decisions.get(key)
                if decision is None:
                    decision = decisions[key] = policies.check_all(caller.subject, caller.agency, question.objects,
                                                                   Action.QUERY_RUN, question.epsilon)
                if caller.subject not in roles:
                    roles[caller.subject] = [f"{role}@{agency}" for role, agency in policies.roles_of(caller.subject)]
            except Exception:  # noqa: BLE001 - the full path decides (and explains) the refusal
                self.stages.decline("policy_error")
                continue
            if not decision.allowed:
                self.stages.decline("denied")
                continue
            job.caller, job.roles, job.rule = caller, roles[caller.subject], decision.rule
            live.append(job)
        return live

    def _recheck_keys(self, connection: Any, jobs: list[Job], now: datetime) -> list[Job]:
        """Inside the transaction: each key still what it was, not revoked or expired, its account enabled."""
        rows = {row.prefix: row for row in connection.execute(
            _KEY_STATE, {"prefixes": sorted({job.prefix for job in jobs})})}
        live = []
        for job in jobs:
            row = rows.get(job.prefix)
            facts = self.keys.get(job.prefix)
            expires = row.expires_at if row is not None else None
            if expires is not None and expires.tzinfo is None:
                expires = expires.replace(tzinfo=timezone.utc)
            if (row is None or facts is None or row.key_id != facts.key_id or row.secret_hash != facts.secret_hash
                    or row.account_id != facts.account_id or row.name != facts.name or row.agency != facts.agency):
                self.keys.pop(job.prefix, None)
                self.stages.decline("key")
                continue
            if row.revoked_at is not None or row.disabled or (expires is not None and now >= expires):
                self.stages.decline("key_revoked")
                continue
            live.append(job)
        return live

    def _releases(self, connection: Any, jobs: list[Job], alarms: Any) -> dict[str, CachedRelease | None]:
        """Inside the transaction: each question's stored release *at the dataset's registered version*.

        The release is read joined to the dataset's row, so a question planned at a version
        that is no longer the registered one finds nothing here (the full path answers it,
        at the current version). The release's bytes must be the ones checked before.
        """
        found: dict[str, CachedRelease | None] = {}
        missing: set[str] = set()
        for job in jobs:
            question = job.question
            key = release_key(question)
            if key in found:
                continue
            row = connection.execute(_RELEASE, {"dataset": question.dataset, "version": question.version,
                                                "query_hash": question.query_hash}).first()
            found[key] = None if row is None else self.releases.checked(row, alarms)
            if row is None:
                missing.add(key)
        for job in jobs:
            key = release_key(job.question)
            if found[key] is None:
                job.forget = key in missing
                self.stages.decline("not_stored" if job.forget else "not_checked_here")
        return found

    def _budgets(self, connection: Any, jobs: list[Job], releases: dict[str, CachedRelease | None],
                 now: datetime) -> dict[tuple[str, str], bytes]:
        """Each caller's budgets on each dataset, as the answer shows them (read in the same transaction)."""
        out: dict[tuple[str, str], bytes] = {}
        for job in jobs:
            assert job.caller is not None
            dataset = job.question.dataset
            key = (job.caller.name, dataset)
            if key in out:
                continue
            scopes = ledger.scopes_for(dataset, job.caller.name, job.caller.agency, now)
            cached = releases[release_key(job.question)]
            assert cached is not None
            rows = {(r.scope, r.subject, r.period): r for r in connection.execute(
                _BUDGET_ROWS, {"dataset": dataset, "account": job.caller.name, "agency": job.caller.agency,
                               "month": ledger.period_of(now)})}
            if len(rows) == len(scopes):
                statuses = [ledger.BudgetStatus(r.id, dataset, r.scope, r.subject, r.period, r.cap_micro,
                                                r.spent_micro, cached.accounting)
                            for r in (rows[(s.kind, s.subject, s.period)] for s in scopes)]
            else:  # a scope not opened yet (a new month): shown with the cap it would get
                with Session(bind=connection) as session:  # joins the batch's transaction
                    statuses = ledger.statuses(session, dataset, scopes, defaults=self.state.caps)
            out[key] = _BUDGETS.dump_json([BudgetOut(**b.as_dict()) for b in statuses])
        return out


class _Clock:
    """CPU time of this thread per stage (waiting for the GIL, the disk or the database is not counted)."""

    def __init__(self, stages: Stages) -> None:
        self.stages = stages
        self.cpu = time.thread_time()
        self.wall = time.perf_counter()

    def lap(self, name: str, wall: bool = False) -> None:
        cpu, now = time.thread_time(), time.perf_counter()
        self.stages.seconds[name] += cpu - self.cpu
        if wall:
            self.stages.wall[name] += now - self.wall
        self.cpu, self.wall = cpu, now


# Statements built once (building a statement costs more than running it), their values bound per batch.
_KEY_STATE = (select(*KEY_COLUMNS, ApiKey.revoked_at, ApiKey.expires_at, Account.disabled)
              .join(Account, Account.id == ApiKey.account_id)  # type: ignore[arg-type]
              .where(ApiKey.prefix.in_(bindparam("prefixes", expanding=True))))  # type: ignore[attr-defined]
_RELEASE = (select(Release.id, Release.result_json, Release.result_hash, Release.dataset, Release.dataset_version,
                   Release.query_hash, Dataset.metadata_json)
            .join(Dataset, and_(Dataset.name == Release.dataset,  # type: ignore[arg-type]
                                Dataset.version == Release.dataset_version))
            .where(Release.dataset == bindparam("dataset"), Release.dataset_version == bindparam("version"),
                   Release.query_hash == bindparam("query_hash")))
#: The four scopes of ``ledger.scopes_for`` (analyst, agency, dataset, lifetime), in one read.
_BUDGET_ROWS = (select(Budget.id, Budget.scope, Budget.subject, Budget.period, Budget.cap_micro, Budget.spent_micro)
                .where(Budget.dataset == bindparam("dataset"), or_(
                    and_(Budget.scope == ledger.ANALYST, Budget.subject == bindparam("account"),
                         Budget.period == bindparam("month")),
                    and_(Budget.scope == ledger.AGENCY, Budget.subject == bindparam("agency"),
                         Budget.period == bindparam("month")),
                    and_(Budget.scope == ledger.DATASET, Budget.subject == ledger.ANY,
                         Budget.period == bindparam("month")),
                    and_(Budget.scope == ledger.LIFETIME, Budget.subject == ledger.ANY,
                         Budget.period == ledger.LIFETIME_PERIOD))))


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)
