"""The read side of the outcomes projection: what the analyst API answers from.

Every query joins ``projection_state`` so it reads the generation that is active *now*, and a
request runs all its queries in one snapshot (REPEATABLE READ on PostgreSQL; SQLite's reader
sees one snapshot per transaction) — a rebuild's swap can never hand a response half of the
old projection and half of the new one. Nothing here reads events: cohort answers cost
O(patients), whatever the length of the log (and the API remembers the live ones per projection
version, services/outcomes/answers.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import and_, event, literal_column, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from services.outcomes import tables
from services.outcomes.domain import PatientFacts, PatientOutcome
from services.outcomes.locks import AnalysisLock
from services.outcomes.projection_sql import read_locks, read_state
from services.outcomes.projection_store import ProjectionState
from services.outcomes.projector import ProjectedPatient

_state = tables.projection_state.c


def _active(table: Any) -> Any:
    """Join condition: rows of the generation the projection currently serves."""
    return and_(_state.name == tables.PROJECTION, table.c.generation == _state.active_generation)


def _of(query: Any, table: Any, generation: int | None) -> Any:
    """``query`` restricted to the rows of ``generation`` (a lock's frozen one), or, when None,
    to the generation served now (joining the state row, so a swap is seen whole or not at all)."""
    if generation is None:
        return query.join_from(table, tables.projection_state, _active(table))
    return query.where(table.c.generation == generation)


@dataclass(frozen=True)
class SourceFreshness:
    source: str
    stream: str
    last_sequence: int
    last_event_recorded_at: datetime | None


@dataclass(frozen=True)
class Freshness:
    """How far the projection has read each source stream, and the newest event it applied;
    for a past answer, the lock it was frozen under or the ``as_of`` time it was replayed to."""

    generation: int
    sources: list[SourceFreshness]
    lock: str | None = None
    as_of: datetime | None = None
    locked_at: datetime | None = None
    versions: tuple[str, ...] = ()
    """PostgreSQL's row version (``xmin``) of each mark row of the served generation: every batch
    rewrites its streams' mark rows in the transaction that writes its patients — even a batch
    behind the mark (a redelivery after a nak, another replica's batch committing later), which
    leaves the position as it was. Empty for a past answer, or on SQLite (no row versions)."""

    @property
    def answered_at(self) -> datetime | None:
        """The past moment answered (a lock's time, or ``as_of``); None for a live answer. What
        a file export is stamped with, so that a past answer is the same bytes every time."""
        return self.locked_at or self.as_of

    @property
    def position(self) -> str:
        """``enrollment:12,pulse:40,cells:9,labs:310``: the JetStream sequence applied per source."""
        return ",".join(f"{s.source}:{s.last_sequence}" for s in self.sources)

    @property
    def updated_at(self) -> datetime | None:
        return max((t for s in self.sources if (t := s.last_event_recorded_at) is not None), default=None)

    def headers(self) -> dict[str, str]:
        headers = {"X-Projection-Position": self.position, "X-Projection-Generation": str(self.generation)}
        if self.updated_at is not None:
            headers["X-Projection-Updated-At"] = self.updated_at.isoformat()
        if self.lock is not None:
            headers["X-Projection-Lock"] = self.lock
        if self.as_of is not None:
            headers["X-Projection-As-Of"] = self.as_of.isoformat()
        return headers

    @property
    def answer_key(self) -> tuple[int, str, str | None, datetime | None, tuple[str, ...]]:
        """Equal keys, equal rows: what a cached answer is valid for."""
        return self.generation, self.position, self.lock, self.as_of, self.versions

    @property
    def live_key(self) -> tuple[int, tuple[str, ...]] | None:
        """What a remembered live answer is valid for: the served generation and its mark rows'
        versions. None where rows can change unseen: a lock's frozen generation loses an erased
        patient's rows without its marks changing (``erase_from_frozen``), an ``as_of`` answer is
        a replay of the log, and SQLite rows carry no version."""
        if self.lock is None and self.as_of is None and self.versions:
            return self.generation, self.versions
        return None


@dataclass(frozen=True)
class TimelineEntry:
    event_id: str
    occurred_on: date
    recorded_at: datetime
    kind: str
    source: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class PatientRecord:
    patient: ProjectedPatient
    outcome: PatientOutcome | None
    timeline: list[TimelineEntry]


def reading_engine(engine: AsyncEngine) -> AsyncEngine:
    """An engine for the API's reads. On SQLite the service's engine begins every transaction
    with ``BEGIN IMMEDIATE`` (right for writers), which would make each read wait for the write
    lock — behind every projection batch and rebuild flush. In WAL mode a plain ``BEGIN`` reads
    a consistent snapshot without any lock, so readers get their own engine. On PostgreSQL
    readers never block writers anyway: the service's engine is returned as is."""
    if engine.dialect.name != "sqlite":
        return engine
    reader = create_async_engine(engine.url, connect_args={"timeout": 30})

    @event.listens_for(reader.sync_engine, "connect")
    def on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # let the "begin" hook below issue BEGIN
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    @event.listens_for(reader.sync_engine, "begin")
    def on_begin(connection):  # type: ignore[no-untyped-def]
        connection.exec_driver_sql("BEGIN")

    return reader


class OutcomesQueries:
    """``streams`` maps each source service to its stream name (checkpoints are kept by stream)."""

    def __init__(self, engine: AsyncEngine, streams: Mapping[str, str]) -> None:
        self.engine = engine
        self.streams = dict(streams)

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[AsyncConnection]:
        options = {"isolation_level": "REPEATABLE READ"} if self.engine.dialect.name == "postgresql" else {}
        async with self.engine.connect() as connection:
            connection = await connection.execution_options(**options)
            async with connection.begin():
                yield connection

    async def live_freshness(self) -> Freshness:
        """The served generation's freshness in one statement outside any transaction (one round
        trip where a snapshot takes three): what a remembered answer is checked against."""
        async with self.engine.connect() as connection:
            connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
            return await self.freshness(connection)

    async def state(self, connection: AsyncConnection) -> ProjectionState:
        """The served generation and the rebuild's lease."""
        return await read_state(connection)

    async def freshness(self, connection: AsyncConnection, lock: AnalysisLock | None = None) -> Freshness:
        """Of the served generation, or of a lock's frozen one."""
        s = tables.sources.c
        if lock is not None:
            rows = await connection.execute(
                select(s.source, s.last_sequence, s.last_event_recorded_at).where(s.generation == lock.generation)
            )
            return self.freshness_of({row.source: row for row in rows}, lock.generation, lock=lock.name,
                                     locked_at=lock.locked_at)
        versioned = connection.dialect.name == "postgresql"
        version = literal_column(f"{tables.sources.name}.xmin::text" if versioned else "NULL").label("version")
        rows = await connection.execute(
            select(_state.active_generation, s.source, s.last_sequence, s.last_event_recorded_at, version)
            .select_from(tables.projection_state.outerjoin(tables.sources, _active(tables.sources)))
            .where(_state.name == tables.PROJECTION)
        )
        generation, marks = 0, {}
        for row in rows:
            generation = row.active_generation
            if row.source is not None:
                marks[row.source] = row
        versions = tuple(f"{stream}:{marks[stream].version}" for stream in sorted(marks)) if versioned else ()
        return self.freshness_of(marks, generation, versions=versions)

    def freshness_of(self, marks: Mapping[str, Any], generation: int, **past: Any) -> Freshness:
        """``marks``: per stream, anything with ``last_sequence`` and ``last_event_recorded_at``."""
        sources = []
        for service, stream in self.streams.items():
            mark = marks.get(stream)
            sources.append(SourceFreshness(
                source=service, stream=stream,
                last_sequence=mark.last_sequence if mark else 0,
                last_event_recorded_at=tables.utc(mark.last_event_recorded_at) if mark else None,
            ))
        return Freshness(generation, sources, **past)

    async def lock(self, connection: AsyncConnection, name: str) -> AnalysisLock | None:
        found = await read_locks(connection, name)
        return found[0] if found else None

    async def locks(self, connection: AsyncConnection) -> list[AnalysisLock]:
        return await read_locks(connection)

    async def outcomes(
        self, connection: AsyncConnection, group: str | None = None, generation: int | None = None
    ) -> list[PatientOutcome]:
        """Every enrolled patient's values (of one group, if given), by subject id. ``generation``:
        a lock's (None: the served one), here and in the other reads."""
        p = tables.patients.c
        query = _of(select(p.outcome_json), tables.patients, generation).where(p.outcome_json.is_not(None)).order_by(p.subject_id)
        rows = await connection.execute(query if group is None else query.where(p.group == group))
        return [PatientOutcome.model_validate_json(row.outcome_json) for row in rows]

    async def facts(self, connection: AsyncConnection, group: str, generation: int | None = None) -> list[PatientFacts]:
        p = tables.patients.c
        rows = await connection.execute(
            _of(select(p.facts_json), tables.patients, generation).where(p.group == group).order_by(p.subject_id)
        )
        return [PatientFacts.model_validate_json(row.facts_json) for row in rows]

    async def patient(
        self, connection: AsyncConnection, subject_id: str, generation: int | None = None
    ) -> PatientRecord | None:
        """The patient's row and timeline (oldest first), or None if no event named them."""
        p, t = tables.patients.c, tables.timeline.c
        row = (await connection.execute(
            _of(select(p.facts_json, p.egfr_versions_json, p.report_versions_json, p.outcome_json), tables.patients,
                generation).where(p.subject_id == subject_id)
        )).first()
        if row is None:
            return None
        events = await connection.execute(
            _of(select(t.event_id, t.occurred_on, t.recorded_at, t.kind, t.source, t.detail_json), tables.timeline,
                generation).where(t.subject_id == subject_id)
            .order_by(t.occurred_on, t.recorded_at, t.event_id)
        )
        return PatientRecord(
            patient=ProjectedPatient.from_row(row.facts_json, row.egfr_versions_json, row.report_versions_json),
            outcome=PatientOutcome.model_validate_json(row.outcome_json) if row.outcome_json else None,
            timeline=[
                TimelineEntry(str(e.event_id), e.occurred_on, tables.utc(e.recorded_at), e.kind, e.source,
                              json.loads(e.detail_json))
                for e in events
            ],
        )

    async def enrolled_records(
        self, connection: AsyncConnection, kinds: Collection[str], generation: int | None = None
    ) -> list[PatientRecord]:
        """Every enrolled patient (by subject id) with the timeline rows of ``kinds``, in the
        order they were recorded — what the CDISC exports read (services/outcomes/cdisc)."""
        p, t = tables.patients.c, tables.timeline.c
        patients = await connection.execute(
            _of(select(p.subject_id, p.facts_json, p.egfr_versions_json, p.report_versions_json, p.outcome_json),
                tables.patients, generation)
            .where(p.outcome_json.is_not(None)).order_by(p.subject_id)
        )
        events = await connection.execute(
            _of(select(t.subject_id, t.event_id, t.occurred_on, t.recorded_at, t.kind, t.source, t.detail_json),
                tables.timeline, generation).where(t.kind.in_(list(kinds))).order_by(t.recorded_at, t.event_id)
        )
        timelines: dict[str, list[TimelineEntry]] = {}
        for e in events:
            timelines.setdefault(e.subject_id, []).append(TimelineEntry(
                str(e.event_id), e.occurred_on, tables.utc(e.recorded_at), e.kind, e.source, json.loads(e.detail_json)))
        return [
            PatientRecord(
                patient=ProjectedPatient.from_row(row.facts_json, row.egfr_versions_json, row.report_versions_json),
                outcome=PatientOutcome.model_validate_json(row.outcome_json),
                timeline=timelines.get(row.subject_id, []),
            )
            for row in patients
        ]
