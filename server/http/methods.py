"""A 405's ``Allow`` header that lists every method of the path, not only the first route's.

FastAPI makes one route per path and method (``GET /v1/accounts`` and ``POST
/v1/accounts`` are two), and Starlette answers a method no route takes with 405 and
the ``Allow`` of the first route whose path matched, so ``OPTIONS /v1/accounts`` said
``Allow: GET`` although POST is served too. RFC 9110 (section 15.5.6) asks for the
target resource's methods. This middleware rewrites the header of 405 answers from all
routes matching the path. The server does not implement ``OPTIONS`` (no CORS; clients
are programs holding a key): it is answered 405 with that complete ``Allow``.
"""

from __future__ import annotations

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(app: object, scope: Scope) -> list[str]:
    """Every method some route serves at ``scope``'s path (each asked of the router as a request)."""
    routes = getattr(getattr(app, "router", None), "routes", [])
    return [method for method in METHODS
            if any(route.matches({**scope, "method": method})[0] is Match.FULL for route in routes)]


class AllowHeaderMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_allow(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                methods = allowed_methods(scope["app"], scope)
                if methods:
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                    headers.append((b"allow", ", ".join(methods).encode("latin-1")))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_allow)
