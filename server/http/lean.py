"""The lean path for cached answers: a repeated question answered on the event loop, its entry group-committed.

``POST /v1/queries`` asking a question whose release is stored is free and the most
frequent request; through the full stack it costs four sessions, eleven statements and
three thread hops. :class:`LeanQueries` (ASGI middleware inside the request limits and the
audit middleware) answers it with the same bytes, the same audit entry and the same
checks, but remembers what cannot change and does the rest in one transaction shared by
concurrent requests:

- **Remembered** (per process): for each request body, the planned question — dataset,
  the version it was planned at, canonical query and hash, the objects and epsilon that
  authorisation judges (planning is a pure function of the spec and the metadata of one
  version); for each API key prefix, its key and account ids, name, agency and secret hash
  (none of which ever changes); for each release, its answer as sent, once its bytes were
  checked against its audit entry by the full path (:func:`civicdp.server.auditlog.reconcile.check_stored_answer`).
- **Checked for every request**: the key's HMAC (computed on the event loop); the policy
  decision and roles (the policy store, which follows the stored policy version); and,
  *inside the transaction that writes the entry*, the key's row (not revoked, not
  expired, same secret hash, account not disabled), the dataset's registered version
  (a stale version is never answered), and the release row's bytes and hash (compared
  with the checked ones). Anything that does not pass, or is not remembered yet, is
  handed to the full path, which decides, answers and audits as it always did.
- **Group commit**: one writer thread per process takes every request waiting, checks
  them and appends their entries (consecutive numbers, one bump of the log's counter) in
  one transaction, commits, and only then lets each answer go. An answer never leaves
  before its entry is durable; a request whose checks fail writes nothing here.

The writer keeps the time each stage took (:class:`Stages`), logged when the app stops
(``civicdp.lean``), which is what the W3 benchmark prints as the per-request profile.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import queue
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
from pydantic import TypeAdapter
from sqlalchemy import and_, bindparam, or_, select
from sqlmodel import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from civicdp.policies.actions import Action
from civicdp.server.state import auth, ledger
from civicdp.server.auditlog.log import SLOT, alarms_for, append_many
from civicdp.server.state.caller import Caller
from civicdp.server.state.db import reader, write_turn
from civicdp.server.state.models import Account, ApiKey, Budget, Dataset, Release
from civicdp.server.services.schemas import BudgetOut
from civicdp.server.services.query_service import CachedQuestion, QueryService, sha256_text

logger = logging.getLogger("civicdp.lean")

PATH = "/v1/queries"
MAX_BATCH = 256
SWITCH_INTERVAL = 0.0005  # seconds
REMEMBERED = 4096  # bodies, keys and releases remembered per process (each an LRU)
_BUDGETS = TypeAdapter(list[BudgetOut])


class _Lru(OrderedDict):  # type: ignore[type-arg]
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def remember(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


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


@dataclass(frozen=True)
class KeyFacts:
    """What never changes about an API key: its ids, its secret's hash, its account's name and agency."""

    key_id: int
    secret_hash: str
    account_id: int
    name: str
    agency: str


@dataclass
class CachedRelease:
    """A release's checked bytes and its answer as sent, but for the budgets."""

    release_id: int
    result_json: str
    result_hash: str
    vouched: tuple[str, str, str, str]
    head: bytes  # the response up to the budgets' list
    accounting: Any  # the dataset's accounting at the release's version (how its budgets are shown)


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
        self.keys: _Lru = _Lru(REMEMBERED)
        self.releases: _Lru = _Lru(REMEMBERED)
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
        self._learn_keys([job.prefix for job in jobs if job.prefix not in self.keys])
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
            live = [job for job in live if releases[_release_key(job.question)] is not None]
            clock.lap("cache_read")
            if not live:
                return
            budgets = self._budgets(connection, live, releases, now)
            clock.lap("budgets")
            entries = []
            for job in live:
                cached = releases[_release_key(job.question)]
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
            cached = releases[_release_key(job.question)]
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

    def _learn_keys(self, prefixes: list[str]) -> None:
        """Key facts of prefixes not seen yet (a read outside the transaction; re-checked inside it)."""
        if not prefixes:
            return
        with Session(reader(self.state.db)) as session:
            for row in session.execute(_KEYS, {"prefixes": sorted(set(prefixes))}):
                self.keys.remember(row.prefix, KeyFacts(row.key_id, row.secret_hash, row.account_id, row.name,
                                                        row.agency))

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
            key = _release_key(question)
            if key in found:
                continue
            row = connection.execute(_RELEASE, {"dataset": question.dataset, "version": question.version,
                                                "query_hash": question.query_hash}).first()
            found[key] = None if row is None else self._checked(row, alarms)
            if row is None:
                missing.add(key)
        for job in jobs:
            key = _release_key(job.question)
            if found[key] is None:
                job.forget = key in missing
                self.stages.decline("not_stored" if job.forget else "not_checked_here")
        return found

    def _checked(self, row: Any, alarms: Any) -> CachedRelease | None:
        """The release as sent, if its bytes are the ones the full path checked against the log."""
        if row.id in alarms.releases:
            return None
        cached = self.releases.get(row.id)
        vouched = (sha256_text(row.result_json), row.dataset, row.dataset_version, row.query_hash) \
            if cached is None or cached.result_json != row.result_json else cached.vouched
        if vouched[0] != row.result_hash or alarms.verified.get(row.id) != vouched:
            return None  # not checked by this process yet, or changed: the full path checks (and alarms)
        if (cached is not None and cached.result_json == row.result_json and cached.result_hash == row.result_hash
                and cached.vouched == vouched):
            return cached
        answer = QueryService._answer(row.id, row.dataset, row.dataset_version, json.loads(row.result_json),
                                      cached=True, charged={"epsilon": 0.0, "delta": 0.0}, budgets=[])
        document = answer.model_dump_json().encode()
        if not document.endswith(b'"budgets":[]}'):
            return None
        cached = CachedRelease(row.id, row.result_json, row.result_hash, vouched, document[:-3],
                               ledger.accounting_in(row.metadata_json))
        self.releases.remember(row.id, cached)
        return cached

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
            cached = releases[_release_key(job.question)]
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


