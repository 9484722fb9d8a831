"""One audit entry per request under /v1: the middleware that records what nothing else did.

Requests that change state or spend budget record themselves in their own
transaction. For the rest (reads, denials, invalid input, failed authentication,
errors) this middleware writes the entry when the response starts — before its
first byte is sent — and a request whose entry cannot be written gets no answer.
Health and readiness probes and the public key are not uses and are not recorded.

Requests that end without an identified caller (no key, a key that fails, a body refused
before identity) are counted against their client's rate limit (:mod:`civicdp.server.http.anonymous_traffic`):
within it each gets its entry as above; beyond it they are left out one by one and
summarised instead, one ``http.rate_limited`` entry per client per window.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from civicdp.server.auditlog.append import record_request
from civicdp.server.auditlog.slots import SLOT, AuditSlot

if TYPE_CHECKING:
    from civicdp.server.http.anonymous_traffic import AnonymousTraffic

logger = logging.getLogger("civicdp.audit")
NOT_RECORDED = frozenset({"/v1/health", "/v1/ready", "/v1/audit/public-key", "/console/sign-in"})
#: The web console's pages are recorded like API calls; its static files (scripts, styles) are not.
CONSOLE, CONSOLE_STATIC = "/console/", "/console/static/"


def client_of(scope: Scope) -> str:
    """The client's address as the server sees it (the peer, or the proxy's forwarded one)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def is_recorded(path: str) -> bool:
    """Does a request to ``path`` get an audit entry (everything under /v1 and the console's pages,
    but the public probes, the sign-in form and the console's static files)?"""
    if path.startswith(CONSOLE):
        return not path.startswith(CONSOLE_STATIC) and path not in NOT_RECORDED
    return (path.startswith("/v1/") or path == "/v1") and path not in NOT_RECORDED


class AuditMiddleware:
    def __init__(self, app: ASGIApp, traffic: AnonymousTraffic | None = None) -> None:
        self.app = app
        self.traffic = traffic

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not is_recorded(path):
            await self.app(scope, receive, send)
            return
        slot = AuditSlot(method=scope.get("method", ""), path=path[:200])
        token = SLOT.set(slot)
        state: Any = scope["app"].state.civicdp
        traffic = self.traffic

        async def send_recorded(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                if slot.caller is None and traffic is not None:
                    client = client_of(scope)
                    if not traffic.charge(client) and not slot.recorded:
                        traffic.refused(client, status)  # in the client's summary entry instead
                        slot.recorded = True
                if not slot.recorded:
                    await anyio.to_thread.run_sync(record_request, state.db, slot, status)
            await send(message)

        try:
            await self.app(scope, receive, send_recorded)
        except BaseException:
            if not slot.recorded:
                await anyio.to_thread.run_sync(record_request, state.db, slot, 500)
            raise
        finally:
            SLOT.reset(token)
        # After the answer has gone: sign a checkpoint if enough entries have accumulated.
        if state.audit.count_request():
            await anyio.to_thread.run_sync(state.audit.look)


async def audit_checkpoints(state: Any) -> None:
    """Sign a checkpoint whenever the log has grown and the last one is ``every_minutes`` old."""
    interval = max(1.0, min(30.0, state.audit.every_minutes * 60 / 4))
    while True:
        await anyio.sleep(interval)
        try:
            if await anyio.to_thread.run_sync(state.audit.due, datetime.now(timezone.utc)):
                await anyio.to_thread.run_sync(state.audit.checkpoint)
        except Exception:  # noqa: BLE001 - a failed attempt is retried at the next tick
            logger.exception("could not sign an audit checkpoint; retrying")
