"""Workload plans: estimate and store (free), read, run (one charge for every part)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body
from starlette.concurrency import run_in_threadpool

from civicdp.server.http.deps import CurrentCaller, StateDep
from civicdp.server.http.routes.common import errors
from civicdp.server.services.plan_runs import run_plan
from civicdp.server.services.plans import PlanService

router = APIRouter(prefix="/plans", tags=["plans"])

EXAMPLE = {"dataset": "civic-demo", "parts": [
    {"name": "by_channel", "aggregate": "count", "group_by": ["channel"], "accuracy": {"half_width": 200}},
    {"name": "by_centre", "aggregate": "count", "group_by": ["centre"], "accuracy": {"half_width": 300}}]}
PlanBody = Annotated[dict[str, Any], Body(description="A plan: the dataset and its parts, each a query spec with an "
                                          "accuracy target or a weight (docs/metadata.md, 'Plans')", examples=[EXAMPLE])]


def _service(state: Any) -> PlanService:
    return PlanService(state.queries)


@router.post("", responses=errors(401, 403, 404, 422, 503),
             summary="Plan a workload within your budgets and store it: free, reads no data")
async def create(plan: PlanBody, caller: CurrentCaller, state: StateDep) -> dict[str, Any]:
    return await run_in_threadpool(_service(state).create, caller, plan)


@router.get("/{plan_id}", responses=errors(401, 403, 404, 503),
            summary="A stored plan, estimated again on the dataset's version served now")
async def read(plan_id: str, caller: CurrentCaller, state: StateDep) -> dict[str, Any]:
    return await run_in_threadpool(_service(state).get, caller, plan_id)


@router.post("/{plan_id}/run", responses=errors(401, 403, 404, 409, 422, 503),
             summary="Run a stored plan: one charge for every part not yet released, then every answer")
async def run(plan_id: str, caller: CurrentCaller, state: StateDep) -> dict[str, Any]:
    return await run_in_threadpool(run_plan, _service(state), caller, plan_id)
