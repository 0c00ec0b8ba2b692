"""Reading the whole log right after writing it, in a test that shares PostgreSQL with others."""

from __future__ import annotations

import asyncio
import time

from shared.store import EventStore, StoredEvent


async def read_all_written(store: EventStore, count: int, *, within: float = 30.0) -> list[StoredEvent]:
    """``read_all`` once it returns the ``count`` events written. PostgreSQL's read horizon is the
    cluster's: any database's transaction in flight (a test running beside this one) holds it
    back for a moment after our commit — a delay by design, which a single read mistakes for loss."""
    deadline = time.monotonic() + within
    while True:
        read = [stored async for stored in store.read_all()]
        if len(read) >= count or time.monotonic() > deadline:
            return read
        await asyncio.sleep(0.05)
