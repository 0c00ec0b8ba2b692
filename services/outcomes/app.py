"""The outcomes service process: the analyst API over projections of every service's events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.js.errors
import structlog
from fastapi import FastAPI, Request, Response
from nats.js import JetStreamContext

from contracts import register_all
from services.outcomes import projections
from services.outcomes.api import routes
from services.outcomes.dashboard import dashboard_routes
from services.outcomes.queries import OutcomesQueries, reading_engine
from services.outcomes.rebuild import BackgroundRebuild, default_streams
from shared import metrics
from shared.auth import public
from shared.events import Envelope, registry
from shared.service import Service

log = structlog.get_logger(__name__)

FRESHNESS_HEADER = "X-Projection-Position"
STAMP_TIMEOUT_SECONDS = 0.25
LAG_INTERVAL_SECONDS = 5.0


def create_app(service: Service) -> FastAPI:
    register_all(registry)
    projections.register(service)
    streams = default_streams(service.topology)
    queries = OutcomesQueries(reading_engine(service.store.engine), streams)
    rebuilds = BackgroundRebuild(
        service.store.engine, lambda: service.broker.connection.jetstream(), streams, codec=service.store.codec
    )
    service.background.append(_on_shutdown(rebuilds, queries))
    service.background.append(_watch_projection_lag(service, queries))
    app = service.app(
        routes(service, queries, rebuilds),
        public(dashboard_routes(service)),  # pages hold no data; their API calls carry the key
        title="nephrotrack outcomes",
        description=__doc__ or "",
    )
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
    """Freshness headers on the authenticated endpoints that do not read the projection
    themselves (metrics, docs). Not on open routes (``/healthz``, the dashboard's pages and
    assets): how fresh the clinical data are is itself for key holders only; refusals (401/403)
    never reach this middleware. Best effort and bounded: the answer must come promptly even
    with the database down (then without the headers)."""

    @app.middleware("http")
    async def stamp(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        authenticated = getattr(request.state, "principal", None) is not None  # set by shared.auth
        if authenticated and FRESHNESS_HEADER not in response.headers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STAMP_TIMEOUT_SECONDS), queries.snapshot() as connection:
                    response.headers.update((await queries.freshness(connection)).headers())
        return response


# --- projection lag ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ProjectionLag:
    """How far the served projection is behind its sources (docs/metrics.md).

    ``events``: per source service, stream head sequence minus the last sequence applied to the
    active generation. ``seconds``: 0 when every source is caught up; otherwise, over the sources
    behind, the largest ``now - recorded_at`` of the *oldest* message not yet applied (the one
    right after the source's mark) — how long a fact has been waiting to reach the statistics.
    If that message cannot be read (deleted from the stream), the newest applied event of that
    source stands in for it (``now - its recorded_at``), an upper bound.

    Why not ``now - recorded_at`` of the newest applied event alone: after a quiet night the
    first new event would make that read hours for the milliseconds it takes to apply it.
    """

    events: dict[str, int]
    seconds: float


async def projection_lag(js: JetStreamContext, queries: OutcomesQueries, now: datetime | None = None) -> ProjectionLag:
    async with queries.snapshot() as connection:
        freshness = await queries.freshness(connection)
    now = now or datetime.now(UTC)
    events: dict[str, int] = {}
    seconds = 0.0
    for source in freshness.sources:
        try:
            head = (await js.stream_info(source.stream)).state.last_seq
        except nats.js.errors.NotFoundError:
            head = 0  # nothing was ever published by that service
        behind = events[source.source] = max(head - source.last_sequence, 0)
        if behind == 0:
            continue
        waiting_since = source.last_event_recorded_at
        try:
            oldest = await js.get_msg(source.stream, seq=source.last_sequence + 1)
            waiting_since = Envelope.model_validate_json(oldest.data or b"").recorded_at
        except Exception:  # deleted, or not an envelope: keep the upper bound
            pass
        if waiting_since is not None:
            if waiting_since.tzinfo is None:
                waiting_since = waiting_since.replace(tzinfo=UTC)
            seconds = max(seconds, (now - waiting_since).total_seconds())
    return ProjectionLag(events, max(seconds, 0.0))


def _watch_projection_lag(service: Service, queries: OutcomesQueries) -> Callable[[], Awaitable[None]]:
    """Background task: ``nephrotrack_projection_lag_events`` / ``_seconds`` every few seconds."""

    async def watch_projection_lag() -> None:
        while True:
            try:
                lag = await projection_lag(service.broker.connection.jetstream(), queries)
            except Exception as exc:  # database or broker away: keep the last values, try again
                log.info("projection lag not measured", error=repr(exc))
            else:
                for source, behind in lag.events.items():
                    metrics.PROJECTION_LAG_EVENTS.labels(source=source).set(behind)
                metrics.PROJECTION_LAG_SECONDS.set(lag.seconds)
            await asyncio.sleep(LAG_INTERVAL_SECONDS)

    return watch_projection_lag
