"""PostgreSQL's event store: concurrent writers, a read horizon, and bulk rows by ``COPY``.

The sequence-gap problem
------------------------
On PostgreSQL the naive order ``ORDER BY position`` is unsafe for a follower of ``read_all``:
positions come from a sequence when a row is *inserted*, but rows become visible when their
transaction *commits*. Writer T1 takes position 10, writer T2 takes 11 and commits first; a
follower that reads 11 and checkpoints it will never see 10 when T1 commits a moment later.

The known simple cure is a table lock that serialises every writer (pyeventsourcing's). Here the
default is lock-free instead (``GapStrategy.XMIN``): every row also records the id of the
transaction that wrote it (``pg_current_xact_id()``), and followers read in *commit-safe* order
``(tx_id, position)`` and only rows whose ``tx_id`` is below the snapshot's ``xmin`` — the
oldest transaction still in flight. No transaction below ``xmin`` can still be running, and no
new transaction ever gets an id below it, so the set of rows below the horizon is final: a
follower never skips a late commit, and writers never wait for each other. The price is that a
long-running transaction anywhere in the PostgreSQL cluster holds the horizon back (followers
lag, nothing is lost). The position of an event is therefore the pair ``(tx_id, seq)``.
``GapStrategy.TABLE_LOCK`` keeps the classic answer for comparison (see ``bench/``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg
from sqlalchemy import Column, ColumnElement, Insert, Table, and_, literal, text, tuple_
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.database import create_engine
from shared.events import CommandContext, DomainEvent, Envelope
from shared.schema import events, outbox
from shared.store.base import Codec, ConcurrencyError, Position
from shared.store.sql import SqlEventStore, SqlUnitOfWork


class GapStrategy(StrEnum):
    XMIN = "xmin"
    TABLE_LOCK = "table_lock"


_HORIZON_SQL = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
_CURRENT_XACT_ID_SQL = "pg_current_xact_id()::text::bigint"
_HORIZON = text(_HORIZON_SQL)
_CURRENT_XACT_ID_QUERY = text(f"SELECT {_CURRENT_XACT_ID_SQL}")
ONE_STATEMENT_ROWS = 16
"""Up to this many events an append is one statement of arrays (a command's few events: fewest
round trips); beyond it ``COPY`` (a lab batch's hundreds: a 500-event batch took 14.5 ms by
COPY, 19.5–26 ms as one statement of arrays)."""
_EVENT_COLUMNS = [column for column in events.c if column.name not in ("position", "tx_id")]
_OUTBOX_COLUMNS = [column for column in outbox.c if column.name != "id"]


def _unnest(columns: Sequence[Column[Any]], first: int) -> str:
    """``unnest($first::type[], …)``: one array parameter per column, zipped into rows."""
    dialect = postgresql.dialect()
    arrays = (f"${first + i}::{column.type.compile(dialect)}[]" for i, column in enumerate(columns))
    return f"unnest({', '.join(arrays)})"


def _columns(columns: Sequence[Column[Any]], rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [[row[column.name] for row in rows] for column in columns]


def _append_statement(tx_id: str) -> str:
    """$1, $2: the stream and its expected newest version (both NULL: no check); then one array
    per event column, then one per outbox column. Nothing is written when the check fails (the
    outbox rows only follow written events); the answer is the stream's newest version as the
    statement found it."""
    names = ", ".join(column.name for column in _EVENT_COLUMNS)
    stream_id = events.c.stream_id.type.compile(postgresql.dialect())
    return (
        f"WITH head AS (SELECT coalesce(max(stream_version), 0) AS version FROM events WHERE stream_id = $1::{stream_id}), "
        f"written AS (INSERT INTO events (tx_id, {names}) SELECT {tx_id}, * FROM {_unnest(_EVENT_COLUMNS, 3)} "
        "WHERE $2::integer IS NULL OR $2::integer = (SELECT version FROM head) RETURNING position), "
        f"sent AS (INSERT INTO outbox ({', '.join(column.name for column in _OUTBOX_COLUMNS)}) "
        f"SELECT * FROM {_unnest(_OUTBOX_COLUMNS, 3 + len(_EVENT_COLUMNS))} WHERE EXISTS (SELECT FROM written)) "
        "SELECT version FROM head"
    )


_APPEND = {
    GapStrategy.XMIN: _append_statement(_CURRENT_XACT_ID_SQL),
    GapStrategy.TABLE_LOCK: _append_statement("0"),  # read in position order: the lock serialises commits
}
_ROWS_AFTER = (
    f"SELECT {', '.join(column.name for column in events.c)} FROM events "
    f"WHERE (tx_id, position) > ($1, $2) AND tx_id < {_HORIZON_SQL} "
    "ORDER BY tx_id, position LIMIT $3"
)


_EventRow = type(
    "_EventRow",
    (asyncpg.Record,),
    {column.name: property(operator.itemgetter(i)) for i, column in enumerate(events.c)},
)
"""A row of :data:`_ROWS_AFTER` with the attributes of ``shared.schema.events`` (what
:class:`~shared.store.base.EventStore` reads rows by)."""

_CLAIM_UNCLAIMED = (
    "INSERT INTO inbox (consumer, message_id, processed_at) SELECT $1, claimed, $3 FROM unnest($2::text[]) AS claimed "
    "ON CONFLICT DO NOTHING RETURNING message_id"
)


class PostgresEventStore(SqlEventStore):
    is_postgres = True
    commit_order = (events.c.tx_id, events.c.position)

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        subject_for: Callable[[Envelope], str | None] | None = None,
        codec: Codec | None = None,
        gap_strategy: GapStrategy = GapStrategy.XMIN,
    ) -> None:
        super().__init__(engine, subject_for=subject_for, codec=codec)
        self.gap_strategy = gap_strategy
        self._lone_appends: AsyncEngine | None = None

    async def append(
        self,
        stream_id: str,
        new_events: Sequence[DomainEvent],
        expected_version: int,
        context: CommandContext | None = None,
    ) -> list[Envelope]:
        """A lone append (nothing else in its transaction) is :data:`_APPEND` alone, which
        PostgreSQL commits as its own transaction: one round trip instead of BEGIN, it, COMMIT
        (docs/performance.md, the event store against the Python peer)."""
        if self.gap_strategy is GapStrategy.TABLE_LOCK or len(new_events) > ONE_STATEMENT_ROWS:
            return await super().append(stream_id, new_events, expected_version, context)
        async with self._lone_append_engine().connect() as connection:
            uow = self._unit_of_work(connection)
            envelopes = await uow.append(stream_id, new_events, expected_version, context)
        uow._run_commit_callbacks()
        return envelopes

    def _lone_append_engine(self) -> AsyncEngine:
        """Connections of their own for lone appends, opened on the first: autocommit, and
        PostgreSQL's plan cache left as it is. :data:`_APPEND` has one good plan whatever its
        values (a unique-index lookup, then inserts), and planning it for each run, as every
        other statement of a service is (``shared.database.POSTGRES_SETTINGS``), was a tenth of
        an append's time (docs/performance.md)."""
        if self._lone_appends is None:
            url = self.engine.url.render_as_string(hide_password=False)
            engine = create_engine(url, pool_size=self.engine.pool.size(), plan_each_run=False)
            self._lone_appends = engine.execution_options(isolation_level="AUTOCOMMIT")
        return self._lone_appends

    async def close(self) -> None:
        if self._lone_appends is not None:
            await self._lone_appends.dispose()
        await super().close()

    def _unit_of_work(self, connection: AsyncConnection) -> PostgresUnitOfWork:
        return PostgresUnitOfWork(self, connection)

    def _after(self, after: Position) -> ColumnElement[bool]:
        later = tuple_(events.c.tx_id, events.c.position) > tuple_(literal(after.tx_id), literal(after.seq))
        return and_(later, events.c.tx_id < _HORIZON)

    def insert_ignoring(self, table: Table) -> Insert:
        return pg_insert(table).on_conflict_do_nothing()

    async def _rows_after(self, after: Position, size: int) -> Sequence[Any]:
        """The catch-up read's batch straight from asyncpg (its prepared statement, its records):
        through SQLAlchemy's result rows it cost twice the CPU per event (docs/performance.md)."""
        async with self.engine.connect() as connection:
            raw = await connection.get_raw_connection()
            try:
                return await raw.driver_connection.fetch(  # type: ignore[union-attr, no-any-return]
                    _ROWS_AFTER, after.tx_id, after.seq, size, record_class=_EventRow
                )
            except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError) as error:
                await connection.invalidate(error)  # as SQLAlchemy does when its own statement loses the server
                raise


