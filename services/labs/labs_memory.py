"""The labs tables in plain Python: the labs use cases tested in milliseconds on the in-memory
event store (``open_store("memory://")``), without a database.

A unit of work writes to its own copy of the tables, which becomes the committed one when it
commits (:class:`shared.store.staged.StagedTables`): a rolled-back one leaves nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from services.labs.domain import KnownPatient
from services.labs.labs_store import PURGE_TARGETS, LabsStore, LoggedRejection, ParkedResult, PurgeJob
from shared.store import UnitOfWork
from shared.store.staged import StagedTables


@dataclass
class MemoryLabsTables:
    """Rows are replaced, never changed in place, so copying the containers is enough."""

    result_index: dict[str, str] = field(default_factory=dict)
    parked: dict[int, ParkedResult] = field(default_factory=dict)
    rejections: list[LoggedRejection] = field(default_factory=list)
    purges: dict[str, PurgeJob] = field(default_factory=dict)
    also_published: list[dict[str, Any]] = field(default_factory=list)
    """The outbox rows :meth:`LabsStore.publish_also` wrote (nothing publishes them here)."""
    next_id: int = 1

    def copy(self) -> MemoryLabsTables:
        return MemoryLabsTables(dict(self.result_index), dict(self.parked), list(self.rejections),
                                dict(self.purges), list(self.also_published), self.next_id)


class MemoryLabsStore(LabsStore):
    def __init__(self) -> None:
        self._staged = StagedTables(MemoryLabsTables())

    @property
    def committed(self) -> MemoryLabsTables:
        """The tables as committed."""
        return self._staged.committed

    def tables(self, uow: UnitOfWork) -> MemoryLabsTables:
        """The tables as ``uow`` sees them: the committed ones with its own writes."""
        return self._staged.of(uow)

    async def known_patients(self, uow: UnitOfWork, subject_ids: Sequence[str]) -> dict[str, KnownPatient]:
        found = {}
        for subject_id in dict.fromkeys(subject_ids):
            patient = await uow.patients.find(subject_id)
            if patient is not None:
                found[subject_id] = KnownPatient(subject_id, patient.sex, patient.age_years,  # type: ignore[arg-type]
                                                 patient.enrolled_on)
        return found

    async def index_results(self, uow: UnitOfWork, rows: Sequence[tuple[str, str]]) -> None:
        index = self.tables(uow).result_index
        for result_id, subject_id in rows:
            if result_id in index:
                raise ValueError(f"result id {result_id} is indexed already")  # the SQL primary key
            index[result_id] = subject_id

    async def result_ids_of(self, uow: UnitOfWork, subject_id: str) -> list[str]:
        return [r for r, s in self.tables(uow).result_index.items() if s == subject_id]

    async def park(self, uow: UnitOfWork, parked: Sequence[ParkedResult]) -> None:
        tables = self.tables(uow)
        held = {(p.source, p.message_id, p.result_id) for p in tables.parked.values()}
        for item in parked:
            key = (item.source, item.message_id, item.result_id)
            if key not in held:
                held.add(key)
                tables.parked[tables.next_id] = replace(item, id=tables.next_id)
                tables.next_id += 1

    async def take_parked_for(self, uow: UnitOfWork, subject_ids: Sequence[str]) -> list[ParkedResult]:
        wanted = set(subject_ids)
        return self._take(uow, [p for p in self.tables(uow).parked.values() if p.subject_id in wanted])

    async def take_parked_of_known(self, uow: UnitOfWork) -> list[ParkedResult]:
        parked = list(self.tables(uow).parked.values())
        return self._take(uow, [p for p in parked if await uow.patients.find(p.subject_id) is not None])

    async def take_parked_before(self, uow: UnitOfWork, moment: datetime) -> list[ParkedResult]:
        return self._take(uow, [p for p in self.tables(uow).parked.values() if p.parked_at < moment])

    def _take(self, uow: UnitOfWork, taken: list[ParkedResult]) -> list[ParkedResult]:
        parked = self.tables(uow).parked
        for item in taken:
            del parked[item.id]
        return sorted(taken, key=lambda item: item.id)

    async def parked_for(self, uow: UnitOfWork, subject_id: str) -> list[ParkedResult]:
        return sorted((p for p in self.tables(uow).parked.values() if p.subject_id == subject_id), key=lambda p: p.id)

    async def parked_count(self, uow: UnitOfWork) -> int:
        return len(self.tables(uow).parked)

    async def log_rejections(self, uow: UnitOfWork, rows: Sequence[LoggedRejection]) -> None:
        self.tables(uow).rejections.extend(rows)

    async def rejections(
        self, uow: UnitOfWork, *, limit: int, source: str | None = None, code: str | None = None
    ) -> list[LoggedRejection]:
        rows = [r for r in reversed(self.tables(uow).rejections)
                if (not source or r.source == source) and (not code or r.code == code)]
        return rows[:limit]

    async def publish_also(self, uow: UnitOfWork, rows: Sequence[dict[str, Any]]) -> None:
        self.tables(uow).also_published.extend(rows)

    async def delete_about(self, uow: UnitOfWork, subject_ids: Sequence[str]) -> None:
        tables, erased = self.tables(uow), set(subject_ids)
        tables.parked = {i: p for i, p in tables.parked.items() if p.subject_id not in erased}
        tables.rejections = [r for r in tables.rejections if r.subject_id not in erased]

    async def request_purges(self, uow: UnitOfWork, subject_ids: Sequence[str], now: datetime) -> None:
        purges = self.tables(uow).purges
        for subject_id in subject_ids:
            purges.setdefault(subject_id, PurgeJob(subject_id, now, deleted=dict.fromkeys(PURGE_TARGETS, 0)))

    async def start_purges(self, uow: UnitOfWork, limit: int) -> list[str]:
        purges = self.tables(uow).purges
        pending = sorted((j for j in purges.values() if j.done_at is None), key=lambda j: j.requested_at)[:limit]
        for job in pending:
            purges[job.subject_id] = replace(job, attempts=job.attempts + 1)
        return [job.subject_id for job in pending]

    async def finish_purges(self, uow: UnitOfWork, subject_ids: Sequence[str], now: datetime) -> None:
        self._change(uow, subject_ids, done_at=now, last_error=None)

    async def fail_purges(self, uow: UnitOfWork, subject_ids: Sequence[str], error: str) -> None:
        self._change(uow, subject_ids, last_error=error)

    async def count_purged(self, uow: UnitOfWork, target: str, deleted: Mapping[str, int]) -> None:
        purges = self.tables(uow).purges
        for subject_id, count in deleted.items():
            if (job := purges.get(subject_id)) is not None:
                purges[subject_id] = replace(job, deleted={**job.deleted, target: job.deleted[target] + count})

    def _change(self, uow: UnitOfWork, subject_ids: Sequence[str], **values: Any) -> None:
        purges = self.tables(uow).purges
        for subject_id in subject_ids:
            if (job := purges.get(subject_id)) is not None:
                purges[subject_id] = replace(job, **values)

    async def pending_purges(self, uow: UnitOfWork) -> int:
        return sum(job.done_at is None for job in self.tables(uow).purges.values())

    async def purges(self, uow: UnitOfWork, limit: int) -> list[PurgeJob]:
        return sorted(self.tables(uow).purges.values(), key=lambda job: job.requested_at, reverse=True)[:limit]
