"""Pulse administration's HTTP adapter: parse the contract's request, run the use case
(services/pulse/handlers.py) in one transaction, answer with what was recorded.

One stream per subject, ``pulse-<subject_id>``, holding ``PulseDoseAdministered`` and the
``ProtocolDeviationDetected`` events each dose raised (published on ``<prefix>.pulse.<EventType>``).
"""

from __future__ import annotations

from datetime import date
from functools import partial
from uuid import UUID

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from services.clinical import (
    ClinicalSettings,
    DeviationFound,
    known_patient,
    patient_history,
    recorded_with_deviations,
)
from services.pulse import handlers
from services.pulse.domain import AdministerPulseDose, PulseCycles, cycles, fold
from shared.http import command_context
from shared.service import Service


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
        await known_patient(service.store, subject_id, settings)  # a command right after enrolling waits for it
        use_case = handlers.AdministerDose(subject_id, command, context=command_context(request))
        return recorded_with_deviations(RecordedDose, await service.transact(partial(handlers.administer_dose, use_case)))

    @router.get(
        "/patients/{subject_id}/pulse-cycles",
        response_model=PulseCycles,
        summary="The patient's pulse course by cycle, with its deviations",
    )
    async def get_cycles(subject_id: str) -> PulseCycles:
        history = await patient_history(service.store, handlers.stream_id(subject_id), subject_id)
        return cycles(fold(history)).model_copy(update={"subject_id": subject_id})

    return router
