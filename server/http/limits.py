"""Bounded work before identity: what a caller can make the server do before its key is checked.

FastAPI reads and parses a request's body before any dependency runs, so before the
API key is looked at. The limits here run in front of the application, as plain ASGI
middleware, and cap that work for everyone:

- **Size.** A body may hold at most ``CIVICDP_MAX_REQUEST_BYTES`` (default 1 MiB). A
  declared ``Content-Length`` above the limit is refused at once; otherwise bytes are
  counted as they arrive and reading stops at the first byte over. The answer is 413
  naming the limit, and nothing is parsed. ``POST /v1/monitors/{name}/batches`` (a
  Parquet body) may carry up to ``CIVICDP_MAX_BATCH_BYTES``, but only once the key it
  presents has been verified: without a valid key it gets the same 1 MiB and a 401.
- **Structure.** A JSON body may nest arrays and objects at most
  ``CIVICDP_MAX_JSON_DEPTH`` deep (default 32), hold at most ``CIVICDP_MAX_JSON_ITEMS``
  members in any one array or object (default 10,000) and at most
  :data:`MAX_CONTAINERS` arrays and objects in all. This is checked on the raw bytes
  with regular expressions (no parsing, no Python object per member); a body over a
  limit gets 422 naming the field (``filters.0.values``), the limit and the fix.
- **Rate.** Requests that end without an identified caller (no key, a key that fails,
  a body refused before identity) take a token from their client address's bucket
  (``CIVICDP_ANONYMOUS_BURST`` tokens, refilled at ``CIVICDP_ANONYMOUS_PER_MINUTE``).
  While a client's bucket is empty its requests get the same 401 at once: the body is
  not read, a key is looked up only if one is presented (so a valid key from a shared
  address still works), and instead of one audit entry each they are counted in one
  entry per client per ``CIVICDP_ANONYMOUS_SUMMARY_SECONDS`` (``http.rate_limited``).

The client address is the connection's peer (``scope["client"]``): behind a reverse
proxy, run uvicorn with ``--proxy-headers --forwarded-allow-ips <proxy>`` so that it is
the caller's address and not the proxy's.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import anyio
from fastapi import FastAPI
from sqlalchemy.engine import Engine as DbEngine
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from civicdp.server.http.request_log import client_of, is_recorded
from civicdp.server.auditlog.log import record
from civicdp.server.state.auth import AuthenticationFailed
from civicdp.server.state.db import session_scope
from civicdp.server.http.deps import key_authenticates
from civicdp.server.state.settings import Settings

logger = logging.getLogger("civicdp.limits")

#: The one route whose body may exceed ``max_request_bytes`` (after its key is verified).
BATCH_ROUTE = re.compile(r"/v1/monitors/[^/]+/batches/?")
#: Arrays and objects in one JSON body, in all: bounds the objects a parse can make.
MAX_CONTAINERS = 10_000
#: Clients whose buckets are remembered; the least recently seen is forgotten first.
MAX_CLIENTS = 10_000
#: A body refused as too large is read on and dropped up to this much, for this long, so that
#: clients that send before they read get the 413 (a client over its rate limit is not drained).
DRAIN_BYTES = 64 * 1024 * 1024
DRAIN_SECONDS = 5.0


# -- JSON structure, checked on the bytes ------------------------------------------------------

@dataclass(frozen=True)
class JsonLimits:
    depth: int = 32
    items: int = 10_000
    containers: int = MAX_CONTAINERS


@dataclass(frozen=True)
class JsonProblem:
    field: str
    problem: str
    fix: str


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_SKELETON_DELETE = bytes(b for b in range(256) if b not in b"[]{},")
_INNERMOST = re.compile(rb"\[[^\[\]{}]*\]|\{[^\[\]{}]*\}")
#: Tokens for naming the place: a run of values and commas counts as one (only its commas matter).
_TOKEN = re.compile(rb'(?:(?:"[^"\\]*(?:\\.[^"\\]*)*"|[^"\[\]{}:,])*,)+|"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}:]', re.S)


@functools.lru_cache(maxsize=8)
def _too_long(items: int) -> re.Pattern[bytes]:
    """An innermost array or object (only commas left inside) with more than ``items`` members."""
    return re.compile(rb"[\[{],{%d,}[\]}]" % items)


def json_problem(body: bytes, limits: JsonLimits) -> JsonProblem | None:
    """Whether a JSON text exceeds ``limits``, judged from its bytes alone.

    Strings are blanked out, everything but brackets and commas is dropped, and the
    innermost arrays and objects are removed one level per pass: after ``depth`` passes
    nothing may be left, and no innermost container may hold more than ``items - 1``
    commas. Every step is a regular expression or a byte operation over at most
    ``max_request_bytes``. Text that is not JSON is left to the JSON parser to refuse.
    """
    stripped = _STRING.sub(b"0", body)
    if stripped.count(b"[") + stripped.count(b"{") > limits.containers:
        return JsonProblem("body", f"holds more than {limits.containers} arrays and objects",
                           "Send a smaller document")
    skeleton = stripped.translate(None, _SKELETON_DELETE)
    too_long = _too_long(limits.items)
    for _ in range(limits.depth):
        if too_long.search(skeleton):
            return _locate(body, limits)
        reduced = _INNERMOST.sub(b"", skeleton)
        if reduced == skeleton:
            return None  # nothing left (or not JSON: the parser will say so)
        skeleton = reduced
    if _INNERMOST.search(skeleton):
        return _locate(body, limits)
    return None


@dataclass
class _Frame:
    kind: str           # "array" or "object"
    name: str | None    # its key or index in the parent (None at the top)
    commas: int = 0
    key: str | None = None  # an object's current member name


def _path(frames: list[_Frame]) -> str:
    path = ".".join(frame.name for frame in frames if frame.name is not None) or "body"
    return path if len(path) <= 120 else path[:117] + "..."


def _locate(body: bytes, limits: JsonLimits) -> JsonProblem:
    """The first place where ``body`` exceeds a limit, as a dotted path (run only on a refusal)."""
    frames: list[_Frame] = []
    text: str | None = None  # the last string seen: an object's key once ':' follows
    for match in _TOKEN.finditer(body):
        token = match.group()
        if token[:1] == b'"' and token[-1:] == b'"' and len(token) > 1:
            text = token[1:-1].decode("utf-8", "replace")[:60]
        elif token in (b"[", b"{"):
            name = None
            if frames:
                parent = frames[-1]
                name = parent.key if parent.kind == "object" else str(parent.commas)
            frames.append(_Frame("array" if token == b"[" else "object", name))
            if len(frames) > limits.depth:
                return JsonProblem(_path(frames[:-1]), f"nests arrays and objects more than {limits.depth} "
                                   "levels deep", f"Send a document at most {limits.depth} levels deep")
        elif token in (b"]", b"}"):
            if frames:
                frames.pop()
        elif token == b":":
            if frames:
                frames[-1].key = text
        elif frames:  # values and commas
            frames[-1].commas += token.count(b",")
            if frames[-1].key is not None and frames[-1].kind == "object":
                frames[-1].key = None
            if frames[-1].commas >= limits.items:
                kind = "list" if frames[-1].kind == "array" else "object"
                return JsonProblem(_path(frames), f"this {kind} has more than {limits.items} members",
                                   f"Send at most {limits.items}")
    return JsonProblem("body", "exceeds the server's limits on nesting or list length", "Send a smaller document")


# -- the per-client token bucket -----------------------------------------------------------------

class ClientBuckets:
    """A token bucket per client address: ``burst`` tokens, refilled at ``per_second``."""

    def __init__(self, burst: int, per_second: float, max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = float(burst)
        self.per_second = per_second
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # client -> [tokens, as of]
        self._lock = threading.Lock()

    def _level(self, bucket: list[float], now: float) -> float:
        return min(self.burst, bucket[0] + (now - bucket[1]) * self.per_second)

    def empty(self, client: str) -> bool:
        """Has ``client`` no token left? (Takes nothing.)"""
        with self._lock:
            bucket = self._buckets.get(client)
            return bucket is not None and self._level(bucket, self.clock()) < 1

    def take(self, client: str) -> bool:
        """Take one token from ``client``'s bucket; False if there was none."""
        with self._lock:
            now = self.clock()
            bucket = self._buckets.get(client)
            if bucket is None:
                while len(self._buckets) >= self.max_clients:
                    self._buckets.popitem(last=False)
                bucket = self._buckets[client] = [self.burst, now]
            else:
                self._buckets.move_to_end(client)
            bucket[0], bucket[1] = self._level(bucket, now), now
            if bucket[0] < 1:
                return False
            bucket[0] -= 1
            return True


