"""The composition root: builds the FastAPI app from settings. Nothing else lives here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server import errors
from server.bootstrap import build_state
from server.routes import admin, budgets, datasets, health, queries, releases
from server.settings import Settings

DESCRIPTION = """Differentially private statistics on public-service use.

Send your API key as `Authorization: Bearer <key>`. Every answer is differentially
private at the level of a person, carries a 95% interval for its noise, and is charged
to your budgets before it is returned; an identical question is answered from the
stored release at no cost. Errors say what was wrong and how to fix it."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = build_state(settings)
        app.state.civicdp = state
        try:
            yield
        finally:
            state.close()

    app = FastAPI(title="civicdp", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    errors.install(app)
    for module in (health, datasets, queries, budgets, releases, admin):
        app.include_router(module.router, prefix="/v1")
    return app
