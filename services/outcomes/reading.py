"""What one request reads: the projection as it is now, as a lock froze it, or as it stood at
an ``as_of`` time (docs/time-travel.md). The routes ask a :class:`ProjectionView` for rows and
never know which of the three answers: :class:`SqlView` reads the served generation or a lock's
frozen one in one database snapshot; :class:`ReplayedView` holds an ``as_of`` replay in memory
(:mod:`services.outcomes.time_travel`) and answers with the same orderings as the SQL queries.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Collection
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from services.outcomes.domain import PatientFacts, PatientOutcome
from services.outcomes.projector import ProjectedPatient, ProjectionChanges
from services.outcomes.queries import Freshness, OutcomesQueries, PatientRecord, TimelineEntry


class ProjectionView(ABC):
    """The rows an answer is computed from, and how fresh they are (``freshness``)."""

    freshness: Freshness

    @abstractmethod
    async def outcomes(self, group: str | None = None) -> list[PatientOutcome]:
        """Every enrolled patient's values (of one group, if given), by subject id."""

    @abstractmethod
    async def facts(self, group: str) -> list[PatientFacts]: ...

    @abstractmethod
    async def patient(self, subject_id: str) -> PatientRecord | None:
        """The patient's row and timeline (oldest first), or None if no event named them."""

    @abstractmethod
    async def enrolled_records(self, kinds: Collection[str]) -> list[PatientRecord]:
        """Enrolled patients with their timeline rows of ``kinds`` in the order recorded."""


class SqlView(ProjectionView):
    """A generation of the projection tables, read in the caller's snapshot: the served one
    (``generation`` None) or a lock's frozen one."""

    def __init__(
        self, queries: OutcomesQueries, connection: AsyncConnection, freshness: Freshness, generation: int | None
    ) -> None:
        self.queries, self.connection, self.freshness, self.generation = queries, connection, freshness, generation

    async def outcomes(self, group: str | None = None) -> list[PatientOutcome]:
        return await self.queries.outcomes(self.connection, group, self.generation)

    async def facts(self, group: str) -> list[PatientFacts]:
        return await self.queries.facts(self.connection, group, self.generation)

    async def patient(self, subject_id: str) -> PatientRecord | None:
        return await self.queries.patient(self.connection, subject_id, self.generation)

    async def enrolled_records(self, kinds: Collection[str]) -> list[PatientRecord]:
        return await self.queries.enrolled_records(self.connection, kinds, self.generation)


class ReplayedView(ProjectionView):
    """The projection a replay of the log built in memory (``changes``: every patient applied,
    their timeline rows and each stream's mark), serialised as the tables hold it so that an
    answer is the one the SQL rows of the same events would give."""

    def __init__(self, changes: ProjectionChanges, freshness: Freshness) -> None:
        self.freshness = freshness
        self.rows: dict[str, dict[str, Any]] = {
            subject_id: changes.patients[subject_id].row() for subject_id in sorted(changes.patients)
        }
        unique = {row["event_id"]: row for row in reversed(changes.timeline)}  # the first of a redelivery
        self.timeline = [_entry(row) for row in unique.values()]

    def _records(self, subject_id: str, entries: list[tuple[str, TimelineEntry]]) -> PatientRecord:
        row = self.rows[subject_id]
        return PatientRecord(
            patient=ProjectedPatient.from_row(row["facts_json"], row["egfr_versions_json"], row["report_versions_json"]),
            outcome=PatientOutcome.model_validate_json(row["outcome_json"]) if row["outcome_json"] else None,
            timeline=[entry for owner, entry in entries if owner == subject_id],
        )

    async def outcomes(self, group: str | None = None) -> list[PatientOutcome]:
        return [
            PatientOutcome.model_validate_json(row["outcome_json"]) for row in self.rows.values()
            if row["outcome_json"] is not None and (group is None or row["group"] == group)
        ]

    async def facts(self, group: str) -> list[PatientFacts]:
        return [PatientFacts.model_validate_json(row["facts_json"]) for row in self.rows.values() if row["group"] == group]

    async def patient(self, subject_id: str) -> PatientRecord | None:
        if subject_id not in self.rows:
            return None
        entries = sorted(self.timeline, key=lambda item: (item[1].occurred_on, item[1].recorded_at, item[1].event_id))
        return self._records(subject_id, entries)

    async def enrolled_records(self, kinds: Collection[str]) -> list[PatientRecord]:
        entries = sorted((item for item in self.timeline if item[1].kind in kinds),
                         key=lambda item: (item[1].recorded_at, item[1].event_id))
        return [self._records(s, entries) for s, row in self.rows.items() if row["outcome_json"] is not None]


def _entry(row: dict[str, Any]) -> tuple[str, TimelineEntry]:
    """(subject id, entry) of a timeline row; the event id sorts as the SQL uuid column does."""
    return row["subject_id"], TimelineEntry(
        str(row["event_id"]), row["occurred_on"], row["recorded_at"], row["kind"], row["source"],
        json.loads(row["detail_json"]),
    )
