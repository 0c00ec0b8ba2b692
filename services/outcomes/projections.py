"""The live outcomes projection: every service's events, batch by batch, into SQL rows.

Each batch is one transaction (opened by the durable consumer) holding the inbox rows that
make redelivery harmless, the projection rows, and the per-stream checkpoint — so a crash
leaves either all of a batch or none of it: nothing is counted twice and nothing is skipped.

Concurrency. The four consumers (one per source service) run side by side. A batch first
reads the active generation under ``FOR SHARE`` of the ``projection_state`` row, so a rebuild's
swap (``FOR UPDATE``) waits for batches in flight and batches wait for the swap; then it locks
the rows of the patients it touches (creating missing ones first, in subject order, so two
consumers can neither lose each other's facts nor deadlock). SQLite serialises writers anyway.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import Table, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from services.outcomes import tables
from services.outcomes.projector import SOURCES, Incoming, ProjectedPatient, ProjectionChanges, SourceMark
from shared.consumer import InboundMessage
from shared.erasures import remember_erased
from shared.keys import KeyErased
from shared.service import Service
from shared.store import UnitOfWork

Lock = Literal["share", "update"] | None


class ProjectionStateMissing(RuntimeError):
    """The outcomes migration has not run on this database."""


async def read_state(connection: AsyncConnection, lock: Lock = None) -> Any:
    query = select(tables.projection_state).where(tables.projection_state.c.name == tables.PROJECTION)
    if lock is not None:
        query = query.with_for_update(read=lock == "share")
    row = (await connection.execute(query)).first()
    if row is None:
        raise ProjectionStateMissing("projection_state has no 'outcomes' row: run `nephrotrack migrate outcomes`")
    return row


async def set_state(connection: AsyncConnection, **values: Any) -> None:
    await connection.execute(
        update(tables.projection_state).where(tables.projection_state.c.name == tables.PROJECTION).values(**values)
    )


def _insert(connection: AsyncConnection, table: Table) -> Any:
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def _greatest(connection: AsyncConnection, current: Any, new: Any) -> Any:
    """The larger of two values, a NULL losing to anything (PostgreSQL's GREATEST ignores
    NULLs; SQLite's two-argument MAX returns NULL if either is, hence the COALESCEs)."""
    if connection.dialect.name == "postgresql":
        return func.greatest(current, new)
    return func.max(func.coalesce(current, new), func.coalesce(new, current))


def _patient(row: Any) -> ProjectedPatient:
    return ProjectedPatient.from_row(row.facts_json, row.egfr_versions_json)


async def lock_patients(
    connection: AsyncConnection, generation: int, subject_ids: Iterable[str]
) -> dict[str, ProjectedPatient]:
    """Load (creating empty ones first) and lock the rows of these patients for this transaction."""
    ordered = sorted(set(subject_ids))
    if not ordered:
        return {}
    placeholders = [{"generation": generation, **ProjectedPatient.new(s).row()} for s in ordered]
    await connection.execute(_insert(connection, tables.patients).on_conflict_do_nothing(), placeholders)
    p = tables.patients.c
    rows = await connection.execute(
        select(p.subject_id, p.facts_json, p.egfr_versions_json)
        .where(p.generation == generation, p.subject_id.in_(ordered))
        .order_by(p.subject_id)
        .with_for_update()
    )
    return {row.subject_id: _patient(row) for row in rows}


async def load_generation(
    connection: AsyncConnection, generation: int
) -> tuple[dict[str, ProjectedPatient], dict[str, SourceMark]]:
    """Every patient and checkpoint of a generation (a rebuild resuming where it stopped)."""
    p, s = tables.patients.c, tables.sources.c
    patients = {
        row.subject_id: _patient(row)
        for row in await connection.execute(
            select(p.subject_id, p.facts_json, p.egfr_versions_json).where(p.generation == generation)
        )
    }
    marks = {
        row.source: SourceMark(row.last_sequence, tables.utc(row.last_event_recorded_at))
        for row in await connection.execute(select(tables.sources).where(s.generation == generation))
    }
    return patients, marks


async def write_changes(
    connection: AsyncConnection, generation: int, changes: ProjectionChanges,
    patient_rows: list[dict[str, Any]] | None = None,
) -> None:
    """Upsert the touched patients, insert new timeline rows (an event already there is left
    alone), and move each stream's checkpoint forward (never back) — in the caller's transaction.
    ``patient_rows``: ``changes.patient_rows()`` computed beforehand, outside the transaction
    (the rebuild's checkpoints: serialising thousands of patients takes seconds)."""
    if patient_rows is None:
        patient_rows = changes.patient_rows()
    if changes.erased:
        await delete_patients(connection, generation, changes.erased)
    rows = [{"generation": generation, **row} for row in patient_rows]
    if rows:
        insert = _insert(connection, tables.patients)
        await connection.execute(
            insert.on_conflict_do_update(
                index_elements=["generation", "subject_id"],
                set_={c: insert.excluded[c] for c in ("group", "facts_json", "outcome_json", "egfr_versions_json")},
            ),
            rows,
        )
    await write_timeline(connection, generation, changes.timeline)
    if changes.marks:
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
                for stream, mark in sorted(changes.marks.items())
            ],
        )



