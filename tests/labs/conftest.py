"""Fixtures for the labs adapter tests: a migrated labs database per backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import date, timedelta
from pathlib import Path

import pytest

from contracts.enrollment import PatientEnrolled
from services.labs.consumers import enrollment_handler
from services.labs.ingest import Labs
from services.labs.queries import SqlLabsStore
from shared.consumer import InboundMessage
from shared.database import migrate
from shared.events import CommandContext, Envelope
from shared.store import EventStore, open_store
from tests.conftest import drop_database, new_database_url


@pytest.fixture
async def labs_store(backend: str, tmp_path: Path) -> AsyncIterator[EventStore]:
    url = new_database_url(backend, tmp_path, "labs")
    await asyncio.to_thread(migrate, "labs", url)
    store = open_store(url, subject_for=lambda e: f"test.labs.{e.event_type}")
    yield store
    await store.close()
    await drop_database(url)


def enrolled_message(subject_id: str, *, sex: str = "F", age_years: int = 58,
                     enrolled_on: date = date(2014, 3, 2), sequence: int = 1) -> InboundMessage:
    event = PatientEnrolled(subject_id=subject_id, sex=sex, age_years=age_years, weight_kg=60.0, group="A",
                            enrolled_on=enrolled_on, baseline_egfr=27.0, lee_grade="IV")
    envelope = Envelope.wrap(event, stream_id=f"patient-{subject_id}", stream_version=1, context=CommandContext())
    return InboundMessage(
        subject="t.enrollment.PatientEnrolled", data=envelope.model_dump_json().encode(), headers={},
        message_id=str(envelope.event_id), delivery=1, stream="T_ENROLLMENT", stream_sequence=sequence,
    )


def sql_labs(*, unknown_patient_wait: float = 86_400, rejected_also_on: str | None = None) -> Labs:
    """The labs use cases' dependencies on the SQL tables, with these settings."""
    return Labs(SqlLabsStore(), timedelta(seconds=unknown_patient_wait), rejected_also_on)


async def enroll(store: EventStore, labs: Labs, subject_id: str, **fields) -> None:  # type: ignore[no-untyped-def]
    async with store.transaction() as uow:
        await enrollment_handler(labs)(uow, [enrolled_message(subject_id, **fields)])
