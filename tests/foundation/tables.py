"""What a store has written, read (and altered) beside its interface, in its tables: for tests
of what is stored, on every backend. The SQL stores through their engine, the in-memory store
through its ``tables``."""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from uuid import UUID

from sqlalchemy import select, update

from shared.schema import events, outbox
from shared.store import EventStore, MemoryEventStore, SqlEventStore


async def outbox_rows(store: EventStore) -> list[Any]:
    """The outbox rows, oldest first (``event_id``, ``subject``, ``body``)."""
    if isinstance(store, MemoryEventStore):
        return list(store.tables.outbox)
    assert isinstance(store, SqlEventStore)
    async with store.engine.connect() as connection:
        return list((await connection.execute(select(outbox).order_by(outbox.c.id))).all())


async def stored_payloads(store: EventStore) -> dict[str, bytes]:
    """Each event's payload as stored (the codec's bytes), by stream id (one event a stream)."""
    if isinstance(store, MemoryEventStore):
        return {record.stream_id: record.payload for record in store.tables.events}
    assert isinstance(store, SqlEventStore)
    async with store.engine.connect() as connection:
        return dict((await connection.execute(select(events.c.stream_id, events.c.payload))).all())


async def stored_payload(store: EventStore, event_id: UUID) -> bytes:
    if isinstance(store, MemoryEventStore):
        return next(record.payload for record in store.tables.events if record.event_id == event_id)
    assert isinstance(store, SqlEventStore)
    async with store.engine.connect() as connection:
        return await connection.scalar(select(events.c.payload).where(events.c.event_id == event_id))


async def overwrite_payload(store: EventStore, event_id: UUID, payload: bytes) -> None:
    """Change an event's stored payload, as someone with write access to the table could."""
    if isinstance(store, MemoryEventStore):
        rows = store.tables.events
        index = next(i for i, record in enumerate(rows) if record.event_id == event_id)
        rows[index] = replace(rows[index], payload=payload)
        return
    assert isinstance(store, SqlEventStore)
    async with store.engine.begin() as connection:
        await connection.execute(update(events).where(events.c.event_id == event_id).values(payload=payload))
