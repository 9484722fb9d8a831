"""Liveness and readiness: the only routes that need no API key.

Readiness also reports the integrity alarms (:mod:`civicdp.server.auditlog.alarms`, :mod:`civicdp.server.auditlog.reconcile`):
a stored audit log that fails its check makes the server not ready (503: it answers no
request that needs an audit entry); budgets held after failing reconciliation and stored
answers refused after failing their check are listed with a 200 ("degraded"), since
everything else is still served. The report names what failed and how, never amounts
or contents (readiness needs no key); the full explanation is in the audit log
(``integrity.alarm``) and the server's log.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from civicdp.queries import spark_session
from civicdp.server.http.deps import ReadSession, StateDep
from civicdp.server.services.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="The server is up")
def health() -> Health:
    return Health(status="ok")


@router.get("/ready", response_model=Health, responses={503: {"model": Health}},
            summary="The server can reach its state database and its audit log passes its integrity check")
def ready(session: ReadSession, state: StateDep) -> Health | JSONResponse:
    try:
        session.exec(text("SELECT 1"))  # type: ignore[call-overload]
    except Exception:  # noqa: BLE001 - any database failure means not ready
        return JSONResponse({"status": "database unavailable"}, status_code=503)
    integrity = state.audit.integrity()
    if not integrity["audit_log"]["ok"]:
        return JSONResponse({"status": "audit log failed its integrity check", **integrity}, status_code=503)
    if integrity["held_budgets"] or integrity["refused_releases"]:
        return JSONResponse({"status": "degraded: state failed its integrity check", **integrity})
    spark = spark_session.status()
    if spark["started"] or spark["error"]:
        # The Spark session of "engine": "spark" datasets: where it runs and what starting it cost.
        return JSONResponse({"status": "ready", "spark": spark})
    return Health(status="ready")
