"""The register of enrolled patients that pulse, cells and labs keep from enrollment's events.

Why a local copy: a service never reads another service's database or calls it on the request
path, so each learns who exists (and the sex, age and dates it needs) from ``PatientEnrolled``
events. The copy may lag a moment behind enrollment; :func:`wait_for_patient` bridges that gap
for a command that arrives before the enrollment event has (no 404 race).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.consumer import InboundMessage
from shared.erasures import remember_erased
from shared.events import Envelope
from shared.keys import KeyErased
from shared.schema import known_patients
from shared.store import EventStore, UnitOfWork

ENROLLED = "PatientEnrolled"
ERASED = "PatientDataErased"


@dataclass(frozen=True)
class EnrolledPatient:
    subject_id: str
    group: str
    sex: str
    age_years: int
    enrolled_on: date


async def remember_enrollments(uow: UnitOfWork, messages: list[InboundMessage]) -> list[EnrolledPatient]:
    """Batch handler step: record every ``PatientEnrolled`` among ``messages``; returns them."""
    enrolled = []
    for _, envelope in readable(messages):
        if envelope.event_type != ENROLLED:
            continue
        payload = envelope.payload
        enrolled.append(
            EnrolledPatient(
                subject_id=payload["subject_id"],
                group=payload["group"],
                sex=payload["sex"],
                age_years=int(payload["age_years"]),
                enrolled_on=date.fromisoformat(payload["enrolled_on"]),
            )
        )
    if enrolled:
        insert = pg_insert if uow.store.is_postgres else sqlite_insert
        rows = [patient.__dict__ for patient in enrolled]
        await uow.connection.execute(insert(known_patients).values(rows).on_conflict_do_nothing())
    return enrolled


def readable(messages: list[InboundMessage]) -> Iterator[tuple[InboundMessage, Envelope]]:
    """Each message with its envelope, except those about an erased patient (their key is
    deleted: nothing can be read from them, and nothing should be — they are skipped)."""
    for message in messages:
        try:
            yield message, message.envelope()
        except KeyErased:
            continue


async def forget_erased(uow: UnitOfWork, messages: list[InboundMessage]) -> list[str]:
    """Batch handler step: drop every patient whose ``PatientDataErased`` is among ``messages``
    from the register, and remember them as erased (their key leaves this process's mirror at
    once, and stays out of it after a restart: shared/erasures.py). Returns their subject ids."""
    erased = [envelope.payload["subject_id"] for _, envelope in readable(messages) if envelope.event_type == ERASED]
    if erased:
        await uow.connection.execute(delete(known_patients).where(known_patients.c.subject_id.in_(erased)))
        await remember_erased(uow, erased)
    return erased


async def find_patient(connection: AsyncConnection, subject_id: str) -> EnrolledPatient | None:
    row = (await connection.execute(select(known_patients).where(known_patients.c.subject_id == subject_id))).first()
    return EnrolledPatient(**row._mapping) if row else None


async def wait_for_patient(store: EventStore, subject_id: str, timeout: float) -> EnrolledPatient | None:
    """The patient once the service has learned of them, polling up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        async with store.engine.connect() as connection:
            patient = await find_patient(connection, subject_id)
        if patient is not None or time.monotonic() >= deadline:
            return patient
        await asyncio.sleep(0.05)
