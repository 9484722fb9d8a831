"""FastAPI dependencies as ``Annotated`` aliases: settings, sessions, the caller, the policy check.

Every route that needs a caller goes through :func:`current_caller` (authentication)
and :func:`authorize` (the one enforcement point for Casbin decisions).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from civicdp.policies.actions import Action
from civicdp.server.state import auth
from civicdp.server.state.db import reader, session_scope
from civicdp.server.state.errors import AccessDenied
from civicdp.server.auditlog.append import record
from civicdp.server.auditlog.log import AuditLog
from civicdp.server.auditlog.slots import current_slot
from civicdp.server.state.caller import Caller
from civicdp.server.services.app_state import AppState


def app_state(request: Request) -> AppState:
    return request.app.state.civicdp  # type: ignore[no-any-return]


StateDep = Annotated[AppState, Depends(app_state)]


def read_session(state: StateDep) -> Iterator[Session]:
    with Session(reader(state.db)) as session:
        yield session


def write_session(state: StateDep) -> Iterator[Session]:
    with session_scope(state.db) as session:
        yield session


ReadSession = Annotated[Session, Depends(read_session)]
#: Commit, then confirm: ``scope="function"`` ends the session (commit, or rollback on an
#: error) when the route function returns, before the response is serialised and sent. With
#: FastAPI's default ("request") the commit would run after the client already had its 2xx:
#: a key reported revoked could still authenticate, an account just created could be missing,
#: and a crash in that gap would leave a confirmed change unmade (or made without its entry).
WriteSession = Annotated[Session, Depends(write_session, scope="function")]

_bearer = HTTPBearer(auto_error=False, description="An API key: 'Authorization: Bearer cdp_...'")


def current_caller(state: StateDep, request: Request,
                   _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Caller:
    # ``_bearer`` documents the scheme in OpenAPI; the key is read here from every
    # Authorization header, so that two of them are refused instead of the first winning.
    slot = current_slot()
    try:
        presented = auth.presented_key(request.headers.getlist("authorization"))
        with Session(reader(state.db)) as session:
            account = auth.verify_key(session, presented, state.secret, datetime.now(timezone.utc))
            caller = Caller(account_id=account.id or 0, name=account.name, agency=account.agency)
    except auth.AuthenticationFailed as failure:
        with session_scope(state.db) as session:
            record(session, None, "auth.failed", "api", "unauthenticated", reason=failure.reason,
                   key_prefix=failure.prefix)
        raise
    if slot is not None:
        slot.caller = caller
        slot.roles = [f"{role}@{agency}" for role, agency in state.policies.roles_of(caller.subject)]
    return caller


CurrentCaller = Annotated[Caller, Depends(current_caller)]


def key_authenticates(state: AppState, authorization: list[str]) -> bool:
    """Does this request's key authenticate someone? For the limits in front of the app.

    Nothing is recorded: the request is authenticated again, and audited, by
    :func:`current_caller` when it reaches its route.
    """
    try:
        presented = auth.presented_key(authorization)
        with Session(reader(state.db)) as session:
            auth.verify_key(session, presented, state.secret, datetime.now(timezone.utc))
    except auth.AuthenticationFailed:
        return False
    return True


def authorize(state: AppState, caller: Caller, action: Action, obj: str) -> None:
    """The enforcement point: refuse (and record the refusal) unless a policy allows."""
    decision = state.policies.check(caller.subject, caller.agency, obj, action)
    slot = current_slot()
    if slot is not None:
        slot.action, slot.target, slot.rule = action.value, obj, decision.rule
    if not decision.allowed:
        with session_scope(state.db) as session:
            record(session, caller, action.value, obj, "denied", reason=decision.reason, rule=decision.rule)
        raise AccessDenied(decision.reason, decision.rule)
