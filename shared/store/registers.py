"""The registers every service keeps beside its events (``known_patients`` and
``erased_subjects`` in shared/schema.py), as a unit of work offers them: ``uow.patients`` and
``uow.erased``. Typed methods rather than a connection, so the shared code that keeps them
(shared/patients.py, shared/erasures.py) runs on every backend and in the caller's transaction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime


@dataclass(frozen=True)
class EnrolledPatient:
    subject_id: str
    group: str
    sex: str
    age_years: int
    enrolled_on: date


class PatientRegister(ABC):
    """The patients this service learned of from enrollment's events."""

    @abstractmethod
    async def remember(self, patients: Sequence[EnrolledPatient]) -> None:
        """Record them; a patient already recorded keeps their first record."""

    @abstractmethod
    async def find(self, subject_id: str) -> EnrolledPatient | None: ...

    @abstractmethod
    async def remove(self, subject_ids: Sequence[str]) -> None: ...


class ErasedRegister(ABC):
    """The subjects whose data this service learned were erased."""

    @abstractmethod
    async def remember(self, subject_ids: Sequence[str], erased_at: datetime) -> None:
        """Record them as erased at ``erased_at``; a subject erased before keeps its first time."""

    @abstractmethod
    async def all(self) -> list[str]:
        """Every subject recorded, oldest erasure first (then by id)."""