def _release_key(question: CachedQuestion) -> str:
    return f"{question.dataset}\0{question.version}\0{question.query_hash}"


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


_KEY_COLUMNS = (ApiKey.prefix, ApiKey.id.label("key_id"), ApiKey.secret_hash,  # type: ignore[union-attr]
                Account.id.label("account_id"), Account.name, Account.agency)  # type: ignore[union-attr]
# Statements built once (building a statement costs more than running it), their values bound per batch.
_KEYS = (select(*_KEY_COLUMNS).join(Account, Account.id == ApiKey.account_id)  # type: ignore[arg-type]
         .where(ApiKey.prefix.in_(bindparam("prefixes", expanding=True))))  # type: ignore[attr-defined]
_KEY_STATE = (select(*_KEY_COLUMNS, ApiKey.revoked_at, ApiKey.expires_at, Account.disabled)
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


class LeanQueries:
    """ASGI middleware: answers a cached ``POST /v1/queries`` itself, or hands the request on unchanged."""

    def __init__(self, app: ASGIApp, profile_file: Path | None = None) -> None:
        self.app = app
        self.profile_file = profile_file
        self.stages = Stages()
        self.questions: _Lru = _Lru(REMEMBERED)
        self._writer: Writer | None = None
        self._state: Any = None
        self._closed = False
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            async def shutdown_first() -> Message:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self._closed = False
                elif message["type"] == "lifespan.shutdown":
                    # Before the app's shutdown disposes the database: the writer's connection goes back first.
                    await anyio.to_thread.run_sync(self.close)
                return message

            try:
                await self.app(scope, shutdown_first, send)
            finally:
                self.close()
            return
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != PATH:
            await self.app(scope, receive, send)
            return
        body, more = await _body(receive)
        answer = None if more else await self._answer(scope, body)
        if answer is None:
            await self.app(scope, _replay(body, more, receive), send)
            return
        slot = SLOT.get()
        if slot is not None:
            slot.caller, slot.roles = answer.caller, answer.roles
            slot.action, slot.target, slot.rule = Action.QUERY_RUN.value, answer.dataset, answer.rule
            slot.recorded = True  # its entry is committed
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(answer.body)).encode()),
                                (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer.body})

    def close(self) -> None:
        with self._lock:
            writer, self._writer, self._state = self._writer, None, None
            self._closed = True  # requests still arriving take the full path
        if writer is not None:
            writer.stop()
            report = json.dumps(self.stages.report())
            logger.info("lean cached path: %s", report)
            if self.profile_file is not None:
                path = Path(self.profile_file)
                try:
                    path.with_name(f"{path.stem}.{os.getpid()}{path.suffix}").write_text(report)
                except OSError as exc:
                    logger.warning("could not write the lean path's profile to %s: %s", path, exc)

    def writer(self, state: Any) -> Writer | None:
        with self._lock:
            if self._closed:
                return None
            if self._writer is None or self._state is not state:
                if self._writer is not None:
                    self._writer.stop()
                self._writer, self._state = Writer(state, self.stages), state
                self.questions.clear()
            return self._writer

    async def _answer(self, scope: Scope, body: bytes) -> Answer | None:
        state = getattr(scope["app"].state, "civicdp", None)
        if state is None or not body or alarms_for(state.db).log is not None:
            return None
        started = time.thread_time()
        headers = [(k, v) for k, v in scope.get("headers", []) if k in (b"authorization", b"content-type")]
        authorization = [v.decode("latin-1") for k, v in headers if k == b"authorization"]
        kinds = [v for k, v in headers if k == b"content-type"]
        if len(kinds) != 1 or kinds[0].split(b";", 1)[0].strip().lower() != b"application/json":
            self.stages.decline("content_type")
            return None
        try:
            prefix, secret = auth.parse_key(auth.presented_key(authorization))
        except auth.AuthenticationFailed:
            self.stages.decline("key")
            return None
        computed = hmac.new(state.secret, secret.encode("ascii"), hashlib.sha256).hexdigest()
        t = time.thread_time()
        loop_cpu = {"authentication": t - started}
        question = self.questions.get(body)
        if question is None:
            question = await anyio.to_thread.run_sync(_question, state, body)
            if question is None:
                self.stages.decline("not_planned")
                return None
            self.questions.remember(body, question)
        writer = self.writer(state)
        if writer is None:
            return None
        loop = asyncio.get_running_loop()
        job = Job(prefix, computed, question, scope.get("method", ""), scope.get("path", "")[:200], loop,
                  loop.create_future())
        loop_cpu["planning"] = time.thread_time() - t
        job.loop_cpu = loop_cpu
        job.submitted = time.perf_counter()
        writer.submit(job)
        answer: Answer | None = await job.future
        if job.forget:
            self.questions.pop(body, None)
        return answer


def _question(state: Any, body: bytes) -> CachedQuestion | None:
    """Plan a body once (in a thread): None if it is not a valid question (the full path explains)."""
    try:
        raw = json.loads(body)
        if not isinstance(raw, dict) or "analysis" in raw and not isinstance(raw.get("analysis"), str):
            return None
        return state.queries.question(raw)  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001 - any refusal is the full path's to answer and audit
        return None


async def _body(receive: Receive) -> tuple[bytes, list[Message]]:
    """The request body, and the messages after it if it did not end (handed on unread)."""
    message = await receive()
    if message["type"] != "http.request":
        return b"", [message]
    if message.get("more_body", False):
        return message.get("body", b""), [message]
    return message.get("body", b""), []


def _replay(body: bytes, more: list[Message], receive: Receive) -> Receive:
    pending: list[Message] = more or [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
