"""FastAPI dependencies as ``Annotated`` aliases: settings, sessions, the caller, the policy check.

Every route that needs a caller goes through :func:`current_caller` (authentication)
and :func:`authorize` (the one enforcement point for Casbin decisions).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session

from audit.signing import SigningKey
from policies.actions import Action
from policies.enforcer import PolicyStore
from server import auth
from server.db import reader, session_scope
from server.errors import AccessDenied
from server.ledger import CapDefaults
from server.service import Caller, QueryService, record
from server.settings import Settings


@dataclass
class AppState:
    """Collaborators built once at start-up and handed to every request."""

    settings: Settings
    db: DbEngine
    policy_db: DbEngine
    policies: PolicyStore
    queries: QueryService
    caps: CapDefaults
    secret: bytes
    signing_key: SigningKey  # signs audit checkpoints and feed releases

    def close(self) -> None:
        self.db.dispose()
        if self.policy_db is not self.db:
            self.policy_db.dispose()


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
WriteSession = Annotated[Session, Depends(write_session)]

_bearer = HTTPBearer(auto_error=False, description="An API key: 'Authorization: Bearer cdp_...'")


def current_caller(state: StateDep,
                   credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Caller:
    presented = credentials.credentials if credentials else ""
    try:
        with Session(reader(state.db)) as session:
            account = auth.verify_key(session, presented, state.secret, datetime.now(timezone.utc))
            return Caller(account_id=account.id or 0, name=account.name, agency=account.agency)
    except auth.AuthenticationFailed as failure:
        with session_scope(state.db) as session:
            record(session, None, "auth.failed", "api", "denied", reason=failure.reason)
        raise


CurrentCaller = Annotated[Caller, Depends(current_caller)]


def authorize(state: AppState, caller: Caller, action: Action, obj: str) -> None:
    """The enforcement point: refuse (and record the refusal) unless a policy allows."""
    decision = state.policies.check(caller.subject, caller.agency, obj, action)
    if not decision.allowed:
        with session_scope(state.db) as session:
            record(session, caller, action.value, obj, "denied", reason=decision.reason)
        raise AccessDenied(decision.reason, decision.rule)
