"""Signing in and out of the console, and its home page.

The sign-in form carries a random value that must equal a cookie set with the form (a
double-submit token): another site cannot post a key of its choosing and sign the
browser into the wrong account. The session cookie is ``HttpOnly`` (scripts never see
it), ``SameSite=Strict`` (no other site's page sends it), ``Secure`` over TLS, and
lasts no longer than the session.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from civicdp.server.http.console import sessions
from civicdp.server.http.console.deps import SIGN_IN, ConsoleRoute, FormDep, SignedDep, now, page, same_origin
from civicdp.server.http.deps import StateDep
from civicdp.server.state.auth import AuthenticationFailed

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)
PRE = "civicdp_console_pre"


def _cookie(response: Response, request: Request, name: str, value: str, seconds: int) -> None:
    response.set_cookie(name, value, max_age=seconds, path="/console", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/console/", status_code=303)


@router.get(SIGN_IN, response_class=HTMLResponse)
def sign_in_page(request: Request, failed: bool = False) -> HTMLResponse:
    pre = secrets.token_urlsafe(16)
    response = page(request, "sign_in.html", None, status_code=401 if failed else 200, title="Sign in",
                    pre=pre, failed=failed, hours=int(sessions.LIFETIME.total_seconds() // 3600))
    _cookie(response, request, PRE, pre, 3600)
    return response


@router.post("/console/session")
def sign_in(request: Request, state: StateDep, key: Annotated[str, Form(max_length=200)] = "",
            pre: Annotated[str, Form(max_length=100)] = "") -> Response:
    expected = request.cookies.get(PRE, "")
    if not expected or not secrets.compare_digest(expected.encode(), pre.encode()) or not same_origin(request):
        return page(request, "error.html", None, status_code=403, title="Form refused",
                    message="The sign-in form was not this server's own (or has expired). Open the sign-in page "
                            "again and sign in from there.")
    try:
        token, _ = sessions.sign_in(state, key.strip(), now())
    except AuthenticationFailed:
        return sign_in_page(request, failed=True)
    response = RedirectResponse("/console/", status_code=303)
    _cookie(response, request, sessions.COOKIE, token, int(sessions.LIFETIME.total_seconds()))
    response.delete_cookie(PRE, path="/console")
    return response


@router.post("/console/sign-out")
def sign_out(request: Request, state: StateDep, signed: SignedDep, _form: FormDep) -> RedirectResponse:
    sessions.sign_out(state, request.cookies.get(sessions.COOKIE, ""), signed, now())
    response = RedirectResponse(SIGN_IN, status_code=303)
    response.delete_cookie(sessions.COOKIE, path="/console")
    return response


@router.get("/console/", response_class=HTMLResponse)
def home(request: Request, state: StateDep, signed: SignedDep) -> HTMLResponse:
    held = state.policies.roles_of(signed.caller.subject)
    return page(request, "home.html", signed, title="Console", held=held)
