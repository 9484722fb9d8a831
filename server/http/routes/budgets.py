"""Budgets: your own remaining budget; every budget for stewards and oversight."""

from __future__ import annotations

from datetime import datetime, timezone

from fastapi import APIRouter
from pydantic import BaseModel, Field

from civicdp.policies.actions import Action

from civicdp.server.services import admin
from civicdp.server.state import ledger, ledger_history, registry
from civicdp.server.http.deps import CurrentCaller, ReadSession, StateDep, WriteSession, authorize
from civicdp.server.http.routes.common import errors
from civicdp.server.services.schemas import BudgetCapSet, BudgetOut

router = APIRouter(prefix="/budgets", tags=["budgets"])


class BudgetCapOut(BaseModel):
    """A cap in force on one kind of scope of a dataset."""

    dataset: str
    scope: str = Field(description="analyst, agency, dataset, lifetime, or feed (a feed's allocation)")
    subject: str = Field(description="The account, agency or feed it applies to; * for every subject without "
                                     "a cap of its own")
    epsilon: float
    cap_micro: int = Field(description="The cap as an integer: micro-epsilon as set (feeds: the dataset's unit)")
    unit: str
    source: str = Field(description="set (by a steward), default (the server's, no cap set), or feed")


@router.get("", response_model=list[BudgetOut], responses=errors(401, 403, 422),
            summary="Budgets: yours, or all of them (stewards and oversight, with `all=true`)")
def list_budgets(caller: CurrentCaller, state: StateDep, session: ReadSession, dataset: str | None = None,
                 all: bool = False) -> list[BudgetOut]:  # noqa: A002 - a query parameter name
    if all:
        authorize(state, caller, Action.BUDGET_READ_ALL, "server")
        return [BudgetOut(**b.as_dict()) for b in ledger_history.budgets_for(session, dataset)]
    authorize(state, caller, Action.BUDGET_READ_OWN, "server")
    views = []
    for name in [dataset] if dataset else [row.name for row in registry.all_datasets(session)]:
        scopes = ledger.scopes_for(name, caller.name, caller.agency, datetime.now(timezone.utc))
        # Your own scopes only: the analyst scope, and the shared ones you draw on.
        views += [BudgetOut(**b.as_dict()) for b in ledger.statuses(session, name, scopes, defaults=state.caps)]
    return views


@router.put("/caps", response_model=BudgetCapSet, responses=errors(401, 403, 404, 422),
            summary="Set a budget cap (stewards)")
def set_cap(body: BudgetCapSet, caller: CurrentCaller, state: StateDep, session: WriteSession) -> BudgetCapSet:
    authorize(state, caller, Action.BUDGET_MANAGE, "server")
    admin.set_cap(session, caller, body.dataset, body.scope, body.subject, body.epsilon)
    return body


@router.get("/caps", response_model=list[BudgetCapOut], responses=errors(401, 403, 404),
            summary="Every cap in force: set by stewards, feed allocations and the server's defaults")
def list_caps(caller: CurrentCaller, state: StateDep, session: ReadSession,
              dataset: str | None = None) -> list[BudgetCapOut]:
    authorize(state, caller, Action.BUDGET_READ_ALL, "server")
    return [BudgetCapOut(**cap) for cap in admin.caps_of(session, state.caps, dataset)]  # type: ignore[arg-type]
