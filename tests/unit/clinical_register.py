"""What pulse and cells learn from enrollment, put straight into an in-memory store for their
handler tests: a patient in the register, a death or withdrawal in the private status stream."""

from __future__ import annotations

from datetime import date

from contracts.enrollment import PatientDied, PatientWithdrawn
from services.clinical import status_stream_id
from shared.store import EventStore
from shared.store.registers import EnrolledPatient

ENROLLED_ON = date(2014, 3, 2)


async def learned_enrollment(store: EventStore, subject_id: str, group: str = "A") -> None:
    async with store.transaction() as uow:
        await uow.patients.remember([EnrolledPatient(subject_id, group, "F", 58, ENROLLED_ON)])


async def learned_end_of_study(store: EventStore, subject_id: str, *, died_on: date | None = None,
                               withdrawn_on: date | None = None) -> None:
    facts = [PatientWithdrawn(subject_id=subject_id, on=withdrawn_on)] if withdrawn_on else []
    facts += [PatientDied(subject_id=subject_id, on=died_on)] if died_on else []
    async with store.transaction() as uow:
        await uow.append(status_stream_id(subject_id), facts, await uow.stream_version(status_stream_id(subject_id)))
