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
from datetime import date

from shared.consumer import InboundMessage
from shared.erasures import remember_erased
from shared.events import Envelope
from shared.keys import KeyErased
from shared.store import EventStore, UnitOfWork
from shared.store.registers import EnrolledPatient

ENROLLED = "PatientEnrolled"
ERASED = "PatientDataErased"


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
    await uow.patients.remember(enrolled)
    return enrolled


def readable(messages: list[InboundMessage]) -> Iterator[tuple[InboundMessage, Envelope]]:
    """Each message with its envelope, except those about an erased patient (their key is
    deleted: nothing can be read from them, and nothing should be — they are skipped)."""
    for message in messages:
        try:
            yield message, message.envelope()
        except KeyErased:
            continue


async def drop_erased_patients(uow: UnitOfWork, messages: list[InboundMessage]) -> list[str]:
    """Batch handler step: drop every patient whose ``PatientDataErased`` is among ``messages``
    from the register, and remember them as erased (their key leaves this process's mirror at
    once, and stays out of it after a restart: shared/erasures.py). Returns their subject ids."""
    erased = [envelope.payload["subject_id"] for _, envelope in readable(messages) if envelope.event_type == ERASED]
    await uow.patients.remove(erased)
    await remember_erased(uow, erased)
    return erased


async def find_patient(store: EventStore, subject_id: str) -> EnrolledPatient | None:
    """The patient if the service has learned of them (no waiting: a read's answer)."""
    async with store.transaction() as uow:
        return await uow.patients.find(subject_id)


async def wait_for_patient(store: EventStore, subject_id: str, timeout: float) -> EnrolledPatient | None:
    """The patient once the service has learned of them, polling up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        patient = await find_patient(store, subject_id)
        if patient is not None or time.monotonic() >= deadline:
            return patient
        await asyncio.sleep(0.05)