async def delete_patients(connection: AsyncConnection, generation: int, subject_ids: Iterable[str]) -> None:
    """Delete erased patients' rows (facts, outcome, timeline) from a generation."""
    ids = sorted(subject_ids)
    for table in (tables.patients, tables.timeline):
        await connection.execute(delete(table).where(table.c.generation == generation, table.c.subject_id.in_(ids)))


_ROW_COLUMNS = tuple(column.name for column in tables.timeline.columns if column.name != "generation")
_row_values = operator.itemgetter(*_ROW_COLUMNS)
COPY_AT_LEAST = 500
"""Timeline writes of this many rows go through COPY on PostgreSQL (the rebuild's); fewer rows
(a live batch) through INSERT."""


async def write_timeline(connection: AsyncConnection, generation: int, rows: list[dict[str, Any]]) -> None:
    """Insert timeline rows, leaving alone any event already there (same rows either way).

    Many rows on PostgreSQL: COPY (binary, encoded by asyncpg) into a temporary table, then one
    ``INSERT … SELECT … ON CONFLICT DO NOTHING`` — several times faster than a multi-row INSERT
    whose parameters SQLAlchemy processes row by row."""
    if not rows:
        return
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


class LiveProjection:
    """The batch handler of the outcomes consumers (one per source service)."""

    def __init__(self, source: str) -> None:
        self.source = source

    async def __call__(self, uow: UnitOfWork, messages: list[InboundMessage]) -> None:
        connection = uow.connection
        generation = (await read_state(connection, lock="share")).active_generation
        codec = uow.store.codec
        incoming: list[Incoming] = []
        unreadable: list[InboundMessage] = []  # payloads of erased patients: skipped, as in a rebuild
        for m in messages:
            try:
                incoming.append(Incoming.parse(m.stream, m.stream_sequence, self.source, m.data, codec))
            except KeyErased:
                unreadable.append(m)
        patients = await lock_patients(connection, generation, (s for i in incoming if (s := i.patient_subject)))
        changes = ProjectionChanges(patients, codec.is_erased)
        for m in unreadable:
            changes.skip(m.stream, m.stream_sequence)
        for item in incoming:
            changes.add(item)
        await remember_erased(uow, changes.erased)  # keys forgotten before commit: waiting batches see it
        await write_changes(connection, generation, changes)


class ProjectionSettings(BaseSettings):
    """The live projection's consumer settings (environment variables)."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    batch_size: int = Field(default=2000, ge=1, le=10_000, alias="NEPHROTRACK_OUTCOMES_BATCH_SIZE")
    """Messages per batch (one transaction) when a backlog is waiting. A batch loads, locks and
    rewrites each patient it touches once, so under a burst of lab results the cost per result
    falls with the batch: 2,000 instead of the consumers' 200 took the labs benchmark's
    projection from ~420 to ~1,340 results/s (docs/labs.md#throughput). A quiet stream waits no
    longer than before: a partial batch is handed over after the consumers' 0.2 s batch timeout."""


def register(service: Service, **consumer_options: Any) -> None:
    """Subscribe the outcomes service to every source service's events (durable consumers)."""
    consumer_options.setdefault("batch_size", ProjectionSettings().batch_size)
    for source in SOURCES:
        service.consume_service(source, LiveProjection(source), **consumer_options)
