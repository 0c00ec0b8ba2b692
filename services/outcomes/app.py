"""The outcomes service process: the analyst API over projections of every service's events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response

from services.outcomes import projections
from services.outcomes.api import routes
from services.outcomes.queries import OutcomesQueries, reading_engine
from services.outcomes.rebuild import BackgroundRebuild, default_streams
from shared.service import Service

FRESHNESS_HEADER = "X-Projection-Position"
STAMP_TIMEOUT_SECONDS = 0.25


def create_app(service: Service) -> FastAPI:
    projections.register(service)
    streams = default_streams(service.topology)
    queries = OutcomesQueries(reading_engine(service.store.engine), streams)
    rebuilds = BackgroundRebuild(service.store.engine, lambda: service.broker.connection.jetstream(), streams)
    service.background.append(_on_shutdown(rebuilds, queries))
    app = service.app(routes(service, queries, rebuilds), title="nephrotrack outcomes", description=__doc__ or "")
    _stamp_every_response(app, queries)
    return app


def _on_shutdown(rebuilds: BackgroundRebuild, queries: OutcomesQueries) -> Callable[[], Awaitable[None]]:
    """A background task that only waits: cancelled at shutdown, it cancels a running rebuild
    (which releases its lease, so the next one resumes) and closes the readers' engine."""

    async def wait_then_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await rebuilds.stop()
            if queries.engine is not rebuilds.engine:
                await queries.engine.dispose()

    return wait_then_stop


def _stamp_every_response(app: FastAPI, queries: OutcomesQueries) -> None:
    """Freshness headers on the endpoints that do not read the projection themselves
    (health, metrics, docs). Best effort and bounded: /healthz must answer promptly even with
    the database down (then without the headers)."""

    @app.middleware("http")
    async def stamp(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        if FRESHNESS_HEADER not in response.headers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STAMP_TIMEOUT_SECONDS), queries.snapshot() as connection:
                    response.headers.update((await queries.freshness(connection)).headers())
        return response
