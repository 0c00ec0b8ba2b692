"""Enrollment's HTTP adapter: contract commands in, events out through the service shell."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from services.enrollment.domain import (
    EnrollPatient,
    PatientView,
    RecordBiopsy,
    RecordClinicalEvent,
    decide_enroll_patient,
    decide_record_biopsy,
    decide_record_clinical_event,
    fold,
    patient_view,
)
from shared.service import Service, command_context


def stream_id(subject_id: str) -> str:
    return f"patient-{subject_id}"


def routes(service: Service) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["enrollment"])

    @router.post("/patients", status_code=201, response_model=PatientView, summary="Enroll a patient")
    async def enroll(command: EnrollPatient, request: Request) -> PatientView:
        await service.execute(
            stream_id(command.subject_id),
            lambda history: decide_enroll_patient(fold(history), command),
            command_context(request),
        )
        return await _view(command.subject_id)

    @router.post("/patients/{subject_id}/events", status_code=201, summary="Record dialysis, transplant, death or withdrawal")
    async def record_event(subject_id: str, command: RecordClinicalEvent, request: Request) -> dict[str, Any]:
        envelopes = await service.execute(
            stream_id(subject_id),
            lambda history: decide_record_clinical_event(fold(history), command, subject_id),
            command_context(request),
        )
        return {"subject_id": subject_id, "type": command.type, "on": command.on, "event_id": envelopes[0].event_id}

    @router.post("/patients/{subject_id}/biopsies", status_code=201, summary="Record follow-up biopsy findings")
    async def record_biopsy(subject_id: str, command: RecordBiopsy, request: Request) -> dict[str, Any]:
        envelopes = await service.execute(
            stream_id(subject_id),
            lambda history: decide_record_biopsy(fold(history), command, subject_id),
            command_context(request),
        )
        return {"subject_id": subject_id, "performed_on": command.performed_on, "event_id": envelopes[0].event_id}

    @router.get("/patients/{subject_id}", response_model=PatientView, summary="The patient, from their own stream")
    async def get_patient(subject_id: str) -> PatientView:
        return await _view(subject_id)

    async def _view(subject_id: str) -> PatientView:
        history = await service.store.read_stream(stream_id(subject_id))
        return patient_view(fold(e.decode() for e in history), subject_id)

    return router
