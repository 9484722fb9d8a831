"""Estimating and running queries."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from civicdp.server.http.deps import CurrentCaller, StateDep
from civicdp.server.http.routes.common import errors
from civicdp.server.services.request_bodies import QueryRequest
from civicdp.server.services.schemas import EstimateOut, QueryResultOut

router = APIRouter(prefix="/queries", tags=["queries"])

# A plain object (documented as QueryRequest): an aggregate spec or a named analysis
# ({"analysis": "bundles", ...}); the service validates it and answers 422 naming the field and the fix.


@router.post("/estimate", response_model=EstimateOut, responses=errors(401, 403, 404, 422),
             summary="Cost and predicted accuracy of a query, free and without reading data")
async def estimate(spec: QueryRequest, caller: CurrentCaller, state: StateDep) -> EstimateOut:
    return await run_in_threadpool(state.queries.estimate, caller, spec.root)


@router.post("", response_model=QueryResultOut, responses=errors(401, 403, 404, 409, 422, 503),
             summary="Run a query: the private answer, charged to your budgets before it is returned")
async def run(spec: QueryRequest, caller: CurrentCaller, state: StateDep) -> QueryResultOut:
    return await run_in_threadpool(state.queries.run, caller, spec.root)

