"""The port through which the outcomes use cases (:mod:`services.outcomes.handlers`) read and
write the projection: its state row, its patients, timeline and checkpoints per generation.

Two implementations: SQL (:mod:`services.outcomes.projection_sql`, the service's tables) and in
memory (:mod:`services.outcomes.projection_memory`, for handler tests on the in-memory event
store); tests/outcomes/test_projection_store.py holds them to the same rows. Every method works
in the caller's unit of work, so a live batch's rows commit with its inbox claims, and a
rebuild's checkpoint with its lease's heartbeat — or neither does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from services.outcomes.locks import AnalysisLock
from services.outcomes.projector import ProjectedPatient, ProjectionChanges, SourceMark
from shared.store import UnitOfWork

Lock = Literal["share", "update"] | None
"""How ``state`` locks the state row: ``share`` for a live batch (a swap waits for it), ``update``
for the lease and the swap (live batches wait); SQLite serialises writers anyway."""


class ProjectionStateMissing(RuntimeError):
    """The outcomes migration has not run on this database."""


@dataclass(frozen=True)
class ProjectionState:
    """The one state row: the generation the API serves, and the rebuild's lease (times in UTC)."""

    active_generation: int
    rebuilding_generation: int | None = None
    rebuild_started_at: datetime | None = None
    rebuild_owner: str | None = None
    rebuild_heartbeat_at: datetime | None = None
    swapped_at: datetime | None = None


class ProjectionStore(ABC):
    """The projection's rows, per generation, in a unit of work."""

    @abstractmethod
    async def state(self, uow: UnitOfWork, *, lock: Lock = None) -> ProjectionState: ...

    @abstractmethod
    async def set_state(self, uow: UnitOfWork, **values: Any) -> None:
        """Change these fields of the state row (``ProjectionState``'s names)."""

    @abstractmethod
    async def lock_patients(
        self, uow: UnitOfWork, generation: int, subject_ids: Iterable[str]
    ) -> dict[str, ProjectedPatient]:
        """Load these patients (creating empty rows for the missing first), locked for this unit
        of work, in subject order so that two batches never deadlock."""

    @abstractmethod
    async def patients_page(
        self, uow: UnitOfWork, generation: int, *, after: str, limit: int
    ) -> dict[str, ProjectedPatient]:
        """Up to ``limit`` patients of a generation in subject order, those after ``after``
        (``""``: from the first). A rebuild resuming where it stopped reads its patients a page
        at a time: held at once, their rows would be its peak memory."""

    @abstractmethod
    async def marks(self, uow: UnitOfWork, generation: int) -> dict[str, SourceMark]:
        """A generation's checkpoint per stream."""

    @abstractmethod
    async def newest_generation(self, uow: UnitOfWork) -> int:
        """The highest generation any row has (0: none)."""

    @abstractmethod
    async def delete_generations_except(self, uow: UnitOfWork, generation: int) -> None:
        """Delete every generation but this one, and but the frozen ones (locks: below zero)."""

    @abstractmethod
    async def delete_generations_before(self, uow: UnitOfWork, generation: int) -> None:
        """Delete the generations from 1 up to this one (the frozen ones stay)."""

    @abstractmethod
    async def freeze(self, uow: UnitOfWork, generation: int, frozen: int) -> None:
        """Copy every row of ``generation`` (patients, timeline, checkpoints) under ``frozen``."""

    @abstractmethod
    async def record_lock(self, uow: UnitOfWork, lock: AnalysisLock) -> None: ...

    @abstractmethod
    async def locks(self, uow: UnitOfWork) -> list[AnalysisLock]:
        """Every analysis lock, oldest first."""

    @abstractmethod
    async def erase_from_frozen(self, uow: UnitOfWork, subject_ids: Iterable[str]) -> None:
        """Delete erased patients' rows from every frozen generation: the law wins over a lock."""

    @abstractmethod
    async def delete_patients(self, uow: UnitOfWork, generation: int, subject_ids: Iterable[str]) -> None:
        """Delete erased patients' rows (facts, outcome, timeline) from a generation."""

    @abstractmethod
    async def upsert_patients(self, uow: UnitOfWork, generation: int, rows: list[dict[str, Any]]) -> None:
        """Write patient rows (``ProjectedPatient.row()``), replacing those there."""

    @abstractmethod
    async def write_timeline(self, uow: UnitOfWork, generation: int, rows: list[dict[str, Any]]) -> None:
        """Insert timeline rows, leaving alone any event already there (same rows either way)."""

    @abstractmethod
    async def advance_marks(self, uow: UnitOfWork, generation: int, marks: Mapping[str, SourceMark]) -> None:
        """Move each stream's checkpoint forward to these marks, never back."""

    async def write_changes(
        self, uow: UnitOfWork, generation: int, changes: ProjectionChanges,
        patient_rows: list[dict[str, Any]] | None = None,
    ) -> None:
        """Everything a run of messages changed: erased patients deleted, touched patients
        written (once each), new timeline rows inserted, checkpoints moved forward.
        ``patient_rows``: ``changes.patient_rows()`` computed beforehand, outside the transaction
        (a rebuild's checkpoint: serialising thousands of patients takes seconds)."""
        if patient_rows is None:
            patient_rows = changes.patient_rows()
        if changes.erased:
            await self.delete_patients(uow, generation, changes.erased)
            await self.erase_from_frozen(uow, changes.erased)
        await self.upsert_patients(uow, generation, patient_rows)
        await self.write_timeline(uow, generation, changes.timeline)
        await self.advance_marks(uow, generation, changes.marks)
