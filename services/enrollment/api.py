"""Enrollment's HTTP adapter: each route parses the contract's request, runs its use case
(services/enrollment/handlers.py) in one transaction, and answers with what was recorded."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Path, Request, Response

from services.enrollment import handlers
from services.enrollment.domain import (
    AdverseEvent,
    EnrollPatient,
    PatientView,
    RecordBiopsy,
    RecordClinicalEvent,
    ReportAdverseEvent,
    fold,
    patient_view,
)
from services.enrollment.key_purge import KeyPurger
from shared.http import command_context
from shared.service import Service

AE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
"""A site's adverse event id: 1–64 letters, digits and ``._:-`` (it is kept in the event and
echoed in answers, so it is bounded and cannot carry free text)."""


class AdverseEventOut(AdverseEvent):
    """An adverse event as it stands after a report, and what the report did: ``reported``
    (201), ``updated`` by a follow-up, or ``unchanged`` (a resend; ``event_id`` null)."""

    subject_id: str
    change: handlers.AdverseEventChange
    event_id: UUID | None


def routes(service: Service, key_purger: KeyPurger) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["enrollment"])

    @router.post("/patients", status_code=201, response_model=PatientView, summary="Enroll a patient")
    async def enroll(command: EnrollPatient, request: Request) -> PatientView:
        use_case = handlers.Enroll(command, context=command_context(request))
        await handlers.create_patient_key(use_case, service.vault)  # before any payload needs it
        return await service.transact(partial(handlers.enroll, use_case))

    @router.post("/patients/{subject_id}/events", status_code=201, summary="Record dialysis, transplant, death or withdrawal")
    async def record_event(subject_id: str, command: RecordClinicalEvent, request: Request) -> dict[str, Any]:
        use_case = handlers.RecordEvent(subject_id, command, context=command_context(request))
        recorded = await service.transact(partial(handlers.record_clinical_event, use_case))
        return {"subject_id": subject_id, "type": command.type, "on": command.on, "event_id": recorded.event_id}

    @router.post("/patients/{subject_id}/biopsies", status_code=201, summary="Record follow-up biopsy findings")
    async def record_biopsy(subject_id: str, command: RecordBiopsy, request: Request) -> dict[str, Any]:
        use_case = handlers.RecordBiopsyFindings(subject_id, command, context=command_context(request))
        recorded = await service.transact(partial(handlers.record_biopsy, use_case))
        return {"subject_id": subject_id, "performed_on": command.performed_on, "event_id": recorded.event_id}

    @router.put(
        "/patients/{subject_id}/adverse-events/{ae_id}",
        status_code=201,
        response_model=AdverseEventOut,
        summary="Report an adverse event (201), or follow it up (200; the latest report is its state); "
                "the same report again changes nothing (200)",
        responses={200: {"model": AdverseEventOut, "description": "A follow-up report, or the same report again"}},
    )
    async def report_adverse_event(
        subject_id: str,
        ae_id: Annotated[str, Path(pattern=AE_ID_PATTERN)],
        command: ReportAdverseEvent,
        request: Request,
        response: Response,
    ) -> AdverseEventOut:
        use_case = handlers.ReportAdverse(subject_id, ae_id, command, context=command_context(request))
        recorded = await service.transact(partial(handlers.report_adverse_event, use_case))
        if recorded.change != "reported":
            response.status_code = 200
        return AdverseEventOut(
            **recorded.adverse_event.model_dump(),
            subject_id=subject_id,
            change=recorded.change,
            event_id=recorded.event.event_id if recorded.event is not None else None,
        )

    @router.post("/patients/{subject_id}/erasure", status_code=201,
                 summary="Erase a withdrawn patient's data (crypto-shredding); repeated: 200, same event")
    async def erase(subject_id: str, request: Request, response: Response) -> dict[str, Any]:
        """Record ``PatientDataErased`` (and the subject as erased, shared/erasures.py), then
        delete the patient's data key. The event commits first, so the erasure is never lost:
        a key deletion that fails answers ``"key_purge": "pending"`` and the key purge job
        finishes it (services/enrollment/key_purge.py). Idempotent: a repeated call answers 200
        with the first erasure and deletes the key again if it is still there."""
        use_case = handlers.Erase(subject_id, context=command_context(request))
        erasure = await service.transact(partial(handlers.erase, use_case))
        if not erasure.first:
            response.status_code = 200
        key_purge = await key_purger.purge(subject_id, erasure.event.event_id)
        return {**erasure.event.payload, "event_id": erasure.event.event_id, "key_purge": key_purge}

    @router.get("/patients/{subject_id}", response_model=PatientView, summary="The patient, from their own stream")
    async def get_patient(subject_id: str) -> PatientView:
        history = await service.store.read_stream(handlers.stream_id(subject_id))
        return patient_view(fold(e.decode() for e in history), subject_id)

    return router