class PostgresUnitOfWork(SqlUnitOfWork):
    store: PostgresEventStore
    integrity_errors = (IntegrityError, asyncpg.IntegrityConstraintViolationError)

    def __init__(self, store: PostgresEventStore, connection: AsyncConnection) -> None:
        super().__init__(store, connection)
        self._tx_id: int | None = None

    async def _claim_unclaimed(self, consumer: str, message_ids: Sequence[str], at: datetime) -> set[str]:
        """One statement for the whole batch, the ids bound as one array (a lab batch's 500 bound
        one by one cost more client CPU than the insert), sorted so that overlapping claims take
        their row locks in one order and never deadlock."""
        if not message_ids:
            return set()
        await self.transaction_id()  # the driver's transaction has begun: the statement runs in it
        raw = await self.connection.get_raw_connection()
        rows = await raw.driver_connection.fetch(  # type: ignore[union-attr]
            _CLAIM_UNCLAIMED, consumer, sorted(message_ids), at
        )
        return {row[0] for row in rows}

    async def _insert(
        self, rows: list[dict[str, Any]], outgoing: list[dict[str, Any]], expected: tuple[str, int] | None
    ) -> None:
        """Events, outbox rows, the transaction id and the version check in one statement
        (:data:`_APPEND`): an append is BEGIN, this, COMMIT. A concurrent writer that took the
        version first still fails the unique (stream_id, stream_version) constraint. Batches
        larger than :data:`ONE_STATEMENT_ROWS` go the base way instead, by ``COPY``."""
        if len(rows) > ONE_STATEMENT_ROWS:
            await super()._insert(rows, outgoing, expected)
            return
        if self.store.gap_strategy is GapStrategy.TABLE_LOCK:
            await self.connection.execute(text("LOCK TABLE events IN EXCLUSIVE MODE"))
        stream_id, expected_version = expected or (None, None)
        arguments = (stream_id, expected_version, *_columns(_EVENT_COLUMNS, rows), *_columns(_OUTBOX_COLUMNS, outgoing))
        try:
            result = await self.connection.exec_driver_sql(_APPEND[self.store.gap_strategy], arguments)
        except self.integrity_errors as exc:
            raise ConcurrencyError(rows[0]["stream_id"], rows[0]["stream_version"] - 1) from exc
        actual = result.scalar_one()
        if stream_id is not None and actual != expected_version:
            raise ConcurrencyError(stream_id, expected_version, actual)

    async def _insert_events(self, rows: list[dict[str, Any]]) -> None:
        if self.store.gap_strategy is GapStrategy.TABLE_LOCK:
            await self.connection.execute(text("LOCK TABLE events IN EXCLUSIVE MODE"))
        else:
            tx_id = await self.transaction_id()
            for row in rows:
                row["tx_id"] = tx_id
        await super()._insert_events(rows)

    async def transaction_id(self) -> int:
        """This transaction's PostgreSQL id (``pg_current_xact_id()``), asked once. Asking through
        SQLAlchemy also begins the driver's transaction, which :meth:`insert_rows` relies on."""
        if self._tx_id is None:
            self._tx_id = int(await self.connection.scalar(_CURRENT_XACT_ID_QUERY))
        return self._tx_id

    async def insert_rows(self, table: Table, rows: Sequence[dict[str, Any]]) -> None:
        """Through ``COPY`` on the transaction's own asyncpg connection: for the hundreds of rows
        of a lab batch, SQLAlchemy's executemany spent more CPU binding each row's parameters than
        the database spent storing them (profile in docs/labs.md#throughput). Constraint
        violations raise ``asyncpg.IntegrityConstraintViolationError``."""
        if not rows:
            return
        await self.transaction_id()  # the driver's transaction has begun: COPY runs inside it
        columns = list(rows[0])
        record = operator.itemgetter(*columns) if len(columns) > 1 else lambda row: (row[columns[0]],)
        raw = await self.connection.get_raw_connection()
        await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
            table.name, records=[record(row) for row in rows], columns=columns
        )
