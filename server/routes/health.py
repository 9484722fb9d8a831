"""Liveness and readiness: the only routes that need no API key."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from server.deps import ReadSession
from server.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="The server is up")
def health() -> Health:
    return Health(status="ok")


@router.get("/ready", response_model=Health, summary="The server can reach its state database",
            responses={503: {"model": Health}})
def ready(session: ReadSession) -> Health | JSONResponse:
    try:
        session.exec(text("SELECT 1"))  # type: ignore[call-overload]
    except Exception:  # noqa: BLE001 - any database failure means not ready
        return JSONResponse({"status": "database unavailable"}, status_code=503)
    return Health(status="ready")
