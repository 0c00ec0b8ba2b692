"""The port through which the labs use cases (:mod:`services.labs.handlers`) keep what labs holds
beside its events: the result-id index, parked results, the rejection log, the inbound purge
jobs, and the second outbox row of each refusal.

Two implementations: SQL (:mod:`services.labs.queries`, the tables of :mod:`services.labs.tables`)
and in memory (:mod:`services.labs.labs_memory`, for handler tests on the in-memory event store).
Every method works in the caller's unit of work, so what it writes commits with the events of the
same use case, or not at all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from services.labs.domain import KnownPatient
from shared.store import UnitOfWork


@dataclass(frozen=True, slots=True)
class ParkedResult:
    """A result held until its subject is enrolled; ``payload`` is the ``IncomingResult`` JSON
    (its raw copy redacted); ``id`` orders arrivals (0 until stored)."""

    source: str
    message_id: str
    result_id: str
    subject_id: str
    payload: str
    parked_at: datetime
    id: int = 0


@dataclass(frozen=True, slots=True)
class LoggedRejection:
    """A row of the rejection log (``GET /v1/rejections``)."""

    event_id: UUID
    recorded_at: datetime
    source: str
    code: str
    reason: str
    message_id: str | None
    subject_id: str | None
    raw_preview: str


@dataclass(frozen=True, slots=True)
class PurgeJob:
    """The purge of an erased subject's lab messages in clear from the broker (purge.py);
    ``deleted``: messages deleted per target label."""

    subject_id: str
    requested_at: datetime
    done_at: datetime | None = None
    attempts: int = 0
    last_error: str | None = None
    deleted: Mapping[str, int] = field(default_factory=dict)


PURGE_TARGETS = ("labs_results", "labs_rejected", "labs_events")
"""The labels of the places a purge deletes from (purge.targets), each counted in a job."""


class LabsStore(ABC):
    """What labs keeps beside its events, in a unit of work."""

    # --- patients and results

    @abstractmethod
    async def known_patients(self, uow: UnitOfWork, subject_ids: Sequence[str]) -> dict[str, KnownPatient]:
        """Those of these subjects the service learned enrolled, by subject id."""

    @abstractmethod
    async def index_results(self, uow: UnitOfWork, rows: Sequence[tuple[str, str]]) -> None:
        """Record new result ids as ``(result_id, subject_id)``."""

    @abstractmethod
    async def result_ids_of(self, uow: UnitOfWork, subject_id: str) -> list[str]: ...

    # --- parked results

    @abstractmethod
    async def park(self, uow: UnitOfWork, parked: Sequence[ParkedResult]) -> None:
        """Hold these; the same (source, message id, result id) parked again is held once."""

    @abstractmethod
    async def take_parked_for(self, uow: UnitOfWork, subject_ids: Sequence[str]) -> list[ParkedResult]:
        """Remove and return what is parked for these subjects."""

    @abstractmethod
    async def take_parked_of_known(self, uow: UnitOfWork) -> list[ParkedResult]:
        """Remove and return what is parked for subjects the service now knows enrolled."""

    @abstractmethod
    async def take_parked_before(self, uow: UnitOfWork, moment: datetime) -> list[ParkedResult]:
        """Remove and return what was parked before ``moment``."""

    @abstractmethod
    async def parked_for(self, uow: UnitOfWork, subject_id: str) -> list[ParkedResult]:
        """What is parked for a subject, oldest first (nothing removed)."""

    @abstractmethod
    async def parked_count(self, uow: UnitOfWork) -> int: ...

    # --- refusals

    @abstractmethod
    async def log_rejections(self, uow: UnitOfWork, rows: Sequence[LoggedRejection]) -> None: ...

    @abstractmethod
    async def rejections(
        self, uow: UnitOfWork, *, limit: int, source: str | None = None, code: str | None = None
    ) -> list[LoggedRejection]:
        """The newest ``limit`` rows first, optionally of one source and code."""

    @abstractmethod
    async def publish_also(self, uow: UnitOfWork, rows: Sequence[dict[str, Any]]) -> None:
        """Outbox rows beyond the store's own (``event_id``, ``subject``, ``body``, ``created_at``):
        each refusal's copy on the service's ``<prefix>.labs.LabResultRejected``."""

    # --- erasure

    @abstractmethod
    async def delete_about(self, uow: UnitOfWork, subject_ids: Sequence[str]) -> None:
        """Delete the parked results and rejection-log rows about these (erased) subjects."""

    @abstractmethod
    async def request_purges(self, uow: UnitOfWork, subject_ids: Sequence[str], now: datetime) -> None:
        """A pending purge job for each subject; one already requested keeps its job."""

    @abstractmethod
    async def start_purges(self, uow: UnitOfWork, limit: int) -> list[str]:
        """Up to ``limit`` pending jobs, oldest first, each counted as one more attempt."""

    @abstractmethod
    async def finish_purges(self, uow: UnitOfWork, subject_ids: Sequence[str], now: datetime) -> None: ...

    @abstractmethod
    async def fail_purges(self, uow: UnitOfWork, subject_ids: Sequence[str], error: str) -> None: ...

    @abstractmethod
    async def count_purged(self, uow: UnitOfWork, target: str, deleted: Mapping[str, int]) -> None:
        """Add deletions from ``target`` (a :data:`PURGE_TARGETS` label) to the subjects' jobs."""

    @abstractmethod
    async def pending_purges(self, uow: UnitOfWork) -> int: ...

    @abstractmethod
    async def purges(self, uow: UnitOfWork, limit: int) -> list[PurgeJob]:
        """The newest ``limit`` jobs first."""
