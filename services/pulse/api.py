"""Pulse administration's HTTP adapter: contract commands in, events out through the service shell.

One stream per subject, ``pulse-<subject_id>``, holding ``PulseDoseAdministered`` and the
``ProtocolDeviationDetected`` events each dose raised (published on ``<prefix>.pulse.<EventType>``).
"""

from __future__ import annotations

from datetime import date
from uuid import UUID

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from contracts.deviations import DeviationCode
from services.clinical import (
    ClinicalSettings,
    check_within_study,
    count_deviations,
    deviations_of,
    known_patient,
    study_end,
)
from services.pulse.domain import (
    AdministerPulseDose,
    KnownPatient,
    PulseCycles,
    cycles,
    decide_administer_pulse_dose,
    fold,
)
from shared.clinical_dates import utc_today
from shared.errors import NotFound
from shared.events import DomainEvent
from shared.http import command_context
from shared.patients import find_patient
from shared.service import Service


def stream_id(subject_id: str) -> str:
    return f"pulse-{subject_id}"


class DeviationFound(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: DeviationCode
    detail: str


class RecordedDose(BaseModel):
    """The dose as recorded, its mg/kg, and the protocol deviations it raised (maybe none)."""

    model_config = ConfigDict(frozen=True)

    subject_id: str
    cycle: int
    day: int
    given_on: date
    dose_mg: float
    weight_kg: float
    mg_per_kg: float
    event_id: UUID
    deviations: list[DeviationFound]


def routes(service: Service, settings: ClinicalSettings) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["pulse"])

    @router.post(
        "/patients/{subject_id}/pulse-doses",
        status_code=201,
        response_model=RecordedDose,
        summary="Record a methylprednisolone pulse dose (always recorded; deviations flagged)",
        responses={404: {"description": "no such enrolled patient (after waiting for enrollment)"}},
    )
    async def administer(subject_id: str, command: AdministerPulseDose, request: Request) -> RecordedDose:
        enrolled = await known_patient(service.store, subject_id, settings)
        patient = None
        if enrolled is not None:
            patient = KnownPatient(
                subject_id=enrolled.subject_id,
                group=enrolled.group,  # type: ignore[arg-type]  # a Group, stored as text
                enrolled_on=enrolled.enrolled_on,
            )
        end = await study_end(service.store, subject_id)
        today = utc_today()

        def decide(history: list[DomainEvent]) -> list[DomainEvent]:
            new_events = decide_administer_pulse_dose(fold(history), command, patient, subject_id, today=today)
            check_within_study(end, subject_id, command.given_on, "a pulse dose")
            return new_events

        envelopes = await service.execute(stream_id(subject_id), decide, command_context(request))
        count_deviations(envelopes)
        dose = envelopes[0]
        return RecordedDose.model_validate(
            {**dose.payload, "event_id": dose.event_id, "deviations": deviations_of(envelopes)}
        )

    @router.get(
        "/patients/{subject_id}/pulse-cycles",
        response_model=PulseCycles,
        summary="The patient's pulse course by cycle, with its deviations",
    )
    async def get_cycles(subject_id: str) -> PulseCycles:
        history = await service.store.read_stream(stream_id(subject_id))
        if not history:
            if await find_patient(service.store, subject_id) is None:
                raise NotFound(f"no patient is enrolled with subject id {subject_id}")
        view = cycles(fold(envelope.decode() for envelope in history))
        return view.model_copy(update={"subject_id": subject_id})

    return router
