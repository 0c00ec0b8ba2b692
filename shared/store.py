"""The event store: an append-only log per service database, with an outbox and an inbox.

Writes go through a :class:`UnitOfWork` (one database transaction). In it a service appends
events with optimistic concurrency, and the same transaction writes the outbox rows the relay
will publish, the inbox row that makes a message handler idempotent, and any projection rows.
Either all of it commits or none of it does.

Global order and the sequence-gap problem
-----------------------------------------
``read_all`` lets a follower (a projection, a rebuild) walk every event of the store once, in
order, resuming from a saved position. On PostgreSQL the naive order ``ORDER BY position`` is
unsafe: positions come from a sequence when a row is *inserted*, but rows become visible when
their transaction *commits*. Writer T1 takes position 10, writer T2 takes 11 and commits first;
a follower that reads 11 and checkpoints it will never see 10 when T1 commits a moment later.

The known simple cure is a table lock that serialises every writer (pyeventsourcing's). Here the
default is lock-free instead (``GapStrategy.XMIN``): every row also records the id of the
transaction that wrote it (``pg_current_xact_id()``), and followers read in *commit-safe* order
``(tx_id, position)`` and only rows whose ``tx_id`` is below the snapshot's ``xmin`` — the
oldest transaction still in flight. No transaction below ``xmin`` can still be running, and no
new transaction ever gets an id below it, so the set of rows below the horizon is final: a
follower never skips a late commit, and writers never wait for each other. The price is that a
long-running transaction anywhere in the PostgreSQL cluster holds the horizon back (followers
lag, nothing is lost). The position of an event is therefore the pair :class:`Position`
``(tx_id, seq)``; on SQLite, whose writers are serialised by the database itself, ``tx_id`` is
always 0 and the order is simply ``seq``. ``GapStrategy.TABLE_LOCK`` keeps the classic answer
for comparison (see ``bench/``).
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

import asyncpg
import pydantic_core
from sqlalchemy import Table, and_, func, insert, literal, select, text, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared import metrics
from shared.database import one_of
from shared.events import CommandContext, DomainEvent, Envelope, EventRef, Payload, utcnow
from shared.schema import checkpoints, events, inbox, outbox


class ConcurrencyError(Exception):
    """The stream moved on since it was read: another writer appended first. Nothing was written."""

    def __init__(self, stream_id: str, expected: int, actual: int | None = None) -> None:
        detail = f"stream {stream_id!r} expected at version {expected}"
        if actual is not None:
            detail += f", found {actual}"
        super().__init__(detail)
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class GapStrategy(StrEnum):
    XMIN = "xmin"
    TABLE_LOCK = "table_lock"


class Position(NamedTuple):
    """Commit-safe global position: (writer transaction id, sequence). Compare as a tuple."""

    tx_id: int = 0
    seq: int = 0


START = Position(0, 0)


class Codec(Protocol):
    """Turns a payload into stored bytes and back; per event, so a payload can be encrypted
    with its patient's key and bound to its event (crypto-shredding) without any caller knowing.
    It also writes the broker body of an event (``wire``) and reads one (``open``), so a payload
    sealed in the store stays sealed on the broker (:mod:`shared.sealing`). ``encode``/``decode``
    are synchronous (they run row by row); ``prepare`` runs before a batch of them and may do
    I/O (fetch keys)."""

    def encode(self, event: EventRef, payload: Payload) -> bytes: ...

    def decode(self, event: EventRef, data: bytes) -> Payload: ...

    def plaintext(self, event: EventRef, stored: bytes) -> bytes:
        """The payload's JSON from stored bytes (opened, when sealed): ``decode`` without the
        parsing, for a reader that validates the JSON itself (the outcomes projection)."""
        ...

    def wire(self, envelope: Envelope, stored: bytes) -> bytes: ...

    def open(self, body: bytes) -> Envelope: ...

    async def prepare(self, *, payloads: Iterable[tuple[str, Payload]] = (), stored: Iterable[bytes] = ()) -> None: ...

    def is_erased(self, subject_id: str) -> bool: ...

    def forget(self, subject_id: str) -> None: ...


class JsonCodec:
    """Payloads as compact JSON, through pydantic-core's Rust serializer (several times faster
    than the standard library's, which showed in the labs profile); keys keep the order of the
    event model's fields."""

    def encode(self, event: EventRef, payload: Payload) -> bytes:
        return pydantic_core.to_json(payload, inf_nan_mode="constants")

    def decode(self, event: EventRef, data: bytes) -> Payload:
        return pydantic_core.from_json(data)

    def plaintext(self, event: EventRef, stored: bytes) -> bytes:
        return stored

    def wire(self, envelope: Envelope, stored: bytes) -> bytes:
        return envelope.model_dump_json().encode()

    def open(self, body: bytes) -> Envelope:
        return Envelope.model_validate_json(body)

    async def prepare(self, *, payloads: Iterable[tuple[str, Payload]] = (), stored: Iterable[bytes] = ()) -> None:
        return None

    def is_erased(self, subject_id: str) -> bool:
        return False

    def forget(self, subject_id: str) -> None:
        return None


