"""The event store in plain Python objects (pyeventsourcing's "POPO" recorder): lists and dicts
in this process, gone when it ends.

What it is for: handlers and rules tested in milliseconds, without a database server, through
the same interface and the same conformance suite (tests/foundation/test_event_store.py) as
PostgreSQL and SQLite. It behaves as they do wherever that suite can tell: one writer at a time
(a lock held for the whole unit of work, as SQLite's ``BEGIN IMMEDIATE``), writes staged in the
unit of work and applied on commit only (a failed one leaves nothing), a taken (stream, version)
raising ConcurrencyError, the same inbox claims, checkpoints and registers, ``read_all`` in
commit order at ``Position(0, seq)``, and the store's codec on every payload (so sealing works).

What it has not: an outbox relay. The outbox rows are kept (``tables.outbox``, oldest first)
for a test to read what would be published, but nothing publishes them and nothing leaves the
process. The relay, the audit trail and the statistics keeper are SQL-only (they take a store's
``engine``, which only SQL stores have).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from uuid import UUID

from shared.events import Envelope
from shared.store.base import START, Codec, ConcurrencyError, EventStore, Position, UnitOfWork
from shared.store.registers import EnrolledPatient, ErasedRegister, PatientRegister


@dataclass(frozen=True)
class EventRecord:
    """One stored event, with the attributes of a row of the SQL ``events`` table."""

    position: int
    tx_id: int
    event_id: UUID
    stream_id: str
    stream_version: int
    event_type: str
    schema_version: int
    occurred_at: datetime
    recorded_at: datetime
    correlation_id: UUID
    causation_id: UUID | None
    actor: str
    payload: bytes


@dataclass(frozen=True)
class OutboxRecord:
    id: int
    event_id: UUID
    subject: str
    body: bytes
    created_at: datetime


@dataclass
class MemoryTables:
    """What the SQL stores keep in their tables, as committed."""

    events: list[EventRecord] = field(default_factory=list)
    """In position order: position ``n`` is ``events[n - 1]``."""
    streams: dict[str, dict[int, int]] = field(default_factory=dict)
    """Stream id → version → index in ``events``."""
    event_ids: set[UUID] = field(default_factory=set)
    outbox: list[OutboxRecord] = field(default_factory=list)
    inbox: set[tuple[str, str]] = field(default_factory=set)
    checkpoints: dict[str, Position] = field(default_factory=dict)
    patients: dict[str, EnrolledPatient] = field(default_factory=dict)
    erased: dict[str, datetime] = field(default_factory=dict)


class MemoryEventStore(EventStore):
    def __init__(
        self, *, subject_for: Callable[[Envelope], str | None] | None = None, codec: Codec | None = None
    ) -> None:
        super().__init__(subject_for=subject_for, codec=codec)
        self.tables = MemoryTables()
        self._writer = asyncio.Lock()

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[MemoryUnitOfWork]:
        async with self._writer:
            uow = MemoryUnitOfWork(self)
            yield uow
            uow._apply()

    async def _stream_rows(self, stream_id: str) -> Sequence[Any]:
        return self._committed_stream(stream_id)

    def _committed_stream(self, stream_id: str) -> list[EventRecord]:
        versions = self.tables.streams.get(stream_id, {})
        return [self.tables.events[versions[version]] for version in sorted(versions)]

    async def _rows_after(self, after: Position, size: int) -> Sequence[Any]:
        return self.tables.events[after.seq : after.seq + size]

    async def head(self) -> Position:
        return Position(0, len(self.tables.events)) if self.tables.events else START

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


class MemoryUnitOfWork(UnitOfWork):
    """Writes staged here, applied to the store's tables by :meth:`_apply` on commit; reads see
    the committed tables with this unit of work's own writes on top, as a transaction does."""

    store: MemoryEventStore

    def __init__(self, store: MemoryEventStore) -> None:
        super().__init__(store)
        self.tables = store.tables
        self._events: list[EventRecord] = []
        self._outbox: list[dict[str, Any]] = []
        self._claims: set[tuple[str, str]] = set()
        self._checkpoints: dict[str, Position] = {}
        self.patients = MemoryPatients(store.tables.patients)
        self.erased = MemoryErased(store.tables.erased)

    async def _stream_rows(self, stream_id: str) -> Sequence[Any]:
        staged = [record for record in self._events if record.stream_id == stream_id]
        return self.store._committed_stream(stream_id) + sorted(staged, key=lambda record: record.stream_version)

    async def _rows_of_streams(self, stream_ids: Sequence[str]) -> Sequence[Any]:
        return [row for stream_id in sorted(stream_ids) for row in await self._stream_rows(stream_id)]

    async def stream_version(self, stream_id: str) -> int:
        staged = [record.stream_version for record in self._events if record.stream_id == stream_id]
        return max([*self.tables.streams.get(stream_id, {}), *staged], default=0)

    async def _insert_events(self, rows: list[dict[str, Any]]) -> None:
        records = [EventRecord(position=0, tx_id=0, **row) for row in rows]
        keys = [(record.stream_id, record.stream_version) for record in records]
        ids = [record.event_id for record in records]
        staged_keys = {(record.stream_id, record.stream_version) for record in self._events}
        staged_ids = {record.event_id for record in self._events}
        clash = (
            len(set(keys)) < len(keys)
            or len(set(ids)) < len(ids)
            or any(key in staged_keys or key[1] in self.tables.streams.get(key[0], {}) for key in keys)
            or any(event_id in staged_ids or event_id in self.tables.event_ids for event_id in ids)
        )
        if clash:
            raise ConcurrencyError(records[0].stream_id, records[0].stream_version - 1)
        self._events.extend(records)

    async def _insert_outbox(self, rows: list[dict[str, Any]]) -> None:
        self._outbox.extend(rows)

    async def _claim_unclaimed(self, consumer: str, message_ids: Sequence[str], at: datetime) -> set[str]:
        fresh = {m for m in message_ids if (consumer, m) not in self.tables.inbox and (consumer, m) not in self._claims}
        self._claims.update((consumer, message_id) for message_id in fresh)
        return fresh

    async def checkpoint(self, name: str) -> Position:
        return self._checkpoints.get(name, self.tables.checkpoints.get(name, START))

    async def save_checkpoint(self, name: str, position: Position) -> None:
        self._checkpoints[name] = Position(*position)

    def _apply(self) -> None:
        """Commit: every staged write at once (no await in here, so no other task sees half)."""
        tables = self.tables
        for record in self._events:
            index = len(tables.events)
            tables.events.append(replace(record, position=index + 1))
            tables.streams.setdefault(record.stream_id, {})[record.stream_version] = index
            tables.event_ids.add(record.event_id)
        start = len(tables.outbox) + 1
        tables.outbox.extend(OutboxRecord(id=start + i, **row) for i, row in enumerate(self._outbox))
        tables.inbox |= self._claims
        tables.checkpoints.update(self._checkpoints)
        self.patients._apply()
        self.erased._apply()


