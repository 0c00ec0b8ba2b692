"""The handler steps every service runs on enrollment's events (shared/patients.py,
shared/erasures.py), on every store backend: they reach the registers through the unit of work
only, so the in-memory store runs them too."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime
from uuid import uuid4

import pytest

from shared.consumer import InboundMessage
from shared.erasures import erased_subjects
from shared.events import Envelope
from shared.patients import EnrolledPatient, drop_erased_patients, find_patient, remember_enrollments, wait_for_patient
from shared.store import EventStore
from tests.conftest import STORE_BACKENDS


@pytest.fixture(params=STORE_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def message(event_type: str, subject_id: str, **payload: object) -> InboundMessage:
    now = datetime.now(UTC)
    envelope = Envelope(event_type=event_type, schema_version=1, stream_id=f"patient-{subject_id}", stream_version=1,
                        occurred_at=now, correlation_id=uuid4(), actor="enrollment",
                        payload={"subject_id": subject_id, **payload})
    return InboundMessage(subject=f"t.enrollment.{event_type}", data=envelope.model_dump_json().encode(), headers={},
                          message_id=str(envelope.event_id), delivery=1, stream="T_ENROLLMENT", stream_sequence=1)


def enrolled(subject_id: str) -> InboundMessage:
    return message("PatientEnrolled", subject_id, group="A", sex="F", age_years=58, enrolled_on="2014-03-02")


async def test_enrolled_patients_are_remembered_and_erased_ones_forgotten_for_good(store: EventStore) -> None:
    async with store.transaction() as uow:
        learned = await remember_enrollments(uow, [enrolled("IGA-A-001"), enrolled("IGA-A-002")])
    assert [patient.subject_id for patient in learned] == ["IGA-A-001", "IGA-A-002"]
    assert await find_patient(store, "IGA-A-001") == EnrolledPatient("IGA-A-001", "A", "F", 58, date(2014, 3, 2))

    async with store.transaction() as uow:
        erased = await drop_erased_patients(uow, [message("PatientDataErased", "IGA-A-002", erased_on="2020-01-01"),
                                           enrolled("IGA-A-003")])
        await remember_enrollments(uow, [enrolled("IGA-A-001")])  # redelivered: no second record
    assert erased == ["IGA-A-002"]
    assert await find_patient(store, "IGA-A-002") is None
    assert await wait_for_patient(store, "IGA-A-001", timeout=0) is not None
    assert await erased_subjects(store) == ["IGA-A-002"]


async def test_waiting_for_a_patient_ends_when_enrollment_arrives_or_the_wait_is_over(store: EventStore) -> None:
    assert await wait_for_patient(store, "IGA-A-009", timeout=0.1) is None
    waiting = asyncio.create_task(wait_for_patient(store, "IGA-A-009", timeout=30))
    await asyncio.sleep(0.2)
    async with store.transaction() as uow:
        await remember_enrollments(uow, [enrolled("IGA-A-009")])
    patient = await asyncio.wait_for(waiting, 5)  # found at its next poll, long before its 30 s
    assert patient is not None and patient.subject_id == "IGA-A-009"