JSON_CODEC = JsonCodec()


@dataclass(frozen=True)
class StoredEvent:
    position: Position
    envelope: Envelope


class EventStore:
    """A service's event store. ``subject_for`` names the broker subject of an event (or None
    for events that stay private to the service); those events get an outbox row."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        subject_for: Callable[[Envelope], str | None] | None = None,
        codec: Codec | None = None,
        gap_strategy: GapStrategy = GapStrategy.XMIN,
    ) -> None:
        self.engine = engine
        self.codec: Codec = codec or JSON_CODEC
        self.subject_for = subject_for or (lambda envelope: None)
        self.gap_strategy = gap_strategy
        self.is_postgres = engine.dialect.name == "postgresql"

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[UnitOfWork]:
        async with self.engine.begin() as connection:
            yield UnitOfWork(self, connection)

    async def append(
        self,
        stream_id: str,
        new_events: Sequence[DomainEvent],
        expected_version: int,
        context: CommandContext | None = None,
    ) -> list[Envelope]:
        async with self.transaction() as uow:
            return await uow.append(stream_id, new_events, expected_version, context)

    async def read_stream(self, stream_id: str) -> list[Envelope]:
        async with self.engine.connect() as connection:
            return await _read_stream(self, connection, stream_id)

    async def read_all(
        self, after: Position = START, *, batch_size: int = 1000, limit: int | None = None
    ) -> AsyncIterator[StoredEvent]:
        """Every event after ``after`` in commit-safe order, fetched ``batch_size`` rows at a
        time (memory stays flat however long the log). Stops at the current safe horizon."""
        remaining = limit
        while remaining is None or remaining > 0:
            size = batch_size if remaining is None else min(batch_size, remaining)
            async with self.engine.connect() as connection:
                rows = (await connection.execute(self._read_all_query(after, size))).all()
            await self.codec.prepare(stored=(row.payload for row in rows))
            for row in rows:
                stored = StoredEvent(Position(row.tx_id, row.position), self._envelope(row))
                yield stored
            if len(rows) < size:
                return
            after = Position(rows[-1].tx_id, rows[-1].position)
            if remaining is not None:
                remaining -= len(rows)

    def _read_all_query(self, after: Position, size: int) -> Any:
        condition = tuple_(events.c.tx_id, events.c.position) > tuple_(literal(after.tx_id), literal(after.seq))
        if self.is_postgres:
            horizon = text("pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
            condition = and_(condition, events.c.tx_id < horizon)
        return select(events).where(condition).order_by(events.c.tx_id, events.c.position).limit(size)

    async def head(self) -> Position:
        """The position of the newest event currently visible (for lag and freshness)."""
        async with self.engine.connect() as connection:
            row = (
                await connection.execute(
                    select(events.c.tx_id, events.c.position)
                    .order_by(events.c.tx_id.desc(), events.c.position.desc())
                    .limit(1)
                )
            ).first()
        return Position(row.tx_id, row.position) if row else START

    async def ping(self) -> None:
        async with self.engine.connect() as connection:
            await connection.execute(select(literal(1)))

    def _envelope(self, row: Any) -> Envelope:
        return Envelope(
            event_id=row.event_id,
            event_type=row.event_type,
            schema_version=row.schema_version,
            stream_id=row.stream_id,
            stream_version=row.stream_version,
            occurred_at=_aware(row.occurred_at),
            recorded_at=_aware(row.recorded_at),
            correlation_id=row.correlation_id,
            causation_id=row.causation_id,
            actor=row.actor,
            payload=self.codec.decode(EventRef(row.event_id, row.event_type, row.stream_id), row.payload),
        )


class UnitOfWork:
    """One database transaction of a service: appends, outbox, inbox and projection writes."""

    def __init__(self, store: EventStore, connection: AsyncConnection) -> None:
        self.store = store
        self.connection = connection
        self._tx_id: int | None = None

    async def read_stream(self, stream_id: str) -> list[Envelope]:
        return await _read_stream(self.store, self.connection, stream_id)

    async def read_streams(self, stream_ids: Sequence[str]) -> dict[str, list[Envelope]]:
        """Several streams in one query per 500 ids (batch handlers: one round trip, not N)."""
        found: dict[str, list[Envelope]] = {stream_id: [] for stream_id in stream_ids}
        for chunk in _chunks(list(found), 500):
            rows = (
                await self.connection.execute(
                    select(events)
                    .where(one_of(events.c.stream_id, chunk, postgres=self.store.is_postgres))
                    .order_by(events.c.stream_id, events.c.stream_version)
                )
            ).all()
            await self.store.codec.prepare(stored=(row.payload for row in rows))
            for row in rows:
                found[row.stream_id].append(self.store._envelope(row))
        return found

    async def append_many(
        self, appends: Sequence[tuple[str, Sequence[DomainEvent], int]], context: CommandContext | None = None
    ) -> list[Envelope]:
        """Append to several streams at once: ``(stream_id, events, expected_version)`` each.

        The expected versions come from the caller's own read in this transaction (e.g.
        :meth:`read_streams`); a concurrent writer that got there first makes the unique
        (stream, version) constraint fail and the whole transaction raise ConcurrencyError.
        """
        context = context or CommandContext()
        now = utcnow()
        envelopes = [
            Envelope.wrap(event, stream_id=stream_id, stream_version=expected + i, context=context, recorded_at=now)
            for stream_id, new_events, expected in appends
            for i, event in enumerate(new_events, start=1)
        ]
        if envelopes:
            await self.append_envelopes(envelopes)
        return envelopes

    async def stream_version(self, stream_id: str) -> int:
        value = await self.connection.scalar(
            select(func.max(events.c.stream_version)).where(events.c.stream_id == stream_id)
        )
        return value or 0

    async def append(
        self,
        stream_id: str,
        new_events: Sequence[DomainEvent],
        expected_version: int,
        context: CommandContext | None = None,
    ) -> list[Envelope]:
        """Append after ``expected_version`` (0 for a new stream) or raise ConcurrencyError.

        The version check reads the stream's head, and the unique (stream_id, stream_version)
        constraint catches the writer that raced past the check: exactly one of two concurrent
        writers wins each version.
        """
        if not new_events:
            return []
        context = context or CommandContext()
        actual = await self.stream_version(stream_id)
        if actual != expected_version:
            raise ConcurrencyError(stream_id, expected_version, actual)
        envelopes = [
            Envelope.wrap(event, stream_id=stream_id, stream_version=expected_version + i, context=context)
            for i, event in enumerate(new_events, start=1)
        ]
        await self.append_envelopes(envelopes)
        return envelopes

    async def append_envelopes(self, envelopes: Sequence[Envelope]) -> None:
        """Insert prepared envelopes (and their outbox rows) as they are."""
        store = self.store
        if store.is_postgres and store.gap_strategy is GapStrategy.TABLE_LOCK:
            await self.connection.execute(text("LOCK TABLE events IN EXCLUSIVE MODE"))
        await store.codec.prepare(payloads=((envelope.stream_id, envelope.payload) for envelope in envelopes))
        rows = [self._event_row(envelope) for envelope in envelopes]
        if store.is_postgres and store.gap_strategy is GapStrategy.XMIN:
            tx_id = await self.transaction_id()
            for row in rows:
                row["tx_id"] = tx_id
        try:
            await self.insert_rows(events, rows)
        except (IntegrityError, asyncpg.IntegrityConstraintViolationError) as exc:
            first = envelopes[0]
            raise ConcurrencyError(first.stream_id, first.stream_version - 1) from exc
        outgoing = []
        for envelope, row in zip(envelopes, rows, strict=True):
            subject = store.subject_for(envelope)
            if subject:
                outgoing.append(
                    {
                        "event_id": envelope.event_id,
                        "subject": subject,
                        "body": store.codec.wire(envelope, row["payload"]),
                        "created_at": envelope.recorded_at,
                    }
                )
        await self.insert_rows(outbox, outgoing)
        for event_type, count in Counter(envelope.event_type for envelope in envelopes).items():
            metrics.EVENTS_APPENDED.labels(event_type=event_type).inc(count)

    async def transaction_id(self) -> int:
        """This transaction's PostgreSQL id (``pg_current_xact_id()``), asked once. Asking through
        SQLAlchemy also begins the driver's transaction, which :meth:`insert_rows` relies on."""
        if self._tx_id is None:
            self._tx_id = int(await self.connection.scalar(_CURRENT_XACT_ID_QUERY))
        return self._tx_id

    async def insert_rows(self, table: Table, rows: Sequence[dict[str, Any]]) -> None:
        """Insert many rows of one shape (the keys of the first) in this transaction.

        On PostgreSQL through ``COPY`` on the transaction's own asyncpg connection: for the
        hundreds of rows of a lab batch, SQLAlchemy's executemany spent more CPU binding each
        row's parameters than the database spent storing them (profile in docs/labs.md#throughput).
        Constraint violations raise ``asyncpg.IntegrityConstraintViolationError``."""
        if not rows:
            return
        if not self.store.is_postgres:
            await self.connection.execute(insert(table), rows)
            return
        await self.transaction_id()  # the driver's transaction has begun: COPY runs inside it
        columns = list(rows[0])
        record = operator.itemgetter(*columns) if len(columns) > 1 else lambda row: (row[columns[0]],)
        raw = await self.connection.get_raw_connection()
        await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
            table.name, records=[record(row) for row in rows], columns=columns
        )

    def _event_row(self, envelope: Envelope) -> dict[str, Any]:
        return {
            "event_id": envelope.event_id,
            "stream_id": envelope.stream_id,
            "stream_version": envelope.stream_version,
            "event_type": envelope.event_type,
            "schema_version": envelope.schema_version,
            "occurred_at": envelope.occurred_at,
            "recorded_at": envelope.recorded_at,
            "correlation_id": envelope.correlation_id,
            "causation_id": envelope.causation_id,
            "actor": envelope.actor,
            "payload": self.store.codec.encode(envelope.ref, envelope.payload),
        }

    async def claim_messages(self, consumer: str, message_ids: Sequence[str]) -> list[str]:
        """Record that ``consumer`` handles these messages in this transaction; return the ids
        not handled before (first occurrence, in order), which the caller then handles.

        Because the inbox rows commit with the handler's own writes, a crash can never leave a
        message half-handled, and a redelivered message is never handled twice.
        """
        unique = list(dict.fromkeys(message_ids))
        seen: set[str] = set()
        for chunk in _chunks(unique, 500):
            rows = await self.connection.execute(
                select(inbox.c.message_id).where(
                    inbox.c.consumer == consumer, one_of(inbox.c.message_id, chunk, postgres=self.store.is_postgres)
                )
            )
            seen.update(rows.scalars())
        fresh = [message_id for message_id in unique if message_id not in seen]
        now = datetime.now(UTC)
        await self.insert_rows(inbox, [{"consumer": consumer, "message_id": m, "processed_at": now} for m in fresh])
        return fresh

    async def checkpoint(self, name: str) -> Position:
        row = (await self.connection.execute(select(checkpoints).where(checkpoints.c.name == name))).first()
        return Position(row.tx_id, row.position) if row else START

    async def save_checkpoint(self, name: str, position: Position) -> None:
        now = datetime.now(UTC)
        updated = await self.connection.execute(
            checkpoints.update()
            .where(checkpoints.c.name == name)
            .values(tx_id=position.tx_id, position=position.seq, updated_at=now)
        )
        if updated.rowcount == 0:
            await self.connection.execute(
                insert(checkpoints).values(name=name, tx_id=position.tx_id, position=position.seq, updated_at=now)
            )


async def _read_stream(store: EventStore, connection: AsyncConnection, stream_id: str) -> list[Envelope]:
    rows = (
        await connection.execute(select(events).where(events.c.stream_id == stream_id).order_by(events.c.stream_version))
    ).all()
    await store.codec.prepare(stored=(row.payload for row in rows))
    return [store._envelope(row) for row in rows]


_CURRENT_XACT_ID_QUERY = text("SELECT pg_current_xact_id()::text::bigint")


def _chunks(items: Sequence[str], size: int) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)
