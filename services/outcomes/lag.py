"""Projection lag: how far the served projection is behind its source streams, measured every
few seconds into ``nephrotrack_projection_lag_events`` / ``_seconds`` (docs/metrics.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from nats.js import JetStreamContext

from services.outcomes.queries import OutcomesQueries
from services.outcomes.rebuild.reader import stream_heads
from shared import metrics
from shared.events import Envelope
from shared.moments import as_utc
from shared.service import Service

log = structlog.get_logger(__name__)

LAG_INTERVAL_SECONDS = 5.0


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
    heads = await stream_heads(js, {source.source: source.stream for source in freshness.sources})
    events: dict[str, int] = {}
    seconds = 0.0
    for source in freshness.sources:
        behind = events[source.source] = max(heads[source.stream] - source.last_sequence, 0)
        if behind == 0:
            continue
        waiting_since = source.last_event_recorded_at
        try:
            oldest = await js.get_msg(source.stream, seq=source.last_sequence + 1)
            waiting_since = Envelope.model_validate_json(oldest.data or b"").recorded_at
        except Exception:  # deleted, or not an envelope: keep the upper bound
            pass
        if waiting_since is not None:
            seconds = max(seconds, (now - as_utc(waiting_since)).total_seconds())
    return ProjectionLag(events, max(seconds, 0.0))


def lag_watcher(service: Service, queries: OutcomesQueries) -> Callable[[], Awaitable[None]]:
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
