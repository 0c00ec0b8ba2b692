"""SQLite's event store: the embedded default.

SQLite lets one writer at a time commit (``BEGIN IMMEDIATE``, shared/database.py), so the order
in which positions are taken is the order in which they become visible: ``read_all`` simply
follows ``position`` (``tx_id`` stays 0) and needs no horizon. Rows go in by executemany.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Insert, Table, insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.schema import events
from shared.store.base import Position
from shared.store.sql import SqlEventStore, SqlUnitOfWork


class SqliteEventStore(SqlEventStore):
    commit_order = (events.c.position,)

    def _unit_of_work(self, connection: AsyncConnection) -> SqliteUnitOfWork:
        return SqliteUnitOfWork(self, connection)

    def _after(self, after: Position) -> ColumnElement[bool]:
        return events.c.position > after.seq

    def insert_ignoring(self, table: Table) -> Insert:
        return sqlite_insert(table).on_conflict_do_nothing()


class SqliteUnitOfWork(SqlUnitOfWork):
    async def insert_rows(self, table: Table, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            await self.connection.execute(insert(table), rows)
