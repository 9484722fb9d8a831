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
  :data:`~civicdp.server.http.json_limits.MAX_CONTAINERS` arrays and objects in all. This
  is checked on the raw bytes with regular expressions (no parsing, no Python object per
  member; :mod:`civicdp.server.http.json_limits`); a body over a limit gets 422 naming the
  field (``filters.0.values``), the limit and the fix.
- **Rate.** Requests that end without an identified caller (no key, a key that fails,
  a body refused before identity) take a token from their client address's bucket
  (``CIVICDP_ANONYMOUS_BURST`` tokens, refilled at ``CIVICDP_ANONYMOUS_PER_MINUTE``).
  While a client's bucket is empty its requests get the same 401 at once: the body is
  not read, a key is looked up only if one is presented (so a valid key from a shared
  address still works), and instead of one audit entry each they are counted in one
  entry per client per ``CIVICDP_ANONYMOUS_SUMMARY_SECONDS`` (``http.rate_limited``;
  the buckets and summaries are :mod:`civicdp.server.http.anonymous_traffic`).

The client address is the connection's peer (``scope["client"]``): behind a reverse
proxy, run uvicorn with ``--proxy-headers --forwarded-allow-ips <proxy>`` so that it is
the caller's address and not the proxy's.
"""

from __future__ import annotations

import re
from typing import Any

import anyio
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from civicdp.server.http.anonymous_traffic import AnonymousTraffic
from civicdp.server.http.deps import key_authenticates
from civicdp.server.http.json_limits import JsonLimits, json_problem
from civicdp.server.http.request_log import client_of, is_recorded
from civicdp.server.state.auth import AuthenticationFailed
from civicdp.server.state.settings import Settings

#: The one route whose body may exceed ``max_request_bytes`` (after its key is verified).
BATCH_ROUTE = re.compile(r"/v1/monitors/[^/]+/batches/?")
#: A body refused as too large is read on and dropped up to this much, for this long, so that
#: clients that send before they read get the 413 (a client over its rate limit is not drained).
DRAIN_BYTES = 64 * 1024 * 1024
DRAIN_SECONDS = 5.0


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
