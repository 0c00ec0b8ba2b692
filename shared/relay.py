"""Outbox relay: publishes committed outbox rows to JetStream, then deletes them.

Each message carries ``Nats-Msg-Id`` = ``event_id``, so JetStream drops a re-publish inside its
duplicate window, and every consumer's inbox drops it after that. The relay deletes a row only
after JetStream acknowledged it: killed at any point, it either re-publishes (a duplicate with
no effect) or has nothing left to do — it never loses an event. Several relays may run against
one PostgreSQL database: ``FOR UPDATE SKIP LOCKED`` gives each its own rows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import structlog
from nats.js import JetStreamContext
from sqlalchemy import Row, delete, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from shared import metrics
from shared.schema import outbox
from shared.store import EventStore

log = structlog.get_logger(__name__)


class OutboxRelay:
    def __init__(
        self,
        store: EventStore,
        js: JetStreamContext,
        *,
        batch_size: int = 500,
        idle_seconds: float = 0.05,
        ack_timeout: float = 10.0,
    ) -> None:
        self.store = store
        self.js = js
        self.batch_size = batch_size
        self.idle_seconds = idle_seconds
        self.ack_timeout = ack_timeout
        self.wakeup = asyncio.Event()
        self._observed_at = 0.0

    def notify(self) -> None:
        """Called after a local commit so the relay publishes at once instead of on its next poll."""
        self.wakeup.set()

    async def run(self) -> None:
        backoff = self.idle_seconds
        while True:
            try:
                sent = await self.publish_batch()
                backoff = self.idle_seconds
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker or database down: keep the rows, try again later
                metrics.PUBLISH_FAILURES.inc()
                log.warning("outbox relay failed, will retry", error=str(exc), retry_in=backoff)
                sent = 0
                backoff = min(backoff * 2 if backoff >= 0.5 else 0.5, 10.0)
            if sent < self.batch_size:
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), timeout=backoff)
                except TimeoutError:
                    pass

    async def publish_batch(self) -> int:
        """Publish up to ``batch_size`` rows; returns how many were acknowledged and deleted.

        On PostgreSQL the rows stay locked (``SKIP LOCKED``) while they are published, so
        parallel relays never publish the same row. SQLite allows one writer at a time, so
        there the rows are read, published outside any transaction, then deleted: a crash in
        between only re-publishes, which the broker and the inboxes absorb.
        """
        query = select(outbox).order_by(outbox.c.id).limit(self.batch_size)
        if self.store.is_postgres:
            async with self.store.engine.begin() as connection:
                rows = (await connection.execute(query.with_for_update(skip_locked=True))).all()
                acked = await self._publish(rows)
                await self._delete(connection, acked)
                return len(acked)
        async with self.store.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        acked = await self._publish(rows)
        async with self.store.engine.begin() as connection:
            await self._delete(connection, acked)
        return len(acked)

    async def _publish(self, rows: Sequence[Row[Any]]) -> list[Row[Any]]:
        if not rows:
            return []
        futures = [
            await self.js.publish_async(row.subject, row.body, headers={"Nats-Msg-Id": str(row.event_id)})
            for row in rows
        ]
        results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), self.ack_timeout)
        acked = [row for row, result in zip(rows, results, strict=True) if not isinstance(result, BaseException)]
        failed = [result for result in results if isinstance(result, BaseException)]
        if failed:  # those rows stay for the next round
            metrics.PUBLISH_FAILURES.inc(len(failed))
            log.warning("outbox messages not acknowledged", failed=len(failed), error=repr(failed[0]))
        for row in acked:
            metrics.EVENTS_PUBLISHED.labels(subject_prefix=row.subject.rsplit(".", 1)[0]).inc()
        return acked

    async def _delete(self, connection: AsyncConnection, acked: Sequence[Row[Any]]) -> None:
        if acked:
            await connection.execute(delete(outbox).where(outbox.c.id.in_([row.id for row in acked])))
        await self._observe_backlog(connection)

    async def _observe_backlog(self, connection: AsyncConnection) -> None:
        """Refresh the backlog gauges, at most once a second (the count scans the table)."""
        now = time.monotonic()
        if now - self._observed_at < 1.0:
            return
        self._observed_at = now
        count, oldest = (await connection.execute(select(func.count(), func.min(outbox.c.created_at)))).one()
        metrics.OUTBOX_BACKLOG.set(count)
        if oldest is None:
            metrics.OUTBOX_OLDEST_AGE.set(0)
        else:
            oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=UTC)
            metrics.OUTBOX_OLDEST_AGE.set((datetime.now(UTC) - oldest).total_seconds())
