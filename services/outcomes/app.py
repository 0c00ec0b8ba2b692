"""The outcomes service process: the analyst API over projections of every service's events."""

# The composition root (its docstring is the API's description): registers the events, reads the
# settings, builds the projection port, the queries and the rebuild, and wires the routes, the
# consumers and the background tasks.

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import FastAPI

from contracts import register_all
from services.outcomes import locks, projections
from services.outcomes.api import routes, stamp_every_response
from services.outcomes.cdisc.routes import cdisc_routes
from services.outcomes.dashboard import dashboard_routes
from services.outcomes.lag import lag_watcher
from services.outcomes.lock_routes import lock_routes
from services.outcomes.projection_sql import SqlProjectionStore
from services.outcomes.queries import OutcomesQueries, reading_engine
from services.outcomes.rebuild.wiring import BackgroundRebuild, default_streams
from services.outcomes.remembered import RememberedPatients
from services.outcomes.settings import OutcomesSettings
from services.outcomes.time_travel import TimeTravel
from services.outcomes.viewpoint import viewpoints
from shared.auth import public
from shared.events import registry
from shared.service import Service


def create_app(service: Service) -> FastAPI:
    register_all(registry, *locks.EVENTS)
    settings = OutcomesSettings()
    projection = SqlProjectionStore(RememberedPatients(settings.remembered_results) if settings.remembered_results else None)
    projections.register(service, projection, settings)
    streams = default_streams(service.topology)
    queries = OutcomesQueries(reading_engine(service.store.engine), streams)
    rebuilds = BackgroundRebuild(service.store, lambda: service.broker.connection, streams, projection)
    time_travel = TimeTravel(lambda: service.broker.connection, queries, service.store.codec, settings)
    viewpoint = viewpoints(queries, time_travel)
    service.background.append(_on_shutdown(service, rebuilds, queries))
    service.background.append(lag_watcher(service, queries))
    app = service.app(
        routes(service, queries, rebuilds, viewpoint),
        cdisc_routes(viewpoint),
        lock_routes(service, projection, queries, viewpoint),
        public(dashboard_routes(service)),  # pages hold no data; their API calls carry the key
        title="nephrotrack outcomes",
        description=__doc__ or "",
    )
    stamp_every_response(app, queries)
    return app


def _on_shutdown(
    service: Service, rebuilds: BackgroundRebuild, queries: OutcomesQueries
) -> Callable[[], Awaitable[None]]:
    """A background task that only waits: cancelled at shutdown, it cancels a running rebuild
    (which releases its lease, so the next one resumes) and closes the readers' engine."""

    async def wait_then_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await rebuilds.stop()
            if queries.engine is not service.store.engine:
                await queries.engine.dispose()

    return wait_then_stop
