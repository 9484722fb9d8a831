"""What every console page shares: the signed-in caller, the CSRF check, templates, error pages.

A console page is a client of the same code as ``/v1``: its caller comes from the session
(:mod:`.sessions`) instead of a ``Bearer`` header, and is put in the request's audit slot
exactly as :func:`civicdp.server.http.deps.current_caller` does, so the audit middleware
records every page view under the account that made it, with the action and rule of the
policy check the page's handler made. Domain errors become HTML pages with the status the
API would give (:class:`ConsoleRoute`), a failed integrity check a 503 page saying what failed;
a page without a live session redirects to sign-in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import ValidationError

from civicdp.policies.errors import PolicyError
from civicdp.privacy.errors import InvalidLoss
from civicdp.queries.errors import DatasetUnavailable, QueryError
from civicdp.server.auditlog.alarms import IntegrityFailure
from civicdp.server.auditlog.slots import current_slot
from civicdp.server.http.console import sessions
from civicdp.server.http.deps import StateDep
from civicdp.server.state.errors import AccessDenied, Conflict, InvalidRequest, NotFound
from civicdp.server.state.ledger import BudgetRefused

HERE = Path(__file__).parent
SIGN_IN = "/console/sign-in"
#: Autoescaping on for every template: audit entries and names hold text anyone may have written.
TEMPLATES = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                        auto_reload=False)
TEMPLATES.filters["pretty"] = lambda value: json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


class SignInNeeded(Exception):
    """No live session: the page redirects to the sign-in form."""


class FormRefused(Exception):
    """A state-changing post without its session's CSRF token, or from another origin."""


def now() -> datetime:
    return datetime.now(timezone.utc)


def signed_in(request: Request, state: StateDep) -> sessions.Signed:
    """The session's caller, entered in the audit slot like an API caller (or :class:`SignInNeeded`)."""
    signed = sessions.current(state, request.cookies.get(sessions.COOKIE), now())
    if signed is None:
        raise SignInNeeded
    slot = current_slot()
    if slot is not None:
        slot.caller = signed.caller
        slot.roles = [f"{role}@{agency}" for role, agency in state.policies.roles_of(signed.caller.subject)]
    return signed


SignedDep = Annotated[sessions.Signed, Depends(signed_in)]


def same_origin(request: Request) -> bool:
    """Was a post sent by this server's own page? Browsers say so in ``Sec-Fetch-Site``; without it the
    Origin must name this server (absent or ``null``, as under ``Referrer-Policy: no-referrer``, the
    CSRF token and SameSite=Strict decide)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    sent = request.headers.get("origin")
    if not sent or sent == "null":
        return True
    origin = urlsplit(sent)
    return f"{origin.scheme}://{origin.netloc}" == f"{request.url.scheme}://{request.url.netloc}"


async def checked_form(request: Request, signed: SignedDep) -> dict[str, str]:
    """The fields of a form post whose CSRF token is its session's (else :class:`FormRefused`)."""
    form = await request.form()
    fields = {name: value for name, value in form.items() if isinstance(value, str)}
    if not same_origin(request) or not sessions.csrf_matches(signed, fields.pop("csrf", None)):
        raise FormRefused
    return fields


FormDep = Annotated[dict[str, str], Depends(checked_form)]


def roles_of(state: Any, signed: sessions.Signed) -> set[str]:
    """The roles the caller holds in any agency (for the menu; every page still asks the policy)."""
    return {role for role, _ in state.policies.roles_of(signed.caller.subject)}


def page(request: Request, template: str, signed: sessions.Signed | None, status_code: int = 200,
         **context: Any) -> HTMLResponse:
    """Render ``template`` with the caller, their roles and CSRF token."""
    state = request.app.state.civicdp
    roles = roles_of(state, signed) if signed is not None else set()
    body = TEMPLATES.get_template(template).render(
        request=request, caller=signed.caller if signed else None, csrf=signed.csrf if signed else "",
        roles=roles, **context)
    return HTMLResponse(body, status_code=status_code, headers={"Cache-Control": "no-store"})


def _status_of(exc: Exception) -> tuple[int, str] | None:
    if isinstance(exc, ValidationError):  # a form field the API's schema refuses
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return 422, f"{where}: {first.get('msg')} (got {str(first.get('input'))[:100]!r}); correct it and send again"
    if isinstance(exc, AccessDenied):
        return 403, exc.reason
    if isinstance(exc, DatasetUnavailable):
        return 503, str(exc)
    for kind, status in ((NotFound, 404), (Conflict, 409), (BudgetRefused, 409), (QueryError, 422),
                         (InvalidLoss, 422), (PolicyError, 422), (InvalidRequest, 422)):
        if isinstance(exc, kind):
            return status, str(exc)
    return None


class ConsoleRoute(APIRoute):
    """A console route: domain errors as HTML pages, a missing session as a redirect to sign-in."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except SignInNeeded:
                return RedirectResponse(SIGN_IN, status_code=303)
            except FormRefused:
                return page(request, "error.html", None, status_code=403, title="Form refused",
                            message="The form was sent without this page's security token or from another site. "
                                    "Reload the page and send it again.")
            except IntegrityFailure as failure:
                # No session is looked up: every database read of a request is refused while the log is failed.
                answer = page(request, "error.html", None, status_code=failure.status_code,
                              title="Integrity check failed", message=failure.detail)
                answer.headers.update(failure.headers or {})
                return answer
            except Exception as exc:
                known = _status_of(exc)
                if known is None:
                    raise
                status, message = known
                signed = sessions.current(request.app.state.civicdp, request.cookies.get(sessions.COOKIE), now())
                return page(request, "error.html", signed, status_code=status, title=f"Refused ({status})",
                            message=message)

        return handle