class AnonymousTraffic:
    """The rate limit on requests without an identified caller, and the summary of what it refused."""

    ACTION = "http.rate_limited"

    def __init__(self, burst: int, per_minute: float, window_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.per_minute, self.window_seconds = burst, per_minute, window_seconds
        self.buckets = ClientBuckets(burst, per_minute / 60.0, clock=clock)
        self._refused: dict[str, Counter[int]] = {}
        self._spans: dict[str, tuple[datetime, datetime]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> AnonymousTraffic:
        return cls(settings.anonymous_burst, settings.anonymous_per_minute, settings.anonymous_summary_seconds)

    def over_limit(self, client: str) -> bool:
        return self.buckets.empty(client)

    def charge(self, client: str) -> bool:
        """Count one request that ended without a caller; False if the client was over its limit."""
        return self.buckets.take(client)

    def refused(self, client: str, status: int) -> None:
        """Count a request left out of the log, for the next summary entry."""
        now = datetime.now(timezone.utc)
        with self._lock:
            if client not in self._refused and len(self._refused) >= MAX_CLIENTS:
                client = "other clients"
            self._refused.setdefault(client, Counter())[status] += 1
            first = self._spans.get(client, (now, now))[0]
            self._spans[client] = (first, now)

    def pending(self) -> dict[str, int]:
        with self._lock:
            return {client: sum(counts.values()) for client, counts in self._refused.items()}

    def flush(self, db: DbEngine) -> int:
        """Write one summary entry per client refused since the last flush; how many were written."""
        with self._lock:
            refused, spans = self._refused, self._spans
            self._refused, self._spans = {}, {}
        if not refused:
            return 0
        try:
            with session_scope(db) as session:
                for client, counts in sorted(refused.items()):
                    first, last = spans[client]
                    record(session, None, self.ACTION, f"client:{client}"[:200], "refused", client=client,
                           refused=sum(counts.values()), statuses={str(s): n for s, n in sorted(counts.items())},
                           first=first, last=last, burst=self.burst, per_minute=self.per_minute)
        except BaseException:
            self._restore(refused, spans)  # counted again at the next attempt
            raise
        return len(refused)

    def _restore(self, refused: dict[str, Counter[int]], spans: dict[str, tuple[datetime, datetime]]) -> None:
        with self._lock:
            for client, counts in refused.items():
                self._refused.setdefault(client, Counter()).update(counts)
                first, last = spans[client]
                held_first, held_last = self._spans.get(client, (first, last))
                self._spans[client] = (min(first, held_first), max(last, held_last))


def last_summary(state: Any, traffic: AnonymousTraffic) -> None:
    """At shutdown: write what the last window counted (a failure is logged, not raised)."""
    try:
        traffic.flush(state.db)
    except Exception:  # noqa: BLE001 - shutting down anyway
        logger.exception("could not write the last summary of rate-limited requests")


async def summarise_refusals(state: Any, traffic: AnonymousTraffic) -> None:
    """Write the summary entries every ``window_seconds`` (run for the server's lifetime)."""
    while True:
        await anyio.sleep(traffic.window_seconds)
        try:
            await anyio.to_thread.run_sync(traffic.flush, state.db)
        except Exception:  # noqa: BLE001 - retried with the next window
            logger.exception("could not write the summary of rate-limited requests; retrying")


# -- the middleware ----------------------------------------------------------------------------

def _header(scope: Scope, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope.get("headers", []) if key.lower() == name]


def _is_json(scope: Scope) -> bool:
    """Would FastAPI parse this body as JSON? (application/json or application/*+json)"""
    kinds = _header(scope, b"content-type")
    if not kinds:
        return False
    kind = kinds[0].split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _error(status: int, code: str, detail: str, **fields: Any) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail, **fields}, status_code=status,
                        headers={"Connection": "close"} if status == 413 else None)


