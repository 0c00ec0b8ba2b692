"""Cell processing's HTTP adapter: harvest → lot → QC release → infusion. Each route parses the
contract's request, runs its use case (services/cells/handlers.py, where the streams are
explained) in one transaction, and answers with what was recorded."""

from __future__ import annotations

from datetime import date
from functools import partial
from uuid import UUID

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from services.cells import handlers
from services.cells.domain import (
    HarvestAdiposeTissue,
    InfuseCells,
    Lot,
    LotView,
    PatientInfusions,
    ReleaseLot,
    fold_lot,
    fold_patient,
    infusions,
)
from services.clinical import (
    ClinicalSettings,
    DeviationFound,
    known_patient,
    patient_history,
    recorded_with_deviations,
)
from shared.errors import Invalid, NotFound
from shared.http import command_context
from shared.service import Service

# --------------------------------------------------------------------------- responses


class LotOut(LotView):
    """A lot as the API shows it: its view plus the subject it was harvested from."""

    subject_id: str


class RecordedInfusion(BaseModel):
    model_config = ConfigDict(frozen=True)

    subject_id: str
    infusion_number: int
    lot_id: str
    given_on: date
    cell_count: float
    event_id: UUID
    deviations: list[DeviationFound]


def lot_out(lot: Lot) -> LotOut:
    return LotOut(subject_id=lot.subject_id, **{name: getattr(lot, name) for name in LotView.model_fields})


# --------------------------------------------------------------------------- routes


def routes(service: Service, settings: ClinicalSettings) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["cells"])

    @router.post(
        "/patients/{subject_id}/harvests",
        status_code=201,
        response_model=LotOut,
        summary="Record an adipose tissue harvest; answers with the new lot",
        responses={404: {"description": "no such enrolled patient (after waiting for enrollment)"}},
    )
    async def harvest(subject_id: str, command: HarvestAdiposeTissue, request: Request) -> LotOut:
        await known_patient(service.store, subject_id, settings)  # a command right after enrolling waits for it
        use_case = handlers.Harvest(subject_id, command, context=command_context(request))
        return lot_out(await service.transact(partial(handlers.harvest, use_case)))

    @router.post(
        "/lots/{lot_id}/release",
        status_code=201,
        response_model=LotOut,
        summary="Record a lot's QC result: released, or failed QC (recorded, then answered 422)",
    )
    async def release(lot_id: str, command: ReleaseLot, request: Request) -> LotOut:
        use_case = handlers.Release(lot_id, command, context=command_context(request))
        released = await service.transact(partial(handlers.release, use_case))
        if released.qc_failure is not None:  # the QC failure is recorded; the release asked for did not happen
            raise Invalid(released.qc_failure, code="QcFailed")
        return lot_out(released.lot)

    @router.post(
        "/patients/{subject_id}/infusions",
        status_code=201,
        response_model=RecordedInfusion,
        summary="Record an infusion of a released lot into the patient it was harvested from",
    )
    async def infuse(subject_id: str, command: InfuseCells, request: Request) -> RecordedInfusion:
        use_case = handlers.Infuse(subject_id, command, context=command_context(request))
        return recorded_with_deviations(RecordedInfusion, await service.transact(partial(handlers.infuse, use_case)))

    @router.get(
        "/patients/{subject_id}/infusions",
        response_model=PatientInfusions,
        summary="The patient's infusions, lots and cell-therapy deviations",
    )
    async def get_infusions(subject_id: str) -> PatientInfusions:
        history = await patient_history(service.store, handlers.patient_stream_id(subject_id), subject_id)
        return infusions(fold_patient(history)).model_copy(update={"subject_id": subject_id})

    @router.get("/lots/{lot_id}", response_model=LotOut, summary="One lot, from its own stream")
    async def get_lot(lot_id: str) -> LotOut:
        lot = fold_lot(envelope.decode() for envelope in await service.store.read_stream(handlers.lot_stream_id(lot_id)))
        if lot.status is None:
            raise NotFound(f"lot {lot_id} does not exist")
        return lot_out(lot)

    return router
