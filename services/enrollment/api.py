"""Enrollment's HTTP adapter: contract commands in, events out through the service shell."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from services.enrollment.domain import (
    EnrollPatient,
    PatientView,
    RecordBiopsy,
    RecordClinicalEvent,
    check_enrollable,
    decide_enroll_patient,
    decide_erase_patient,
    decide_record_biopsy,
    decide_record_clinical_event,
    fold,
    patient_view,
)
from services.enrollment.key_purge import KeyPurger
from shared.clinical_dates import utc_today
from shared.erasures import remember_erased
from shared.errors import Conflict
from shared.http import command_context
from shared.keys import KeyErased
from shared.service import Service
from shared.store import ConcurrencyError


def stream_id(subject_id: str) -> str:
    return f"patient-{subject_id}"


def erasure_stream_id(subject_id: str) -> str:
    """The erasure event's own stream: recorded in clear (shared.sealing), apart from the
    patient's sealed stream, which is unreadable once the key is gone."""
    return f"erasure-{subject_id}"


def routes(service: Service, key_purger: KeyPurger) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["enrollment"])

    @router.post("/patients", status_code=201, response_model=PatientView, summary="Enroll a patient")
    async def enroll(command: EnrollPatient, request: Request) -> PatientView:
        today = utc_today()
        check_enrollable(command, today=today)
        try:
            await service.vault.create(command.subject_id)  # before any payload needs it
        except KeyErased:
            raise Conflict(
                f"subject {command.subject_id} was erased and cannot be enrolled again; use a new pseudonym",
                code="erased",
            ) from None
        await service.execute(
            stream_id(command.subject_id),
            lambda history: decide_enroll_patient(fold(history), command, today=today),
            command_context(request),
        )
        return await _view(command.subject_id)

    @router.post("/patients/{subject_id}/events", status_code=201, summary="Record dialysis, transplant, death or withdrawal")
    async def record_event(subject_id: str, command: RecordClinicalEvent, request: Request) -> dict[str, Any]:
        envelopes = await service.execute(
            stream_id(subject_id),
            lambda history: decide_record_clinical_event(fold(history), command, subject_id, today=utc_today()),
            command_context(request),
        )
        return {"subject_id": subject_id, "type": command.type, "on": command.on, "event_id": envelopes[0].event_id}

    @router.post("/patients/{subject_id}/biopsies", status_code=201, summary="Record follow-up biopsy findings")
    async def record_biopsy(subject_id: str, command: RecordBiopsy, request: Request) -> dict[str, Any]:
        envelopes = await service.execute(
            stream_id(subject_id),
            lambda history: decide_record_biopsy(fold(history), command, subject_id, today=utc_today()),
            command_context(request),
        )
        return {"subject_id": subject_id, "performed_on": command.performed_on, "event_id": envelopes[0].event_id}

    @router.post("/patients/{subject_id}/erasure", status_code=201,
                 summary="Erase a withdrawn patient's data (crypto-shredding); repeated: 200, same event")
    async def erase(subject_id: str, request: Request, response: Response) -> dict[str, Any]:
        """Record ``PatientDataErased`` (and the subject as erased, shared/erasures.py), then
        delete the patient's data key. The event commits first, so the erasure is never lost:
        a key deletion that fails answers ``"key_purge": "pending"`` and the key purge job
        finishes it (services/enrollment/key_purge.py). Idempotent: a repeated call answers 200
        with the first erasure and deletes the key again if it is still there."""
        context = command_context(request)
        for _ in range(10):
            try:
                async with service.store.transaction() as uow:
                    done = await uow.read_stream(erasure_stream_id(subject_id))
                    if done:
                        erased, response.status_code = done[0], 200
                    else:
                        history = await uow.read_stream(stream_id(subject_id))
                        new_events = decide_erase_patient(fold(e.decode() for e in history), subject_id, utc_today())
                        [erased] = await uow.append(erasure_stream_id(subject_id), new_events, 0, context)
                        await remember_erased(uow, [subject_id])
                break
            except ConcurrencyError:  # a concurrent erasure of the same patient committed first
                continue
        else:
            raise Conflict(f"the erasure of {subject_id} is being recorded concurrently; try again")
        service.wake_relay()
        key_purge = await key_purger.purge(subject_id, erased.event_id)
        return {**erased.payload, "event_id": erased.event_id, "key_purge": key_purge}

    @router.get("/patients/{subject_id}", response_model=PatientView, summary="The patient, from their own stream")
    async def get_patient(subject_id: str) -> PatientView:
        return await _view(subject_id)

    async def _view(subject_id: str) -> PatientView:
        history = await service.store.read_stream(stream_id(subject_id))
        return patient_view(fold(e.decode() for e in history), subject_id)

    return router
