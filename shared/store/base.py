"""The event store's interface, which every backend implements alike.

A service's event store is an append-only log in its own database, with an outbox and an inbox.
Writes go through a :class:`UnitOfWork` (one transaction). In it a service appends events with
optimistic concurrency, and the same transaction writes the outbox rows the relay will publish,
the inbox rows that make a message handler idempotent, checkpoints, the shared registers
(:mod:`shared.store.registers`) and any rows of the service's own. Either all of it commits or
none of it does; callbacks registered with :meth:`UnitOfWork.on_commit` run once it committed.

Backends: PostgreSQL (:mod:`shared.store.postgres`) and SQLite (:mod:`shared.store.sqlite`),
each with its dialect code over what they share (:mod:`shared.store.sql`), and a plain-Python
store in memory (:mod:`shared.store.memory`) for tests that need no server.
:func:`shared.store.open_store` picks one from a URL. The interface is defined by behaviour as
much as by methods: one conformance suite (tests/foundation/test_event_store.py) runs on all
three, as pyeventsourcing runs one test case on each of its recorders.

Global order: ``read_all`` lets a follower (a projection, a rebuild) walk every event once, in
order, resuming from a saved :class:`Position` ``(tx_id, seq)``, and never skip an event that
commits late. On SQLite and in memory one writer commits at a time, so ``tx_id`` is 0 and the
order is ``seq``; PostgreSQL's concurrent writers need a read horizon (its module explains it).
"""

from __future__ import annotations

import asyncio
import random
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol, TypeVar

import pydantic_core
import structlog

from shared import metrics
from shared.errors import Conflict
from shared.events import CommandContext, DomainEvent, Envelope, EventRef, Payload, utcnow
from shared.moments import as_utc
from shared.store.registers import ErasedRegister, PatientRegister

log = structlog.get_logger(__name__)

T = TypeVar("T")


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

    def mark_erased(self, subject_id: str) -> None: ...


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

    def mark_erased(self, subject_id: str) -> None:
        return None


JSON_CODEC = JsonCodec()


@dataclass(frozen=True, slots=True)
class StoredEvent:
    position: Position
    envelope: Envelope


Work = Callable[["UnitOfWork"], Awaitable[T]]


