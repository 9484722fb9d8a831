"""Security headers on every answer: a Content-Security-Policy, nosniff, no referrer, no framing.

The server's pages (``/docs``, ``/redoc``, the console) are served with all their assets, so
their policy allows the server's own origin and nothing else: no third-party origin, no
inline script (every script is a served file), no ``eval``, no plugins, no ``<base>``, and
no framing (``frame-ancestors 'none'``, with ``X-Frame-Options: DENY`` for old browsers).
A page's policy goes on every ``text/html`` answer; every other answer (JSON, CSV, files) gets
``default-src 'none'``, so a response opened by mistake in a browser runs nothing.

A route whose page needs something else sets its own ``Content-Security-Policy`` header and
this middleware leaves it (ReDoc, see ``docs_pages.py``). :func:`page_policy` builds such a
policy from the page default, so a change of the default reaches every page.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The policy of the server's HTML pages: everything from the server itself, nothing inline.
PAGE_DIRECTIVES: dict[str, str] = {
    "default-src": "'self'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self' data:",
    "font-src": "'self'",
    "connect-src": "'self'",
    "worker-src": "'self' blob:",
    "object-src": "'none'",
    "base-uri": "'none'",
    "form-action": "'self'",
    "frame-ancestors": "'none'",
}
#: Everything that is not a page: nothing may run or load.
OTHER_POLICY = "default-src 'none'; frame-ancestors 'none'"


def page_policy(**changes: str) -> str:
    """The page policy, with directives replaced (``style_src="'self' 'unsafe-inline'"``)."""
    directives = {**PAGE_DIRECTIVES, **{name.replace("_", "-"): value for name, value in changes.items()}}
    return "; ".join(f"{name} {value}" for name, value in directives.items())


PAGE_POLICY = page_policy()
#: Set on every answer whatever its type (CSP is chosen per answer, below).
FIXED_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
CSP = b"content-security-policy"


def with_security_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` of an answer with the security headers added (a CSP already there is kept)."""
    names = {name.lower() for name, _ in headers}
    added = [(name, value) for name, value in FIXED_HEADERS if name not in names]
    if CSP not in names:
        kind = next((value for name, value in headers if name.lower() == b"content-type"), b"")
        policy = PAGE_POLICY if kind.lower().startswith(b"text/html") else OTHER_POLICY
        added.append((CSP, policy.encode("ascii")))
    return [*headers, *added]


class SecurityHeadersMiddleware:
    """ASGI middleware adding :func:`with_security_headers` to every HTTP answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": with_security_headers(list(message.get("headers", [])))}
            await send(message)

        await self.app(scope, receive, send_with_headers)
