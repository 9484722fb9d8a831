"""Monitors: define and feed (stewards), read (oversight, stewards), follow alerts (analysts of the agency)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body, Query, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from civicdp.policies.actions import Action
from civicdp.queries.errors import QueryError
from civicdp.server.state.caller import Caller
from civicdp.server.http.deps import CurrentCaller, StateDep, authorize
from civicdp.server.services.app_state import AppState
from civicdp.server.state.errors import AccessDenied, NotFound
from civicdp.server.state.monitor_models import Monitor
from civicdp.server.monitors.service import MonitorService, alert_dict, monitor_dict, release_dict
from civicdp.server.http.routes.common import errors
from civicdp.server.services.monitor_schemas import AlertOut, BatchOut, MonitorOut, MonitorReleaseOut, SubscriptionOut
from civicdp.server.services.query_service import record
from civicdp.server.services.request_bodies import MonitorRequest
from civicdp.server.state.db import session_scope

router = APIRouter(prefix="/monitors", tags=["monitors"])

STREAM_POLL_SECONDS = 0.5


class SubscriptionIn(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"callback_url": "https://alerts.health.example/civicdp"},
                                                              {"callback_url": None}]})
    callback_url: str | None = Field(default=None, max_length=500, pattern=r"^https?://[^\s]+$")


def _service(state: AppState) -> MonitorService:
    return MonitorService(state.db, state.settings.data_dir, state.caps)


def _allowed(state: AppState, caller: Caller, action: Action) -> bool:
    return state.policies.check(caller.subject, caller.agency, "server", action).allowed


def _deny(state: AppState, caller: Caller, action: Action, target: str, reason: str) -> None:
    with session_scope(state.db) as session:
        record(session, caller, action.value, target, "denied", reason=reason)
    raise AccessDenied(reason, None)


def _visible(state: AppState, caller: Caller, name: str, *, need_subscription: bool) -> Monitor:
    """The monitor ``name`` if the caller may read it. A caller who may not read every monitor
    gets the same 403 for a monitor that does not exist as for one of another agency's."""
    try:
        row = _service(state).get(name)
    except NotFound:
        if _allowed(state, caller, Action.MONITOR_READ):
            raise
        _deny(state, caller, Action.MONITOR_READ, f"monitor:{name}", "no rule lets you read this monitor")
    _readable(state, caller, row, need_subscription=need_subscription)
    return row


def _readable(state: AppState, caller: Caller, row: Monitor, *, need_subscription: bool) -> None:
    """Oversight and stewards read every monitor; analysts read their agency's (alerts once subscribed)."""
    if _allowed(state, caller, Action.MONITOR_READ):
        return
    target = f"monitor:{row.name}"
    if not _allowed(state, caller, Action.MONITOR_SUBSCRIBE) or row.agency != caller.agency:
        _deny(state, caller, Action.MONITOR_READ, target, "no rule lets you read this monitor")
    if need_subscription and not _service(state).is_subscribed(row.name, caller.name):
        _deny(state, caller, Action.MONITOR_READ, target,
              "subscribe to this monitor first (POST /v1/monitors/{name}/subscriptions)")


@router.post("", response_model=MonitorOut, status_code=status.HTTP_201_CREATED,
             responses=errors(401, 403, 404, 409, 422),
             summary="Define a monitor; its total loss for the whole horizon is charged now (stewards)")
def define_monitor(body: MonitorRequest, caller: CurrentCaller, state: StateDep) -> dict[str, Any]:
    authorize(state, caller, Action.MONITOR_MANAGE, "server")
    service = _service(state)
    try:
        return monitor_dict(service.define(caller, body.root))
    except QueryError as exc:
        service.record_refusal(caller, str(body.root.get("name", "?"))[:100], str(exc), "monitor.define")
        raise


@router.get("", response_model=list[MonitorOut], responses=errors(401, 403, 422), summary="Monitors you may see, with their losses")
def list_monitors(caller: CurrentCaller, state: StateDep) -> list[dict[str, Any]]:
    service = _service(state)
    if _allowed(state, caller, Action.MONITOR_READ):
        return [monitor_dict(m) for m in service.list()]
    if _allowed(state, caller, Action.MONITOR_SUBSCRIBE):
        return [monitor_dict(m) for m in service.list(agency=caller.agency)]
    authorize(state, caller, Action.MONITOR_READ, "server")  # records and raises the denial
    return []


