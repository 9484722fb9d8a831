"""Steward changes with larger forms: register a dataset, add a policy rule, define a feed or a monitor,
stop a monitor.

Each calls the ``/v1`` handler (``routes/datasets.py``, ``routes/admin.py``, ``routes/feeds.py``,
``routes/monitors.py``) with a body built by the API's own schema, so the policy decides and the
change commits with its audit entry exactly as through the API. A definition typed as JSON is
parsed here and validated by the same schema; what is wrong comes back as a 4xx page naming it.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, BackgroundTasks, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from civicdp.server.http.console.deps import ConsoleRoute, FormDep, SignedDep, page
from civicdp.server.http.console.routes_steward import redirect_done
from civicdp.server.http.deps import StateDep, WriteSession
from civicdp.server.http.routes import admin as admin_api
from civicdp.server.http.routes import datasets as datasets_api
from civicdp.server.http.routes import feeds as feeds_api
from civicdp.server.http.routes import monitors as monitors_api
from civicdp.server.feeds.schemas import FeedDefinition
from civicdp.server.services.request_bodies import MonitorRequest
from civicdp.server.services.schemas import DatasetRegister, PolicyRule
from civicdp.server.state.errors import InvalidRequest

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False, prefix="/console/steward")

#: A definition typed in a textarea: far more than any feed or monitor needs, small enough to parse at once.
MAX_DEFINITION = 20_000


def _json_object(form: dict[str, str], field: str = "definition") -> dict[str, Any]:
    """The textarea's JSON object, or :class:`InvalidRequest` saying where it is not one."""
    text = form.get(field, "")
    if len(text) > MAX_DEFINITION:
        raise InvalidRequest(field, f"{len(text)} characters, more than {MAX_DEFINITION}", "shorten the definition")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(field, f"not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
                             "correct the JSON and send again") from None
    if not isinstance(value, dict):
        raise InvalidRequest(field, f"a JSON {type(value).__name__}, not an object",
                             'write one object, e.g. {"name": ...}')
    return value


@router.post("/datasets", response_class=HTMLResponse)
def register_dataset(request: Request, state: StateDep, session: WriteSession, signed: SignedDep, form: FormDep,
                     background: BackgroundTasks) -> HTMLResponse:
    """The answer page shows the check's findings and warnings (a refusal is the error page with its text)."""
    accept = [option for option in ("undeclared_nulls", "dropped_keys") if form.get(f"accept_{option}")]
    body = DatasetRegister(path=form.get("path", ""), accept=accept,  # type: ignore[arg-type]
                           publish_accepted_shares=bool(form.get("publish_accepted_shares")))
    registered = datasets_api.register_dataset(body, signed.caller, state, session, request, background)
    return page(request, "dataset_registered.html", signed, title="Dataset registered",
                registered=registered.model_dump(mode="json"))


@router.post("/policies")
def add_rule(state: StateDep, session: WriteSession, signed: SignedDep, form: FormDep) -> RedirectResponse:
    body = PolicyRule(subject=form.get("subject", ""), agency=form.get("agency", ""),  # type: ignore[arg-type]
                      object=form.get("object", ""), action=form.get("action", ""),
                      cap=form.get("cap") or "*", effect=form.get("effect", "allow"))
    admin_api.add_rule(body, signed.caller, state, session)
    return redirect_done("rule_added")


@router.post("/feeds")
def define_feed(state: StateDep, signed: SignedDep, form: FormDep) -> RedirectResponse:
    body = FeedDefinition.model_validate(_json_object(form))
    feeds_api.define(body, signed.caller, state)
    return redirect_done("feed_defined")


@router.post("/monitors")
def define_monitor(state: StateDep, signed: SignedDep, form: FormDep) -> RedirectResponse:
    monitors_api.define_monitor(MonitorRequest.model_validate(_json_object(form)), signed.caller, state)
    return redirect_done("monitor_defined")


@router.post("/monitors/stop")
def stop_monitor(state: StateDep, signed: SignedDep, form: FormDep) -> RedirectResponse:
    monitors_api.stop_monitor(form.get("name", "")[:100], signed.caller, state)
    return redirect_done("monitor_stopped")
