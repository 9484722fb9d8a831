"""Mounting the console on the app: its routers and its static files (``/console/static``)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from civicdp.server.http.console import (routes_analyst, routes_auth, routes_feeds, routes_oversight, routes_steward,
                                       routes_steward_forms)
from civicdp.server.http.console.deps import HERE


def install(app: FastAPI) -> None:
    """Add the console's pages to ``app`` (``GET /`` leads to the sign-in form)."""
    for module in (routes_auth, routes_oversight, routes_steward, routes_steward_forms, routes_analyst, routes_feeds):
        app.include_router(module.router)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")
