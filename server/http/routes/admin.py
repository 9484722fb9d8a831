"""Steward endpoints: accounts, API keys, roles per agency, and policy rules."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, status
from pydantic import field_validator
from sqlmodel import select

from civicdp.policies.actions import Action, Role
from civicdp.server.services import admin, schemas
from civicdp.server.http.deps import CurrentCaller, ReadSession, StateDep, WriteSession, authorize
from civicdp.server.state.models import Account
from civicdp.server.http.routes.common import errors
from civicdp.server.services.schemas import AccountCreate, AccountOut, KeyOut, PolicyRule, RoleGrant
from civicdp.server.services.query_service import subject_of

router = APIRouter(tags=["administration"])


class KeyCreate(schemas.KeyCreate):
    """``expires_in_days``: a whole number of days; JSON true/false is not one (pydantic reads true as 1)."""

    @field_validator("expires_in_days", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a whole number of days (1 to 3650) or null, not true or false")
        return value


def _account_out(state: StateDep, account: Account) -> AccountOut:
    roles = [{"role": r, "agency": a} for r, a in state.policies.roles_of(subject_of(account.name))]
    return AccountOut(name=account.name, agency=account.agency, disabled=account.disabled, roles=roles)


@router.get("/accounts", response_model=list[AccountOut], responses=errors(401, 403), summary="All accounts")
def list_accounts(caller: CurrentCaller, state: StateDep, session: ReadSession) -> list[AccountOut]:
    authorize(state, caller, Action.ACCOUNT_MANAGE, "server")
    return [_account_out(state, a) for a in session.exec(select(Account).order_by(Account.name))]


@router.post("/accounts", response_model=AccountOut, status_code=status.HTTP_201_CREATED,
             responses=errors(401, 403, 409, 422), summary="Create an account")
def create_account(body: AccountCreate, caller: CurrentCaller, state: StateDep,
                   session: WriteSession) -> AccountOut:
    authorize(state, caller, Action.ACCOUNT_MANAGE, "server")
    return _account_out(state, admin.create_account(session, caller, body.name, body.agency))


@router.post("/accounts/{name}/keys", response_model=KeyOut, status_code=status.HTTP_201_CREATED,
             responses=errors(401, 403, 404, 422), summary="Issue an API key (shown once)")
def create_key(name: str, caller: CurrentCaller, state: StateDep, session: WriteSession,
               body: Annotated[KeyCreate, Body()] = KeyCreate()) -> KeyOut:  # no body: 90 days
    authorize(state, caller, Action.KEY_MANAGE, "server")
    key, plaintext = admin.issue_key(session, caller, name, state.secret, body.expires_in_days)
    return KeyOut(prefix=key.prefix, account=name, expires_at=key.expires_at, api_key=plaintext)


@router.delete("/keys/{prefix}", response_model=KeyOut, responses=errors(401, 403, 404, 409),
               summary="Revoke an API key (409 if it was revoked already)")
def revoke_key(prefix: str, caller: CurrentCaller, state: StateDep, session: WriteSession) -> KeyOut:
    authorize(state, caller, Action.KEY_MANAGE, "server")
    key = admin.revoke_key(session, caller, prefix)
    account = session.get(Account, key.account_id)
    return KeyOut(prefix=key.prefix, account=account.name if account else "", expires_at=key.expires_at)


@router.post("/accounts/{name}/roles", response_model=AccountOut, responses=errors(401, 403, 404, 409, 422),
             summary="Grant a role in an agency (409: it would mix a data-reading and a steward or oversight role)")
def grant_role(name: str, body: RoleGrant, caller: CurrentCaller, state: StateDep,
               session: WriteSession) -> AccountOut:
    authorize(state, caller, Action.ROLE_MANAGE, "server")
    admin.grant_role(session, state.policies, caller, name, body.role, body.agency)
    return _account_out(state, admin.account_named(session, name))


@router.delete("/accounts/{name}/roles/{role}/{agency}", response_model=AccountOut,
               responses=errors(401, 403, 404, 422),
               summary="Revoke a role in an agency (404 if the account does not hold it)")
def revoke_role(name: str, role: Role, agency: str, caller: CurrentCaller, state: StateDep,
                session: WriteSession) -> AccountOut:
    authorize(state, caller, Action.ROLE_MANAGE, "server")
    admin.revoke_role(session, state.policies, caller, name, role, agency)
    return _account_out(state, admin.account_named(session, name))


@router.get("/policies", response_model=list[list[str]], responses=errors(401, 403),
            summary="All policy rules")
def list_rules(caller: CurrentCaller, state: StateDep) -> list[list[str]]:
    authorize(state, caller, Action.POLICY_MANAGE, "server")
    return state.policies.rules()


@router.post("/policies", response_model=PolicyRule, status_code=status.HTTP_201_CREATED,
             responses=errors(401, 403, 422), summary="Add an allow or deny rule")
def add_rule(body: PolicyRule, caller: CurrentCaller, state: StateDep, session: WriteSession) -> PolicyRule:
    authorize(state, caller, Action.POLICY_MANAGE, "server")
    # The rule and its audit entry commit together; a rule already present changes nothing.
    admin.add_rule(session, state.policies, caller, body)
    return body
