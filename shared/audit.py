"""The audit trail: who did what, when — read from the service's own event log.

Every event records its ``actor`` (for HTTP commands the authenticated caller,
``<role>:<key fingerprint>``; for messages the channel or the service that reacted, e.g.
``labs:broker``, ``labs:mllp``, ``enrollment``), when it happened and when it was recorded, and
its correlation id. ``GET /v1/audit`` (role operator) lists them, newest first. Payloads are not
shown: the trail says who changed which stream, not the clinical content.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel
from sqlalchemy import select

from shared.moments import as_utc
from shared.schema import events

if TYPE_CHECKING:
    from shared.service import Service
    from shared.store import SqlEventStore

MAX_LIMIT = 1000
MAX_POSITION = 2**63 - 1  # BIGINT
NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL


class AuditEntry(BaseModel):
    position: int
    event_id: str
    event_type: str
    stream_id: str
    stream_version: int
    actor: str
    occurred_at: datetime
    recorded_at: datetime
    correlation_id: str
    causation_id: str | None


async def audit_entries(
    store: SqlEventStore,
    *,
    since: datetime | None = None,
    actor: str | None = None,
    event_type: str | None = None,
    stream_id: str | None = None,
    before: int | None = None,
    limit: int = 100,
) -> list[AuditEntry]:
    """The newest ``limit`` events matching the filters, newest first (by log position).
    ``before`` pages back: pass the last entry's ``position``."""
    columns = (
        events.c.position, events.c.event_id, events.c.event_type, events.c.stream_id, events.c.stream_version,
        events.c.actor, events.c.occurred_at, events.c.recorded_at, events.c.correlation_id, events.c.causation_id,
    )
    query = select(*columns).order_by(events.c.position.desc()).limit(max(1, min(limit, MAX_LIMIT)))
    if since is not None:
        since = as_utc(since)
        # SQLite keeps timestamps as naive UTC text: compare like with like.
        query = query.where(events.c.recorded_at >= (since if store.is_postgres else since.replace(tzinfo=None)))
    if actor:
        query = query.where(events.c.actor == actor)
    if event_type:
        query = query.where(events.c.event_type == event_type)
    if stream_id:
        query = query.where(events.c.stream_id == stream_id)
    if before is not None:
        query = query.where(events.c.position < before)
    async with store.engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    return [
        AuditEntry(
            position=row.position,
            event_id=str(row.event_id),
            event_type=row.event_type,
            stream_id=row.stream_id,
            stream_version=row.stream_version,
            actor=row.actor,
            occurred_at=as_utc(row.occurred_at),
            recorded_at=as_utc(row.recorded_at),
            correlation_id=str(row.correlation_id),
            causation_id=None if row.causation_id is None else str(row.causation_id),
        )
        for row in rows
    ]


def audit_routes(service: Service) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["audit"])

    @router.get(
        "/audit",
        response_model=list[AuditEntry],
        summary="Who did what, when: this service's events, newest first (role operator)",
    )
    async def audit(
        since: datetime | None = Query(None, description="only events recorded at or after this time (ISO 8601)"),
        actor: str | None = Query(None, max_length=200, pattern=NO_NUL, description="only this actor, e.g. staff:1a2b3c4d"),
        event_type: str | None = Query(None, max_length=100, pattern=NO_NUL),
        stream_id: str | None = Query(None, max_length=200, pattern=NO_NUL),
        before: int | None = Query(None, ge=1, le=MAX_POSITION, description="page back: only positions below this one"),
        limit: int = Query(100, ge=1, le=MAX_LIMIT),
    ) -> list[Any]:
        if since is not None:
            try:
                since = as_utc(since)
            except (OverflowError, ValueError):
                raise HTTPException(422, "since: not a representable UTC time") from None
        return await audit_entries(
            service.store, since=since, actor=actor, event_type=event_type, stream_id=stream_id,
            before=before, limit=limit,
        )

    return router