def _too_large(limit: int) -> JSONResponse:
    size = f"{limit / 1024 / 1024:g} MiB" if limit >= 1024 * 1024 else f"{limit / 1024:g} KiB"
    return _error(413, "request_too_large",
                  f"The request body is larger than this server accepts here: at most {limit} bytes ({size}). "
                  "Send a smaller body.", field="body", problem=f"larger than {limit} bytes",
                  fix=f"Send at most {limit} bytes", limit_bytes=limit)


class _Disconnected(Exception):
    """The client went away while its body was being read."""


class RequestLimitsMiddleware:
    """Size, structure and rate limits in front of the app (see the module's text)."""

    def __init__(self, app: ASGIApp, settings: Settings, traffic: AnonymousTraffic) -> None:
        self.app = app
        self.max_bytes = settings.max_request_bytes
        self.max_batch_bytes = max(settings.max_batch_bytes, settings.max_request_bytes)
        self.json_limits = JsonLimits(depth=settings.max_json_depth, items=settings.max_json_items)
        self.traffic = traffic

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        watched = is_recorded(path)
        if watched and self.traffic.over_limit(client_of(scope)) and not await self._authenticates(scope):
            await self._unauthenticated(scope, receive, send)
            return
        is_json = _is_json(scope)
        limit = self.max_bytes
        batch = scope.get("method") == "POST" and not is_json and BATCH_ROUTE.fullmatch(path) is not None
        declared = self._declared_length(scope)
        if batch and (declared is None or declared > self.max_bytes):
            # Only a caller whose key checks out may make the server hold a large body.
            if not await self._authenticates(scope):
                await self._unauthenticated(scope, receive, send)
                return
            limit = self.max_batch_bytes
        try:
            body = None if declared is not None and declared > limit else await self._read(receive, limit)
            if body is None:
                # Read on (and discard, holding nothing) up to a bound, so that a client that
                # sends its whole body before reading sees the 413 instead of a reset connection.
                expects = any(v.strip().lower() == "100-continue" for v in _header(scope, b"expect"))
                if (declared is None or declared <= DRAIN_BYTES) and not (expects and declared is not None):
                    await _drain(receive)  # (a client waiting for "100 Continue" has sent nothing yet)
                await _too_large(limit)(scope, receive, send)
                return
        except _Disconnected:
            return
        if is_json and body:
            problem = json_problem(body, self.json_limits)
            if problem is not None:
                await _error(422, "invalid_request", f"{problem.field}: {problem.problem}. {problem.fix}",
                             field=problem.field, problem=problem.problem, fix=problem.fix)(scope, receive, send)
                return
        await self.app(scope, _replay(body, receive), send)

    @staticmethod
    def _declared_length(scope: Scope) -> int | None:
        values = _header(scope, b"content-length")
        if len(values) != 1 or not values[0].strip().isdigit():
            return None  # none (chunked), or invalid: counted as it arrives instead
        return int(values[0])

    @staticmethod
    async def _read(receive: Receive, limit: int) -> bytes | None:
        """The whole body, or None as soon as it passes ``limit`` bytes."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _authenticates(self, scope: Scope) -> bool:
        authorization = _header(scope, b"authorization")
        state = getattr(scope["app"].state, "civicdp", None)
        if not authorization or state is None:
            return False
        return await anyio.to_thread.run_sync(key_authenticates, state, authorization)

    @staticmethod
    async def _unauthenticated(scope: Scope, receive: Receive, send: Send) -> None:
        """The app's own 401 (one text for every cause), without reading the body (so: close)."""
        app: FastAPI = scope["app"]
        handler = app.exception_handlers[AuthenticationFailed]
        response = await handler(Request(scope), AuthenticationFailed("missing"))
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


async def _drain(receive: Receive) -> None:
    """Receive and drop the rest of a refused body: at most DRAIN_BYTES or DRAIN_SECONDS."""
    drained = 0
    with anyio.move_on_after(DRAIN_SECONDS):
        while drained <= DRAIN_BYTES:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the client's disconnect

    return replayed


# -- OpenAPI -----------------------------------------------------------------------------------

def document_limits(app: FastAPI) -> None:
    """Add the 413 every operation with a body can answer to the app's OpenAPI document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        error = ({"$ref": "#/components/schemas/ErrorOut"} if "ErrorOut" in schema.get("components", {}).get(
            "schemas", {}) else {"type": "object"})
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if isinstance(operation, dict) and "requestBody" in operation:
                    operation.setdefault("responses", {}).setdefault("413", {
                        "description": "Body larger than the server accepts (the limit is named)",
                        "content": {"application/json": {"schema": error}}})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