class EventStore(ABC):
    """A service's event store. ``subject_for`` names the broker subject of an event (or None
    for events that stay private to the service); those events get an outbox row.

    Rows, as backends hand them to this class, have the attributes of ``shared.schema.events``
    (``position``, ``tx_id``, ``event_id``, …, ``payload`` as the codec's bytes)."""

    def __init__(
        self, *, subject_for: Callable[[Envelope], str | None] | None = None, codec: Codec | None = None
    ) -> None:
        self.codec: Codec = codec or JSON_CODEC
        self.subject_for = subject_for or (lambda envelope: None)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[UnitOfWork]:
        """One unit of work: commits when the block ends, rolls back when it raises; the
        callbacks it was given (:meth:`UnitOfWork.on_commit`) run once it committed."""
        async with self._begin() as uow:
            yield uow
        uow._run_commit_callbacks()

    async def transact(self, work: Work[T], *, retries: int = 10) -> T:
        """Run ``work(uow)`` in one unit of work and return what it returns.

        A concurrent writer that got there first (ConcurrencyError) makes it run again, after a
        short random pause, on what is recorded now: no write is lost and no rule decided on a
        stale history. A conflict that outlasts ``retries`` runs is the caller's to retry:
        :class:`shared.errors.Conflict` (HTTP 409).
        """
        attempts = max(retries, 1)
        for attempt in range(1, attempts + 1):
            try:
                async with self.transaction() as uow:
                    return await work(uow)
            except ConcurrencyError as error:
                if attempt == attempts:
                    raise Conflict(f"stream {error.stream_id} is being changed concurrently; try again") from error
                await asyncio.sleep(random.uniform(0.001, 0.01))  # so writers that collided do not collide in step

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
        return await self.decoded(await self._stream_rows(stream_id))

    async def read_all(
        self, after: Position = START, *, batch_size: int = 1000, limit: int | None = None
    ) -> AsyncIterator[StoredEvent]:
        """Every event after ``after`` in commit-safe order, fetched ``batch_size`` rows at a
        time (memory stays flat however long the log). Stops at the current safe horizon."""
        remaining = limit
        while remaining is None or remaining > 0:
            size = batch_size if remaining is None else min(batch_size, remaining)
            rows = await self._rows_after(after, size)
            await self.codec.prepare(stored=(row.payload for row in rows))
            for row in rows:
                yield StoredEvent(Position(row.tx_id, row.position), self.envelope(row))
            if len(rows) < size:
                return
            after = Position(rows[-1].tx_id, rows[-1].position)
            if remaining is not None:
                remaining -= len(rows)

    @abstractmethod
    async def head(self) -> Position:
        """The position of the newest event currently visible (for lag and freshness)."""

    @abstractmethod
    async def ping(self) -> None:
        """Return when the backend answers; raise its error when it does not."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections (the store is not used again)."""

    @abstractmethod
    def _begin(self) -> AbstractAsyncContextManager[UnitOfWork]:
        """A unit of work that commits when the block ends and rolls back when it raises."""

    @abstractmethod
    async def _stream_rows(self, stream_id: str) -> Sequence[Any]:
        """The stream's committed rows, by version."""

    @abstractmethod
    async def _rows_after(self, after: Position, size: int) -> Sequence[Any]:
        """Up to ``size`` committed rows after ``after``, in commit-safe order, below the horizon."""

    async def decoded(self, rows: Sequence[Any]) -> list[Envelope]:
        """Rows as envelopes; the codec is prepared for the batch first (it may fetch keys)."""
        await self.codec.prepare(stored=(row.payload for row in rows))
        return [self.envelope(row) for row in rows]

    def envelope(self, row: Any) -> Envelope:
        return Envelope.from_store(
            {
                "event_id": row.event_id,
                "event_type": row.event_type,
                "schema_version": row.schema_version,
                "stream_id": row.stream_id,
                "stream_version": row.stream_version,
                "occurred_at": as_utc(row.occurred_at),
                "recorded_at": as_utc(row.recorded_at),
                "correlation_id": row.correlation_id,
                "causation_id": row.causation_id,
                "actor": row.actor,
                "payload": self.codec.decode(EventRef(row.event_id, row.event_type, row.stream_id), row.payload),
            }
        )


