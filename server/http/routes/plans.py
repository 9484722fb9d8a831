"""Workload plans: estimate and store (free), read, run (one charge for every part)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from civicdp.server.http.deps import CurrentCaller, StateDep
from civicdp.server.http.routes.common import errors
from civicdp.server.services.plan_runs import run_plan
from civicdp.server.services.plan_schemas import PlanOut, PlanRequest, PlanRunOut
from civicdp.server.services.plans import PlanService

router = APIRouter(prefix="/plans", tags=["plans"])


def _service(state: Any) -> PlanService:
    return PlanService(state.queries)


# The answers are the planner's dicts, documented (not validated) by PlanOut and PlanRunOut.
@router.post("", response_model=None, responses={**errors(401, 403, 404, 422, 503), 200: {"model": PlanOut}},
             summary="Plan a workload within your budgets and store it: free, reads no data")
async def create(plan: PlanRequest, caller: CurrentCaller, state: StateDep) -> dict[str, Any]:
    return await run_in_threadpool(_service(state).create, caller, plan.root)


@router.get("/{plan_id}", response_model=None, responses={**errors(401, 403, 404, 503), 200: {"model": PlanOut}},
            summary="A stored plan, estimated again on the dataset's version served now")
async def read(plan_id: str, caller: CurrentCaller, state: StateDep) -> dict[str, Any]:
    return await run_in_threadpool(_service(state).get, caller, plan_id)


@router.post("/{plan_id}/run", response_model=None,
             responses={**errors(401, 403, 404, 409, 422, 503), 200: {"model": PlanRunOut}},
             summary="Run a stored plan: one charge for every part not yet released, then every answer")
async def run(plan_id: str, caller: CurrentCaller, state: StateDep) -> dict[str, Any]:
    return await run_in_threadpool(run_plan, _service(state), caller, plan_id)
