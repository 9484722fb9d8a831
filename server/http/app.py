"""The composition root: builds the FastAPI app from settings. Nothing else lives here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from civicdp.server.http import errors
from civicdp.server.http.docs_pages import install_docs
from civicdp.server.http.openapi_errors import document_errors
from civicdp.server.http.request_log import AuditMiddleware, audit_checkpoints
from civicdp.server.http.console.mount import install as install_console
from civicdp.server.services.bootstrap import build_state
from civicdp.server.feeds.scheduler import start_feeds, stop_feeds
from civicdp.server.intake.prepare import Preparer
from civicdp.server.http.methods import AllowHeaderMiddleware
from civicdp.server.http.lean import LeanQueries
from civicdp.server.http.anonymous_traffic import AnonymousTraffic, last_summary, summarise_refusals
from civicdp.server.http.limits import RequestLimitsMiddleware, document_limits
from civicdp.server.http.security_headers import SecurityHeadersMiddleware
from civicdp.server.http.routes import admin, audit, budgets, datasets, feeds, health, monitors, queries, releases
from civicdp.server.http.routes import plans
from civicdp.server.state.settings import Settings

DESCRIPTION = """Differentially private statistics on public-service use.

Send your API key as `Authorization: Bearer <key>`. Every answer is differentially
private at the level of a person, carries a 95% interval for its noise, and is charged
to your budgets before it is returned; an identical question is answered from the
stored release at no cost. Errors say what was wrong and how to fix it."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    traffic = AnonymousTraffic.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = build_state(settings)
        app.state.civicdp = state
        scheduler = start_feeds(state)
        preparer = app.state.civicdp_preparer = Preparer(state.db, settings).start()  # registered versions
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(audit_checkpoints, state)
            tasks.start_soon(summarise_refusals, state, traffic)
            try:
                yield
            finally:
                tasks.cancel_scope.cancel()
                stop_feeds(scheduler)
                preparer.stop()
                last_summary(state, traffic)
                state.close()

    # /docs and /redoc are served from the package's own assets (docs_pages.py), not FastAPI's CDN pages.
    app = FastAPI(title="civicdp", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.anonymous_traffic = traffic
    errors.install(app)
    install_docs(app)
    document_limits(app)
    document_errors(app)
    # Added innermost first: security headers (outermost, so every answer has them, refusals and
    # cached answers too) -> audit (one entry per request) -> size, structure and
    # rate limits (before any body is parsed or key looked up) -> complete Allow on 405 -> the
    # lean path of cached answers (server/http/lean.py; everything else passes through) -> routes.
    app.add_middleware(LeanQueries, profile_file=settings.profile_file)
    app.add_middleware(AllowHeaderMiddleware)
    app.add_middleware(RequestLimitsMiddleware, settings=settings, traffic=traffic)
    app.add_middleware(AuditMiddleware, traffic=traffic)
    app.add_middleware(SecurityHeadersMiddleware)
    for module in (health, datasets, queries, budgets, releases, admin, audit, feeds, monitors, plans):
        app.include_router(module.router, prefix="/v1")
    install_console(app)  # the web console: pages calling the same handlers, under the same policy and log
    return app