class UnitOfWork(ABC):
    """One transaction of a service: appends, outbox, inbox, checkpoints and the registers
    (``patients``, ``erased``) it shares with every service."""

    patients: PatientRegister
    erased: ErasedRegister

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self._commit_callbacks: list[Callable[[], None]] = []

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once this unit of work has committed, never on rollback: effects
        outside the store (metrics, waking a worker, deleting broker messages) happen only for
        what was really recorded, even when a batch fails and is retried message by message."""
        self._commit_callbacks.append(callback)

    def _run_commit_callbacks(self) -> None:
        """Every callback runs; one that fails is logged, never the committed work's failure."""
        for callback in self._commit_callbacks:
            try:
                callback()
            except Exception as error:  # noqa: BLE001 - the transaction has committed: nothing to undo
                name = getattr(callback, "__name__", "?")
                log.error("after-commit callback failed", callback=name, error=repr(error))

    async def read_stream(self, stream_id: str) -> list[Envelope]:
        return await self.store.decoded(await self._stream_rows(stream_id))

    async def read_streams(self, stream_ids: Sequence[str]) -> dict[str, list[Envelope]]:
        """Several streams at once (batch handlers: one round trip per 500 ids, not N)."""
        found: dict[str, list[Envelope]] = {stream_id: [] for stream_id in stream_ids}
        rows = await self._rows_of_streams(list(found))
        for row, envelope in zip(rows, await self.store.decoded(rows), strict=True):
            found[row.stream_id].append(envelope)
        return found

    @abstractmethod
    async def stream_version(self, stream_id: str) -> int:
        """The stream's newest version as this unit of work sees it (0: no such stream)."""

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
        envelopes = [
            Envelope.wrap(event, stream_id=stream_id, stream_version=expected_version + i, context=context)
            for i, event in enumerate(new_events, start=1)
        ]
        await self._write(envelopes, expected=(stream_id, expected_version))
        return envelopes

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

    async def append_envelopes(self, envelopes: Sequence[Envelope]) -> None:
        """Insert prepared envelopes (and their outbox rows) as they are."""
        await self._write(envelopes, expected=None)

    async def _write(self, envelopes: Sequence[Envelope], expected: tuple[str, int] | None) -> None:
        store = self.store
        await store.codec.prepare(payloads=((envelope.stream_id, envelope.payload) for envelope in envelopes))
        rows = [_event_row(envelope, store.codec) for envelope in envelopes]
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
        await self._insert(rows, outgoing, expected)
        for event_type, count in Counter(envelope.event_type for envelope in envelopes).items():
            metrics.EVENTS_APPENDED.labels(event_type=event_type).inc(count)

    async def claim_messages(self, consumer: str, message_ids: Sequence[str]) -> list[str]:
        """Record that ``consumer`` handles these messages in this transaction; return the ids
        not handled before (first occurrence, in order), which the caller then handles.

        Because the inbox rows commit with the handler's own writes, a crash can never leave a
        message half-handled, and a redelivered message is never handled twice, even when two
        transactions hold a copy of it at once.
        """
        unique = list(dict.fromkeys(message_ids))
        claimed = await self._claim_unclaimed(consumer, unique, datetime.now(UTC))
        return [message_id for message_id in unique if message_id in claimed]

    @abstractmethod
    async def checkpoint(self, name: str) -> Position:
        """The position saved under ``name`` (START when none is)."""

    @abstractmethod
    async def save_checkpoint(self, name: str, position: Position) -> None: ...

    @abstractmethod
    async def _stream_rows(self, stream_id: str) -> Sequence[Any]:
        """The stream's rows by version, as this unit of work sees them."""

    @abstractmethod
    async def _rows_of_streams(self, stream_ids: Sequence[str]) -> Sequence[Any]:
        """The streams' rows by stream, then version, as this unit of work sees them."""

    async def _insert(
        self, rows: list[dict[str, Any]], outgoing: list[dict[str, Any]], expected: tuple[str, int] | None
    ) -> None:
        """Write event rows and their outbox rows; with ``expected`` — (stream, version) — only
        if that stream's newest version is that one, else raise ConcurrencyError. A backend that
        can do all of it in one statement overrides this (:mod:`shared.store.postgres`)."""
        if expected is not None:
            stream_id, expected_version = expected
            actual = await self.stream_version(stream_id)
            if actual != expected_version:
                raise ConcurrencyError(stream_id, expected_version, actual)
        await self._insert_events(rows)
        await self._insert_outbox(outgoing)

    @abstractmethod
    async def _insert_events(self, rows: list[dict[str, Any]]) -> None:
        """Write event rows; raise ConcurrencyError when a (stream, version) or an event id is
        taken, writing none of them."""

    @abstractmethod
    async def _insert_outbox(self, rows: list[dict[str, Any]]) -> None: ...

    @abstractmethod
    async def _claim_unclaimed(self, consumer: str, message_ids: Sequence[str], at: datetime) -> set[str]:
        """Claim for ``consumer`` those of these (distinct) ids nobody claimed, and return them.

        Atomic against a concurrent claim of the same id (another pull loop or replica whose
        batch holds a second copy of a message): the claim waits for that transaction and then
        claims the id only if it rolled back — never a constraint error that fails the batch."""


def _event_row(envelope: Envelope, codec: Codec) -> dict[str, Any]:
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
        "payload": codec.encode(envelope.ref, envelope.payload),
    }

