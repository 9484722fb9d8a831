"""The lean path for cached answers: a repeated question answered on the event loop, its entry group-committed.

``POST /v1/queries`` asking a question whose release is stored is free and the most
frequent request; through the full stack it costs four sessions, eleven statements and
three thread hops. :class:`LeanQueries` (ASGI middleware inside the request limits and the
audit middleware) answers it with the same bytes, the same audit entry and the same
checks, but remembers what cannot change and does the rest in one transaction shared by
concurrent requests:

- **Remembered** (per process; :mod:`civicdp.server.http.lean_memo`): for each request
  body, the planned question — dataset, the version it was planned at, canonical query
  and hash, the objects and epsilon that authorisation judges (planning is a pure
  function of the spec and the metadata of one version); for each API key prefix, its
  key and account ids, name, agency and secret hash (none of which ever changes); for
  each release, its answer as sent, once its bytes were checked against its audit entry
  by the full path (:func:`civicdp.server.auditlog.answers.check_stored_answer`).
- **Checked for every request**: the key's HMAC (computed on the event loop); the policy
  decision and roles (the policy store, which follows the stored policy version); and,
  *inside the transaction that writes the entry*, the key's row (not revoked, not
  expired, same secret hash, account not disabled), the dataset's registered version
  (a stale version is never answered), and the release row's bytes and hash (compared
  with the checked ones). Anything that does not pass, or is not remembered yet, is
  handed to the full path, which decides, answers and audits as it always did.
- **Group commit** (:mod:`civicdp.server.http.lean_writer`): one writer thread per process
  takes every request waiting, checks them and appends their entries (consecutive
  numbers, one bump of the log's counter) in one transaction, commits, and only then
  lets each answer go. An answer never leaves before its entry is durable; a request
  whose checks fail writes nothing here.

The writer keeps the time each stage took (:class:`~civicdp.server.http.lean_writer.Stages`),
logged when the app stops (``civicdp.lean``), which is what the W3 benchmark prints as the
per-request profile.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from civicdp.policies.actions import Action
from civicdp.server.state import auth
from civicdp.server.auditlog.alarms import alarms_for
from civicdp.server.auditlog.slots import SLOT
from civicdp.server.http.lean_memo import REMEMBERED, Lru, plan_body
from civicdp.server.http.lean_writer import Answer, Job, Stages, Writer

logger = logging.getLogger("civicdp.lean")

PATH = "/v1/queries"


class LeanQueries:
    """ASGI middleware: answers a cached ``POST /v1/queries`` itself, or hands the request on unchanged."""

    def __init__(self, app: ASGIApp, profile_file: Path | None = None) -> None:
        self.app = app
        self.profile_file = profile_file
        self.stages = Stages()
        self.questions = Lru(REMEMBERED)
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
            question = await anyio.to_thread.run_sync(plan_body, state, body)
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