class MemoryPatients(PatientRegister):
    def __init__(self, committed: dict[str, EnrolledPatient]) -> None:
        self.committed = committed
        self._staged: dict[str, EnrolledPatient | None] = {}  # None: forgotten

    async def remember(self, patients: Sequence[EnrolledPatient]) -> None:
        for patient in patients:
            if await self.find(patient.subject_id) is None:
                self._staged[patient.subject_id] = patient

    async def find(self, subject_id: str) -> EnrolledPatient | None:
        if subject_id in self._staged:
            return self._staged[subject_id]
        return self.committed.get(subject_id)

    async def remove(self, subject_ids: Sequence[str]) -> None:
        self._staged.update(dict.fromkeys(subject_ids))

    def _apply(self) -> None:
        for subject_id, patient in self._staged.items():
            if patient is None:
                self.committed.pop(subject_id, None)
            else:
                self.committed[subject_id] = patient


class MemoryErased(ErasedRegister):
    def __init__(self, committed: dict[str, datetime]) -> None:
        self.committed = committed
        self._staged: dict[str, datetime] = {}

    async def remember(self, subject_ids: Sequence[str], erased_at: datetime) -> None:
        for subject_id in subject_ids:
            if subject_id not in self.committed:
                self._staged.setdefault(subject_id, erased_at)

    async def all(self) -> list[str]:
        erased = {**self.committed, **self._staged}
        return sorted(erased, key=lambda subject_id: (erased[subject_id], subject_id))

    def _apply(self) -> None:
        self.committed.update(self._staged)
