"""Outbox relay: publishes committed outbox rows to JetStream, then deletes them.

Each message carries ``Nats-Msg-Id`` = ``event_id``, so JetStream drops a re-publish inside its
duplicate window, and every consumer's inbox drops it after that. A batch is published as plain
NATS publishes whose replies (JetStream's acknowledgements) come back to one inbox subscription
of the relay's, drained when the whole batch is out (:class:`AckCollector`): nats-py's
``publish_async`` gave every message its own future, token and callback, a tenth of the labs
service's CPU per result (docs/labs.md#throughput). The relay deletes a row only
after JetStream acknowledged it: killed at any point, it either re-publishes (a duplicate with
no effect) or has nothing left to do — it never loses an event. Several relays may run against
one PostgreSQL database: ``FOR UPDATE SKIP LOCKED`` gives each its own rows. It works on a SQL
store's tables through its ``engine``; the in-memory store has no relay (shared/store/memory.py).

The outbox is a queue table: every row is inserted, locked and deleted within moments, so on
PostgreSQL it fills with dead rows that only VACUUM gives back. Autovacuum is not enough to rely
on: it may be off (it is on the development machine), and it wakes once a minute at best — at
5,000 lab results a second that is 300,000 dead rows, which every relay poll walks past in the
primary key and every backlog count scans. The relay therefore vacuums the outbox itself after
every ``vacuum_every`` rows it deleted (``VACUUM (SKIP_LOCKED)``: a relay never waits for another
relay's vacuum). Found on the labs benchmark, where the outbox had grown to 12,500 pages (100 MB)
for a few thousand live rows (docs/labs.md#throughput).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from sqlalchemy import Row, delete, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from shared import metrics
from shared.moments import as_utc
from shared.schema import outbox
from shared.store import EventStore, SqlEventStore
from shared.tasks import woken

log = structlog.get_logger(__name__)

VACUUM_EVERY_ROWS = 20_000
"""Rows a relay deletes between two vacuums of the outbox: bounds its dead rows to about this
many per relay; one vacuum of that many (1.3 KB lab bodies) took PostgreSQL 6-8 ms here."""


class AckCollector:
    """JetStream acknowledgements of a batch of publishes, read from one inbox subscription.

    Each publish of batch ``b`` asks for its reply on ``<inbox>.<b>.<i>``; :meth:`publish` sends
    the batch, then takes replies off the subscription's queue until every one of the batch
    arrived or ``timeout`` ran out. A late reply of an earlier (timed-out) batch is ignored: its
    row was kept and goes out again, which ``Nats-Msg-Id`` makes harmless.
    """

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._inbox = ""
        self._subscription: Subscription | None = None
        self._batch = 0

    async def publish(self, messages: Sequence[tuple[str, bytes, str]], timeout: float) -> list[int | BaseException]:
        """Publish ``(subject, body, msg_id)`` each; per message the stream sequence JetStream
        stored it at, or the error."""
        if self._subscription is None:
            self._inbox = self.nc.new_inbox()
            self._subscription = await self.nc.subscribe(f"{self._inbox}.>")
        self._batch += 1
        reply = f"{self._inbox}.{self._batch}."
        for index, (subject, body, msg_id) in enumerate(messages):
            await self.nc.publish(subject, body, reply=f"{reply}{index}", headers={"Nats-Msg-Id": msg_id})
        outcome: list[int | BaseException] = [_NOT_ACKNOWLEDGED] * len(messages)
        missing = len(messages)
        deadline = time.monotonic() + timeout
        while missing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                msg = await self._subscription.next_msg(timeout=remaining)
            except nats.errors.TimeoutError:
                break
            batch, _, index = msg.subject[len(self._inbox) + 1 :].partition(".")
            if batch != str(self._batch) or not index.isdigit() or int(index) >= len(messages):
                continue
            position = int(index)
            if outcome[position] is _NOT_ACKNOWLEDGED:
                missing -= 1
            outcome[position] = _acknowledged(msg)
        return outcome


_NOT_ACKNOWLEDGED = TimeoutError("no acknowledgement from JetStream in time")
_SEQ = re.compile(rb'"seq"\s*:\s*(\d+)')


def _acknowledged(msg: Msg) -> int | BaseException:
    """The stream sequence of a JetStream PubAck, else the error the reply carries."""
    if msg.headers and msg.headers.get("Status") == "503":
        return nats.js.errors.NoStreamResponseError()
    found = _SEQ.search(msg.data) if b'"error"' not in msg.data else None
    if found:
        return int(found.group(1))
    try:
        nats.js.errors.APIError.from_error(json.loads(msg.data)["error"])  # raises the error's class
    except nats.js.errors.APIError as refusal:
        return refusal
    except (ValueError, KeyError, TypeError):
        pass
    return nats.js.errors.APIError(description=msg.data[:200].decode(errors="replace"))


class OutboxRelay:
    def __init__(
        self,
        store: EventStore,
        nc: NATS,
        *,
        batch_size: int = 500,
        idle_seconds: float = 0.05,
        ack_timeout: float = 10.0,
        vacuum_every: int = VACUUM_EVERY_ROWS,
    ) -> None:
        if not isinstance(store, SqlEventStore):  # the in-memory store: its outbox is for tests to read
            raise TypeError(f"the outbox relay publishes a SQL store's outbox table; {type(store).__name__} has none")
        self.store = store
        self.acks = AckCollector(nc)
        self.batch_size = batch_size
        self.idle_seconds = idle_seconds
        self.ack_timeout = ack_timeout
        self.vacuum_every = vacuum_every
        self.wakeup = asyncio.Event()
        self._observed_at = 0.0
        self._deleted_since_vacuum = 0

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
                await woken(self.wakeup, backoff)

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
            self._deleted_since_vacuum += len(acked)
            if self._deleted_since_vacuum >= self.vacuum_every:
                await self.vacuum()
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
        results = await self.acks.publish(
            [(row.subject, row.body, str(row.event_id)) for row in rows], self.ack_timeout
        )
        acked = [row for row, result in zip(rows, results, strict=True) if not isinstance(result, BaseException)]
        failed = [result for result in results if isinstance(result, BaseException)]
        if failed:  # those rows stay for the next round
            metrics.PUBLISH_FAILURES.inc(len(failed))
            log.warning("outbox messages not acknowledged", failed=len(failed), error=repr(failed[0]))
        for row in acked:
            metrics.EVENTS_PUBLISHED.labels(subject_prefix=row.subject.rsplit(".", 1)[0]).inc()
        return acked

    async def _delete(self, connection: AsyncConnection, acked: Sequence[Row[Any]]) -> None:
        """Delete the acknowledged rows, matched on their id *and* their event id: SQLite numbers
        a new row one above the largest id left (1 in an empty table), so once another relay
        sharing the database (two replicas of a service) has emptied the outbox, a row committed
        meanwhile takes an id this relay is about to delete — by id alone, an event never
        published."""
        if acked:
            ids = [row.id for row in acked]
            event_ids = [row.event_id for row in acked]
            await connection.execute(delete(outbox).where(
                self.store.one_of(outbox.c.id, ids), self.store.one_of(outbox.c.event_id, event_ids)))
        await self._observe_backlog(connection)

    async def vacuum(self) -> None:
        """Give the outbox's dead rows back (PostgreSQL; see the module doc). Outside any
        transaction, as VACUUM must be; a failure is logged, never the relay's failure (and a
        database user that does not own the table only gets PostgreSQL's warning)."""
        self._deleted_since_vacuum = 0
        started = time.perf_counter()
        try:
            async with self.store.engine.connect() as connection:
                raw = await connection.get_raw_connection()
                await raw.driver_connection.execute(f"VACUUM (SKIP_LOCKED) {outbox.name}")  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - the rows stay; the next vacuum may succeed
            log.warning("outbox vacuum failed", error=repr(exc))
            return
        metrics.OUTBOX_VACUUM_SECONDS.observe(time.perf_counter() - started)

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
            metrics.OUTBOX_OLDEST_AGE.set((datetime.now(UTC) - as_utc(oldest)).total_seconds())
