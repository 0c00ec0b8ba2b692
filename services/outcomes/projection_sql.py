"""The projection in the outcomes service's SQL tables (:mod:`services.outcomes.tables`), in the
unit of work's own transaction.

Concurrency. The four live consumers (one per source service) run side by side. A batch first
reads the active generation under ``FOR SHARE`` of the ``projection_state`` row, so a rebuild's
swap (``FOR UPDATE``) waits for batches in flight and batches wait for the swap; then it locks
the rows of the patients it touches (creating missing ones first, in subject order, so two
consumers can neither lose each other's facts nor deadlock). SQLite serialises writers anyway.

Speed. Each patient a batch touches is read and written once; many timeline rows (a rebuild's)
go to PostgreSQL by COPY (:meth:`SqlProjectionStore.write_timeline`).
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Integer, Table, delete, func, literal, literal_column, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from services.outcomes import tables
from services.outcomes.locks import AnalysisLock
from services.outcomes.projection_store import Lock, ProjectionState, ProjectionStateMissing, ProjectionStore
from services.outcomes.projector import ProjectedPatient, ProjectionChanges, SourceMark
from services.outcomes.remembered import RememberedPatients
from shared import metrics
from shared.store import SqlUnitOfWork, UnitOfWork

COPY_AT_LEAST = 500
"""Timeline writes of this many rows go through COPY on PostgreSQL (the rebuild's); fewer rows
(a live batch) through INSERT."""

_ROW_COLUMNS = tuple(column.name for column in tables.timeline.columns if column.name != "generation")
_row_values = operator.itemgetter(*_ROW_COLUMNS)
_ROW_VERSION = literal_column(f"{tables.patients.name}.xmin::text").label("version")
"""PostgreSQL's version of a patient row: every write of the row, by anyone, changes it."""
_PATIENT_VALUES = tuple(c.name for c in tables.patients.columns if c.name not in ("generation", "subject_id"))


async def read_state(connection: AsyncConnection, lock: Lock = None) -> ProjectionState:
    """The state row (the read side reads it too, in its snapshot)."""
    query = select(tables.projection_state).where(tables.projection_state.c.name == tables.PROJECTION)
    if lock is not None:
        query = query.with_for_update(read=lock == "share")
    row = (await connection.execute(query)).first()
    if row is None:
        raise ProjectionStateMissing("projection_state has no 'outcomes' row: run `nephrotrack migrate outcomes`")
    return ProjectionState(
        active_generation=row.active_generation,
        rebuilding_generation=row.rebuilding_generation,
        rebuild_started_at=tables.utc(row.rebuild_started_at),
        rebuild_owner=row.rebuild_owner,
        rebuild_heartbeat_at=tables.utc(row.rebuild_heartbeat_at),
        swapped_at=tables.utc(row.swapped_at),
    )


async def read_locks(connection: AsyncConnection, name: str | None = None) -> list[AnalysisLock]:
    """The analysis locks (the one named, if given), oldest first (the read side reads them too)."""
    c = tables.locks.c
    query = select(tables.locks).order_by(c.locked_at, c.name)
    rows = await connection.execute(query if name is None else query.where(c.name == name))
    return [
        AnalysisLock(row.name, row.generation, tables.utc(row.locked_at), row.actor, json.loads(row.positions_json))
        for row in rows
    ]


class SqlProjectionStore(ProjectionStore):
    """Every call works on the connection of the unit of work it is given. ``remembered``: the
    live projection's patients kept between batches (on PostgreSQL; none for a rebuild, which
    holds every patient itself)."""

    def __init__(self, remembered: RememberedPatients | None = None) -> None:
        self.remembered = remembered

    async def state(self, uow: UnitOfWork, *, lock: Lock = None) -> ProjectionState:
        return await read_state(_connection(uow), lock)

    async def set_state(self, uow: UnitOfWork, **values: Any) -> None:
        await _connection(uow).execute(
            update(tables.projection_state).where(tables.projection_state.c.name == tables.PROJECTION).values(**values)
        )

    async def lock_patients(
        self, uow: UnitOfWork, generation: int, subject_ids: Iterable[str]
    ) -> dict[str, ProjectedPatient]:
        ordered = sorted(set(subject_ids))
        if not ordered:
            return {}
        connection = _connection(uow)
        placeholders = [{"generation": generation, **ProjectedPatient.new(s).row()} for s in ordered]
        await connection.execute(_insert(connection, tables.patients).on_conflict_do_nothing(), placeholders)
        p = tables.patients.c
        mine = p.generation == generation
        remembered = self._remembered(connection)
        if remembered is None:
            rows = await connection.execute(
                select(p.subject_id, p.facts_json, p.egfr_versions_json, p.report_versions_json)
                .where(mine, p.subject_id.in_(ordered)).order_by(p.subject_id).with_for_update()
            )
            return {row.subject_id: _patient(row) for row in rows}
        versions = await connection.execute(
            select(p.subject_id, _ROW_VERSION).where(mine, p.subject_id.in_(ordered)).order_by(p.subject_id)
            .with_for_update()
        )
        patients: dict[str, ProjectedPatient] = {}
        for subject_id, version in versions:
            if (patient := remembered.take(generation, subject_id, version)) is not None:
                patients[subject_id] = patient
        metrics.OUTCOMES_PATIENTS_LOCKED.labels("remembered").inc(len(patients))
        unknown = [s for s in ordered if s not in patients]
        if unknown:
            rows = await connection.execute(
                select(p.subject_id, p.facts_json, p.egfr_versions_json, p.report_versions_json)
                .where(mine, p.subject_id.in_(unknown))
            )
            patients.update((row.subject_id, _patient(row, remembered=True)) for row in rows)
            metrics.OUTCOMES_PATIENTS_LOCKED.labels("read").inc(len(unknown))
        return patients

    async def write_changes(
        self, uow: UnitOfWork, generation: int, changes: ProjectionChanges,
        patient_rows: list[dict[str, Any]] | None = None,
    ) -> None:
        """As every store does; then the live batch's patients are remembered with the row
        versions they were just written at."""
        await super().write_changes(uow, generation, changes, patient_rows)
        connection = _connection(uow)
        remembered = self._remembered(connection)
        if remembered is None:
            return
        written = {s: patient for s in changes.touched if (patient := changes.patients[s]).remembered}
        if not written:
            return
        p = tables.patients.c
        versions = await connection.execute(
            select(p.subject_id, _ROW_VERSION).where(p.generation == generation, p.subject_id.in_(sorted(written)))
        )
        for subject_id, version in versions:
            remembered.keep(generation, subject_id, version, written[subject_id])

    def _remembered(self, connection: AsyncConnection) -> RememberedPatients | None:
        return self.remembered if connection.dialect.name == "postgresql" else None

    async def patients_page(
        self, uow: UnitOfWork, generation: int, *, after: str, limit: int
    ) -> dict[str, ProjectedPatient]:
        p = tables.patients.c
        rows = await _connection(uow).execute(
            select(p.subject_id, p.facts_json, p.egfr_versions_json, p.report_versions_json)
            .where(p.generation == generation, p.subject_id > after).order_by(p.subject_id).limit(limit)
        )
        return {row.subject_id: _patient(row) for row in rows}

    async def marks(self, uow: UnitOfWork, generation: int) -> dict[str, SourceMark]:
        return {
            row.source: SourceMark(row.last_sequence, tables.utc(row.last_event_recorded_at))
            for row in await _connection(uow).execute(
                select(tables.sources).where(tables.sources.c.generation == generation)
            )
        }

    async def newest_generation(self, uow: UnitOfWork) -> int:
        connection = _connection(uow)
        newest = 0
        for table in tables.GENERATION_TABLES:
            newest = max(newest, await connection.scalar(select(func.max(table.c.generation))) or 0)
        return newest

    async def delete_generations_except(self, uow: UnitOfWork, generation: int) -> None:
        for table in tables.GENERATION_TABLES:
            await _connection(uow).execute(
                delete(table).where(table.c.generation != generation, table.c.generation > 0)
            )

    async def delete_generations_before(self, uow: UnitOfWork, generation: int) -> None:
        for table in tables.GENERATION_TABLES:
            await _connection(uow).execute(
                delete(table).where(table.c.generation < generation, table.c.generation > 0)
            )

    async def freeze(self, uow: UnitOfWork, generation: int, frozen: int) -> None:
        """``INSERT … SELECT`` per table: the copy never leaves the database."""
        for table in tables.GENERATION_TABLES:
            copied = [column for column in table.columns if column.name != "generation"]
            await _connection(uow).execute(
                table.insert().from_select(
                    ["generation", *(column.name for column in copied)],
                    select(literal(frozen, Integer), *copied).where(table.c.generation == generation),
                )
            )

    async def record_lock(self, uow: UnitOfWork, lock: AnalysisLock) -> None:
        await _connection(uow).execute(tables.locks.insert().values(
            name=lock.name, generation=lock.generation, locked_at=lock.locked_at, actor=lock.actor,
            positions_json=json.dumps(lock.positions, sort_keys=True),
        ))

    async def locks(self, uow: UnitOfWork) -> list[AnalysisLock]:
        return await read_locks(_connection(uow))

    async def erase_from_frozen(self, uow: UnitOfWork, subject_ids: Iterable[str]) -> None:
        ids = sorted(subject_ids)
        for table in (tables.patients, tables.timeline):
            await _connection(uow).execute(delete(table).where(table.c.generation < 0, table.c.subject_id.in_(ids)))

    async def delete_patients(self, uow: UnitOfWork, generation: int, subject_ids: Iterable[str]) -> None:
        ids = sorted(subject_ids)
        for table in (tables.patients, tables.timeline):
            await _connection(uow).execute(
                delete(table).where(table.c.generation == generation, table.c.subject_id.in_(ids))
            )

    async def upsert_patients(self, uow: UnitOfWork, generation: int, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        connection = _connection(uow)
        insert = _insert(connection, tables.patients)
        await connection.execute(
            insert.on_conflict_do_update(
                index_elements=["generation", "subject_id"],
                set_={c: insert.excluded[c] for c in _PATIENT_VALUES},
            ),
            [{"generation": generation, **row} for row in rows],
        )

    async def write_timeline(self, uow: UnitOfWork, generation: int, rows: list[dict[str, Any]]) -> None:
        """Many rows on PostgreSQL: COPY (binary, encoded by asyncpg) into a temporary table,
        then one ``INSERT … SELECT … ON CONFLICT DO NOTHING`` — several times faster than a
        multi-row INSERT whose parameters SQLAlchemy processes row by row."""
        if not rows:
            return
        connection = _connection(uow)
        if connection.dialect.name != "postgresql" or len(rows) < COPY_AT_LEAST:
            await connection.execute(
                _insert(connection, tables.timeline).on_conflict_do_nothing(),
                [{"generation": generation, **row} for row in rows],
            )
            return
        columns = ", ".join(f'"{name}"' for name in _ROW_COLUMNS)
        # Through SQLAlchemy first: that is what begins the transaction on the driver's connection
        # (lazily, at the first statement); COPY on the bare asyncpg connection before it would
        # autocommit — and ON COMMIT DELETE ROWS would empty the load table at once.
        await connection.exec_driver_sql(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS outcome_timeline_rows ON COMMIT DELETE ROWS "
            f"AS SELECT {columns} FROM {tables.timeline.name} WITH NO DATA"
        )
        driver = (await connection.get_raw_connection()).driver_connection  # asyncpg
        if not driver.is_in_transaction():
            raise RuntimeError("write_timeline needs the caller's transaction to have begun on the driver connection")
        # The rows' values as they are (no per-row tuple with the generation prepended: the
        # INSERT adds it), which showed in the rebuild's profile.
        await driver.copy_records_to_table(
            "outcome_timeline_rows", records=map(_row_values, rows), columns=list(_ROW_COLUMNS)
        )
        await connection.exec_driver_sql(
            f'INSERT INTO {tables.timeline.name} ("generation", {columns}) '
            f"SELECT {int(generation):d}, {columns} FROM outcome_timeline_rows ON CONFLICT DO NOTHING"
        )

    async def advance_marks(self, uow: UnitOfWork, generation: int, marks: Mapping[str, SourceMark]) -> None:
        if not marks:
            return
        connection = _connection(uow)
        insert = _insert(connection, tables.sources)
        c = tables.sources.c
        await connection.execute(
            insert.on_conflict_do_update(
                index_elements=["generation", "source"],
                set_={
                    "last_sequence": _greatest(connection, c.last_sequence, insert.excluded.last_sequence),
                    "last_event_recorded_at": _greatest(
                        connection, c.last_event_recorded_at, insert.excluded.last_event_recorded_at
                    ),
                },
            ),
            [
                {"generation": generation, "source": stream, "last_sequence": mark.last_sequence,
                 "last_event_recorded_at": mark.last_event_recorded_at}
                for stream, mark in sorted(marks.items())
            ],
        )


def _connection(uow: UnitOfWork) -> AsyncConnection:
    if not isinstance(uow, SqlUnitOfWork):
        raise TypeError(f"the SQL projection needs a SQL unit of work, not {type(uow).__name__} "
                        "(an in-memory event store goes with MemoryProjectionStore)")
    return uow.connection


def _insert(connection: AsyncConnection, table: Table) -> Any:
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def _greatest(connection: AsyncConnection, current: Any, new: Any) -> Any:
    """The larger of two values, a NULL losing to anything (PostgreSQL's GREATEST ignores
    NULLs; SQLite's two-argument MAX returns NULL if either is, hence the COALESCEs)."""
    if connection.dialect.name == "postgresql":
        return func.greatest(current, new)
    return func.max(func.coalesce(current, new), func.coalesce(new, current))


def _patient(row: Any, *, remembered: bool = False) -> ProjectedPatient:
    return ProjectedPatient.from_row(row.facts_json, row.egfr_versions_json, row.report_versions_json,
                                     remembered=remembered)
