"""Analyst pages: datasets with their public metadata, the query form (free estimate first), results
with their intervals, budgets left, past releases.

Estimating and running call the query service exactly as ``POST /v1/queries/estimate`` and
``POST /v1/queries`` do: the policy, the caps, the charge before any data is read and the
audit entries are theirs. Running is a form post with the session's CSRF token.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sqlmodel import select
from starlette.concurrency import run_in_threadpool

from civicdp.server.http.console import charts
from civicdp.server.http.console.deps import ConsoleRoute, FormDep, SignedDep, page
from civicdp.policies.actions import Action
from civicdp.server.http.deps import ReadSession, StateDep, authorize
from civicdp.server.http.routes import budgets as budgets_api
from civicdp.server.http.routes import datasets as datasets_api
from civicdp.server.http.routes import releases as releases_api
from civicdp.server.state.errors import InvalidRequest
from civicdp.server.state.models import Release

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False, prefix="/console")
#: Past releases shown (the newest).
RELEASES = 10


def examples(dataset: str) -> list[tuple[str, str]]:
    """Specs to start from (the README's first questions), as (title, JSON text)."""
    specs = [("Count by channel", {"dataset": dataset, "aggregate": "count", "group_by": ["channel"], "epsilon": 0.1}),
             ("Count by department", {"dataset": dataset, "aggregate": "count", "group_by": ["department"], "epsilon": 0.1}),
             ("Bundles (analysis)", {"dataset": dataset, "analysis": "bundles", "window_days": 30, "top_k": 20,
                                     "epsilon": 0.5})]
    return [(title, json.dumps(spec, indent=2)) for title, spec in specs]


@router.get("/analyst", response_class=HTMLResponse)
def analyst(request: Request, state: StateDep, session: ReadSession, signed: SignedDep) -> HTMLResponse:
    caller = signed.caller
    datasets = datasets_api.list_datasets(caller, state, session)
    budgets = budgets_api.list_budgets(caller, state, session, dataset=None, all=False)
    ids = session.exec(select(Release.id).where(Release.account_id == caller.account_id)
                       .order_by(Release.id.desc()).limit(RELEASES)).all()  # type: ignore[union-attr]
    releases = [releases_api.get_release(int(i), caller, state, session) for i in ids if i is not None]
    return page(request, "analyst.html", signed, title="Datasets and queries", datasets=datasets,
                budgets=budgets, releases=releases)


@router.get("/query", response_class=HTMLResponse)
def query_form(request: Request, state: StateDep, session: ReadSession, signed: SignedDep,
               dataset: str | None = None) -> HTMLResponse:
    names = [d.name for d in datasets_api.list_datasets(signed.caller, state, session)]
    chosen = dataset if dataset in names else (names[0] if names else "")
    # The form asks the policy too: with no dataset to read it is refused (and recorded) as the API would.
    authorize(state, signed.caller, Action.DATASET_READ, f"dataset:{chosen or '*'}")
    shown = examples(chosen)
    return page(request, "query.html", signed, title="Ask a question", examples=shown,
                spec=shown[0][1] if shown else "{}", estimate=None)


def _spec(form: dict[str, str]) -> dict[str, Any]:
    try:
        spec = json.loads(form.get("spec", ""))
    except ValueError as exc:
        raise InvalidRequest("spec", f"the spec is not JSON ({exc.msg} at character {exc.pos})",
                             "Write the question as a JSON object, as in the examples") from None
    if not isinstance(spec, dict):
        raise InvalidRequest("spec", "the spec is not a JSON object", "Write it as {\"dataset\": ..., ...}")
    return spec


@router.post("/query/estimate", response_class=HTMLResponse)
async def estimate(request: Request, state: StateDep, signed: SignedDep, form: FormDep) -> HTMLResponse:
    spec = _spec(form)
    priced = await run_in_threadpool(state.queries.estimate, signed.caller, spec)
    return page(request, "query.html", signed, title="Ask a question", examples=examples(str(spec.get("dataset", ""))),
                spec=json.dumps(spec, indent=2), estimate=priced)


@router.post("/query/run", response_class=HTMLResponse)
async def run(request: Request, state: StateDep, signed: SignedDep, form: FormDep) -> HTMLResponse:
    spec = _spec(form)
    result = await run_in_threadpool(state.queries.run, signed.caller, spec)
    chart = charts.interval_chart({"rows": result.rows})
    return page(request, "result.html", signed, title=f"Release {result.release_id}", result=result,
                spec=json.dumps(spec, indent=2), charts={"intervals": chart})