@router.get("/{name}", response_model=MonitorOut, responses=errors(401, 403, 404, 422), summary="One monitor: definition, loss, progress")
def get_monitor(name: str, caller: CurrentCaller, state: StateDep) -> dict[str, Any]:
    row = _visible(state, caller, name, need_subscription=False)
    return monitor_dict(row)


@router.delete("/{name}", response_model=MonitorOut, responses=errors(401, 403, 404, 422), summary="Stop a monitor (stewards)")
def stop_monitor(name: str, caller: CurrentCaller, state: StateDep) -> dict[str, Any]:
    authorize(state, caller, Action.MONITOR_MANAGE, "server")
    return monitor_dict(_service(state).deactivate(caller, name))


@router.post("/{name}/batches", response_model=BatchOut, status_code=status.HTTP_201_CREATED, responses=errors(401, 403, 404, 409, 422),
             summary="Append a batch of events (Parquet body) covering [start, end) (stewards)")
def append_batch(name: str, start: datetime, end: datetime, caller: CurrentCaller, state: StateDep,
                 data: Annotated[bytes, Body(media_type="application/octet-stream")]) -> dict[str, Any]:
    authorize(state, caller, Action.MONITOR_MANAGE, "server")
    service = _service(state)
    try:
        return service.append(caller, name, data, start, end)
    except QueryError as exc:
        service.record_refusal(caller, name, str(exc), "monitor.batch")
        raise


@router.get("/{name}/releases", response_model=list[MonitorReleaseOut], responses=errors(401, 403, 404, 422),
            summary="Released values per step and group, with intervals")
def list_releases(name: str, caller: CurrentCaller, state: StateDep,
                  after: Annotated[int, Query(ge=-1, le=2**31)] = -1) -> list[dict[str, Any]]:
    service = _service(state)
    _visible(state, caller, name, need_subscription=True)
    return [release_dict(r) for r in service.releases(name, after)]


@router.get("/{name}/alerts", response_model=list[AlertOut], responses=errors(401, 403, 404, 422), summary="Alerts raised by the monitor's rules")
def list_alerts(name: str, caller: CurrentCaller, state: StateDep,
                after: Annotated[int, Query(ge=0, le=2**62)] = 0) -> list[dict[str, Any]]:
    service = _service(state)
    _visible(state, caller, name, need_subscription=True)
    return [alert_dict(a, name) for a in service.alerts(name, after)]


@router.get("/{name}/alerts/stream", response_class=StreamingResponse,
            responses={**errors(401, 403, 404, 422), 200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                                                           "description": "Server-sent events: one `alert` event each"}},
            summary="Alerts as server-sent events (text/event-stream); once=true ends after the backlog")
def stream_alerts(name: str, caller: CurrentCaller, state: StateDep,
                  after: Annotated[int, Query(ge=0, le=2**62)] = 0,
                  once: bool = False) -> StreamingResponse:
    service = _service(state)
    _visible(state, caller, name, need_subscription=True)

    async def events() -> AsyncIterator[str]:
        last = after
        yield ": civicdp alert stream\n\n"
        while True:
            alerts = await anyio.to_thread.run_sync(service.alerts, name, last)
            for alert in alerts:
                last = alert.id or last
                yield f"id: {alert.id}\nevent: alert\ndata: {json.dumps(alert_dict(alert, name))}\n\n"
            if once:
                return
            await anyio.sleep(STREAM_POLL_SECONDS)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/{name}/subscriptions", response_model=SubscriptionOut, status_code=status.HTTP_201_CREATED, responses=errors(401, 403, 404, 422),
             summary="Subscribe to a monitor of your agency's alerts (optionally with an HTTP callback)")
def subscribe(name: str, body: SubscriptionIn, caller: CurrentCaller, state: StateDep) -> dict[str, Any]:
    authorize(state, caller, Action.MONITOR_SUBSCRIBE, "server")
    service = _service(state)
    try:
        agency = service.get(name).agency
    except NotFound:
        agency = None  # refused exactly like another agency's monitor: existence is not told
    if agency != caller.agency:
        _deny(state, caller, Action.MONITOR_SUBSCRIBE, f"monitor:{name}",
              "no rule lets you subscribe to this monitor (only to your agency's)")
    return service.subscribe(caller, name, body.callback_url)
