"""The projection in dicts: the outcomes use cases tested in milliseconds, with the in-memory
event store (``open_store("memory://")``), without a database.

It behaves as the SQL tables do wherever tests/outcomes/test_projection_store.py can tell. A
unit of work writes to its own copy of the tables, which becomes the committed one when the unit
of work commits (``uow.on_commit``): a rolled-back one leaves nothing, as a transaction. That is
sound because the in-memory event store runs one unit of work at a time; locks are therefore
no-ops here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from uuid import UUID

from services.outcomes.locks import AnalysisLock, is_frozen
from services.outcomes.projection_store import Lock, ProjectionState, ProjectionStore
from services.outcomes.projector import ProjectedPatient, SourceMark
from shared.store import UnitOfWork
from shared.store.staged import StagedTables

Rows = dict[int, dict[Any, Any]]
"""Generation -> key -> row."""


@dataclass
class MemoryProjection:
    """The tables: patient rows by subject id, timeline rows by event id, marks by stream."""

    state: ProjectionState
    patients: Rows = field(default_factory=dict)
    timeline: Rows = field(default_factory=dict)
    sources: Rows = field(default_factory=dict)
    locks: dict[str, AnalysisLock] = field(default_factory=dict)

    def copy(self) -> MemoryProjection:
        """Rows are replaced, never changed in place, so copying the dicts is enough."""
        return MemoryProjection(
            self.state, *({g: dict(rows) for g, rows in table.items()} for table in self.generation_tables()),
            locks=dict(self.locks),
        )

    def generation_tables(self) -> tuple[Rows, Rows, Rows]:
        return self.patients, self.timeline, self.sources


class MemoryProjectionStore(ProjectionStore):
    def __init__(self, active_generation: int = 1) -> None:
        self._staged = StagedTables(MemoryProjection(ProjectionState(active_generation)))

    @property
    def committed(self) -> MemoryProjection:
        """The tables as committed."""
        return self._staged.committed

    def tables(self, uow: UnitOfWork) -> MemoryProjection:
        """The tables as ``uow`` sees them: the committed ones with its own writes."""
        return self._staged.of(uow)

    async def state(self, uow: UnitOfWork, *, lock: Lock = None) -> ProjectionState:
        return self.tables(uow).state

    async def set_state(self, uow: UnitOfWork, **values: Any) -> None:
        tables = self.tables(uow)
        tables.state = replace(tables.state, **values)

    async def lock_patients(
        self, uow: UnitOfWork, generation: int, subject_ids: Iterable[str]
    ) -> dict[str, ProjectedPatient]:
        rows = self.tables(uow).patients.setdefault(generation, {})
        ordered = sorted(set(subject_ids))
        for subject_id in ordered:
            rows.setdefault(subject_id, ProjectedPatient.new(subject_id).row())
        return {subject_id: _patient(rows[subject_id]) for subject_id in ordered}

    async def patients_page(
        self, uow: UnitOfWork, generation: int, *, after: str, limit: int
    ) -> dict[str, ProjectedPatient]:
        rows = self.tables(uow).patients.get(generation, {})
        return {s: _patient(rows[s]) for s in sorted(s for s in rows if s > after)[:limit]}

    async def marks(self, uow: UnitOfWork, generation: int) -> dict[str, SourceMark]:
        return {s: replace(mark) for s, mark in self.tables(uow).sources.get(generation, {}).items()}

    async def newest_generation(self, uow: UnitOfWork) -> int:
        return max((g for table in self.tables(uow).generation_tables() for g, rows in table.items() if rows), default=0)

    async def delete_generations_except(self, uow: UnitOfWork, generation: int) -> None:
        for table in self.tables(uow).generation_tables():
            for doomed in [g for g in table if g != generation and not is_frozen(g)]:
                del table[doomed]

    async def delete_generations_before(self, uow: UnitOfWork, generation: int) -> None:
        for table in self.tables(uow).generation_tables():
            for doomed in [g for g in table if g < generation and not is_frozen(g)]:
                del table[doomed]

    async def freeze(self, uow: UnitOfWork, generation: int, frozen: int) -> None:
        for table in self.tables(uow).generation_tables():
            table[frozen] = dict(table.get(generation, {}))

    async def record_lock(self, uow: UnitOfWork, lock: AnalysisLock) -> None:
        locks = self.tables(uow).locks
        if lock.name in locks:
            raise ValueError(f"lock {lock.name!r} exists (the SQL table's primary key refuses it too)")
        locks[lock.name] = lock

    async def locks(self, uow: UnitOfWork) -> list[AnalysisLock]:
        return sorted(self.tables(uow).locks.values(), key=lambda lock: (lock.locked_at, lock.name))

    async def erase_from_frozen(self, uow: UnitOfWork, subject_ids: Iterable[str]) -> None:
        tables, ids = self.tables(uow), set(subject_ids)
        for generation in {g for table in (tables.patients, tables.timeline) for g in table if is_frozen(g)}:
            await self.delete_patients(uow, generation, ids)

    async def delete_patients(self, uow: UnitOfWork, generation: int, subject_ids: Iterable[str]) -> None:
        tables, ids = self.tables(uow), set(subject_ids)
        for table in (tables.patients, tables.timeline):
            rows = table.get(generation, {})
            for doomed in [key for key, row in rows.items() if row["subject_id"] in ids]:
                del rows[doomed]

    async def upsert_patients(self, uow: UnitOfWork, generation: int, rows: list[dict[str, Any]]) -> None:
        patients = self.tables(uow).patients.setdefault(generation, {})
        for row in rows:
            patients[row["subject_id"]] = dict(row)

    async def write_timeline(self, uow: UnitOfWork, generation: int, rows: list[dict[str, Any]]) -> None:
        timeline: dict[UUID, dict[str, Any]] = self.tables(uow).timeline.setdefault(generation, {})
        for row in rows:
            timeline.setdefault(row["event_id"], dict(row))

    async def advance_marks(self, uow: UnitOfWork, generation: int, marks: Mapping[str, SourceMark]) -> None:
        sources = self.tables(uow).sources.setdefault(generation, {})
        for stream, mark in marks.items():
            advanced = replace(sources.get(stream, SourceMark()))
            advanced.advance(mark.last_sequence, mark.last_event_recorded_at)
            sources[stream] = advanced


def _patient(row: dict[str, Any]) -> ProjectedPatient:
    return ProjectedPatient.from_row(row["facts_json"], row["egfr_versions_json"], row["report_versions_json"])
