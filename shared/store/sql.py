"""What the PostgreSQL and SQLite stores share: SQLAlchemy Core over shared/schema.py's tables.

A dialect (:mod:`shared.store.postgres`, :mod:`shared.store.sqlite`) adds its own: how many rows
go in at once, in which order and up to which horizon the log is read, how an insert skips a row
that is there already, and how a key is looked up among many.

Only SQL stores have an ``engine`` and SQL units of work a ``connection``. The engine is for
SQL-only infrastructure (the outbox relay, the audit trail, the statistics keeper, the outcomes
projections). ``connection`` is the escape hatch through which services' own tables are still
written while they move behind their own queries modules; shared code does not use it.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import ColumnElement, Insert, Table, delete, func, insert, literal, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import UnaryExpression

from shared.database import one_of
from shared.events import Envelope
from shared.schema import checkpoints, erased_subjects, events, inbox, known_patients, outbox
from shared.store.base import START, Codec, ConcurrencyError, EventStore, Position, UnitOfWork
from shared.store.registers import EnrolledPatient, ErasedRegister, PatientRegister

CHUNK = 500
"""Ids per ``IN``/``ANY`` lookup of a batch read."""


class SqlEventStore(EventStore):
    """An event store in a service's SQL database (its tables: shared/schema.py)."""

    is_postgres: ClassVar[bool] = False
    commit_order: ClassVar[tuple[Any, ...]]
    """The columns ``read_all`` orders by."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        subject_for: Callable[[Envelope], str | None] | None = None,
        codec: Codec | None = None,
    ) -> None:
        super().__init__(subject_for=subject_for, codec=codec)
        self.engine = engine

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[SqlUnitOfWork]:
        async with self.engine.begin() as connection:
            yield self._unit_of_work(connection)

    @abstractmethod
    def _unit_of_work(self, connection: AsyncConnection) -> SqlUnitOfWork: ...

    @abstractmethod
    def _after(self, after: Position) -> ColumnElement[bool]:
        """Rows after ``after`` in commit order, and below the read horizon if the dialect has one."""

    @abstractmethod
    def insert_ignoring(self, table: Table) -> Insert:
        """``INSERT`` that skips a row whose key is taken (``ON CONFLICT DO NOTHING``)."""

    def one_of(self, column: ColumnElement[Any], values: Sequence[Any]) -> ColumnElement[bool]:
        return one_of(column, values, postgres=self.is_postgres)

    async def _stream_rows(self, stream_id: str) -> Sequence[Any]:
        async with self.engine.connect() as connection:
            return await stream_rows(connection, stream_id)

    async def _rows_after(self, after: Position, size: int) -> Sequence[Any]:
        query = select(events).where(self._after(after)).order_by(*self.commit_order).limit(size)
        async with self.engine.connect() as connection:
            return (await connection.execute(query)).all()

    async def head(self) -> Position:
        newest: list[UnaryExpression[Any]] = [column.desc() for column in self.commit_order]
        query = select(events.c.tx_id, events.c.position).order_by(*newest).limit(1)
        async with self.engine.connect() as connection:
            row = (await connection.execute(query)).first()
        return Position(row.tx_id, row.position) if row else START

    async def ping(self) -> None:
        async with self.engine.connect() as connection:
            await connection.execute(select(literal(1)))

    async def close(self) -> None:
        await self.engine.dispose()


class SqlUnitOfWork(UnitOfWork):
    """One database transaction on ``connection``."""

    store: SqlEventStore
    integrity_errors: ClassVar[tuple[type[Exception], ...]] = (IntegrityError,)
    """What the driver raises on a taken key (a lost race for a stream version)."""

    def __init__(self, store: SqlEventStore, connection: AsyncConnection) -> None:
        super().__init__(store)
        self.connection = connection
        self.patients = SqlPatients(store, connection)
        self.erased = SqlErased(store, connection)

    @abstractmethod
    async def insert_rows(self, table: Table, rows: Sequence[dict[str, Any]]) -> None:
        """Insert many rows of one shape (the keys of the first) in this transaction; a taken
        key raises one of :attr:`integrity_errors`."""

    async def _stream_rows(self, stream_id: str) -> Sequence[Any]:
        return await stream_rows(self.connection, stream_id)

    async def _rows_of_streams(self, stream_ids: Sequence[str]) -> Sequence[Any]:
        rows: list[Any] = []
        for chunk in _chunks(stream_ids, CHUNK):
            query = (
                select(events)
                .where(self.store.one_of(events.c.stream_id, chunk))
                .order_by(events.c.stream_id, events.c.stream_version)
            )
            rows += (await self.connection.execute(query)).all()
        return rows

    async def stream_version(self, stream_id: str) -> int:
        value = await self.connection.scalar(
            select(func.max(events.c.stream_version)).where(events.c.stream_id == stream_id)
        )
        return value or 0

    async def _insert_events(self, rows: list[dict[str, Any]]) -> None:
        try:
            await self.insert_rows(events, rows)
        except self.integrity_errors as exc:
            raise ConcurrencyError(rows[0]["stream_id"], rows[0]["stream_version"] - 1) from exc

    async def _insert_outbox(self, rows: list[dict[str, Any]]) -> None:
        await self.insert_rows(outbox, rows)

    async def _claim_unclaimed(self, consumer: str, message_ids: Sequence[str], at: datetime) -> set[str]:
        claimed: set[str] = set()
        # In one order whoever claims, so two transactions claiming overlapping ids never deadlock.
        for chunk in _chunks(sorted(message_ids), CHUNK):
            rows = [{"consumer": consumer, "message_id": message_id, "processed_at": at} for message_id in chunk]
            inserted = await self.connection.execute(
                self.store.insert_ignoring(inbox).values(rows).returning(inbox.c.message_id)
            )
            claimed.update(inserted.scalars())
        return claimed

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


class SqlPatients(PatientRegister):
    """``known_patients``."""

    def __init__(self, store: SqlEventStore, connection: AsyncConnection) -> None:
        self.store = store
        self.connection = connection

    async def remember(self, patients: Sequence[EnrolledPatient]) -> None:
        if patients:
            rows = [asdict(patient) for patient in patients]
            await self.connection.execute(self.store.insert_ignoring(known_patients).values(rows))

    async def find(self, subject_id: str) -> EnrolledPatient | None:
        query = select(known_patients).where(known_patients.c.subject_id == subject_id)
        row = (await self.connection.execute(query)).first()
        return EnrolledPatient(**row._mapping) if row else None

    async def remove(self, subject_ids: Sequence[str]) -> None:
        if subject_ids:
            await self.connection.execute(delete(known_patients).where(known_patients.c.subject_id.in_(subject_ids)))


class SqlErased(ErasedRegister):
    """``erased_subjects``."""

    def __init__(self, store: SqlEventStore, connection: AsyncConnection) -> None:
        self.store = store
        self.connection = connection

    async def remember(self, subject_ids: Sequence[str], erased_at: datetime) -> None:
        rows = [{"subject_id": subject_id, "erased_at": erased_at} for subject_id in subject_ids]
        if rows:
            await self.connection.execute(self.store.insert_ignoring(erased_subjects), rows)

    async def all(self) -> list[str]:
        query = select(erased_subjects.c.subject_id).order_by(erased_subjects.c.erased_at, erased_subjects.c.subject_id)
        return list((await self.connection.execute(query)).scalars())


async def stream_rows(connection: AsyncConnection, stream_id: str) -> Sequence[Any]:
    query = select(events).where(events.c.stream_id == stream_id).order_by(events.c.stream_version)
    return (await connection.execute(query)).all()


def _chunks(items: Sequence[str], size: int) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
