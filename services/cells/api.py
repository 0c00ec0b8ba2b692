"""Cell processing's HTTP adapter: harvest → lot → QC release → infusion, over two aggregates.

Streams (see the domain's docstring for why both):
- ``cells-patient-<subject_id>``: every cells event of the subject (harvests, QC results,
  infusions, deviations) — the **published** copy, on ``<prefix>.cells.<EventType>``;
- ``lot-<lot_id>``: the events of one lot (harvest, QC result, infusion; no deviations) — a
  **private** copy (never published, see ``app.py``), so that "a lot is infused once" is
  decided on the lot's own history under optimistic concurrency.

Each command reads the streams it needs, decides, and appends to both in one transaction, each
at the version it read; a concurrent writer on either makes the whole command run again on the
new history (:func:`transact`). Appends always go patient stream first, then lot stream, so two
PostgreSQL writers wait for each other in one order and never deadlock.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from datetime import date
from typing import TypeVar
from uuid import UUID

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from contracts.deviations import DeviationCode, ProtocolDeviationDetected
from services.cells.domain import (
    HarvestAdiposeTissue,
    InfuseCells,
    KnownPatient,
    Lot,
    LotView,
    PatientInfusions,
    ReleaseLot,
    decide_harvest,
    decide_infusion,
    decide_release,
    fold_lot,
    fold_patient,
    infusions,
    qc_refusal,
)
from services.clinical import (
    ClinicalSettings,
    check_within_study,
    count_deviations,
    deviations_of,
    known_patient,
    study_end,
)
from shared.clinical_dates import utc_today
from shared.errors import Conflict, Invalid, NotFound
from shared.events import CommandContext, DomainEvent, Envelope
from shared.http import command_context
from shared.ids import new_event_id
from shared.patients import find_patient
from shared.service import Service
from shared.store import ConcurrencyError, UnitOfWork

T = TypeVar("T")

LOT_STREAM_PREFIX = "lot-"


def patient_stream_id(subject_id: str) -> str:
    return f"cells-patient-{subject_id}"


def lot_stream_id(lot_id: str) -> str:
    return f"{LOT_STREAM_PREFIX}{lot_id}"


def new_lot_id() -> str:
    """``LOT-`` + a UUIDv7 in hex: unique, time-ordered, and saying nothing about the donor."""
    return f"LOT-{new_event_id().hex.upper()}"


# --------------------------------------------------------------------------- responses


class LotOut(LotView):
    """A lot as the API shows it: its view plus the subject it was harvested from."""

    subject_id: str


class DeviationFound(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: DeviationCode
    detail: str


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


# --------------------------------------------------------------------------- writing


def _decoded(envelopes: Sequence[Envelope]) -> list[DomainEvent]:
    return [envelope.decode() for envelope in envelopes]


async def append_cells_events(
    uow: UnitOfWork,
    subject_id: str,
    lot_id: str,
    new_events: Sequence[DomainEvent],
    *,
    patient_version: int,
    lot_version: int,
    context: CommandContext,
) -> list[Envelope]:
    """Every event on the patient's stream; those of ``lot_id`` (not deviations) on the lot's
    stream too. Returns the patient-stream envelopes: the published ones."""
    published = await uow.append(patient_stream_id(subject_id), new_events, patient_version, context)
    lot_events = [
        e for e in new_events if not isinstance(e, ProtocolDeviationDetected) and getattr(e, "lot_id", None) == lot_id
    ]
    await uow.append(lot_stream_id(lot_id), lot_events, lot_version, context)
    return published


async def transact(service: Service, work: Callable[[UnitOfWork], Awaitable[T]], *, retries: int = 10) -> T:
    """Run ``work`` in one transaction; on a concurrent write, run it again on the new history."""
    for attempt in range(retries):
        try:
            async with service.store.transaction() as uow:
                result = await work(uow)
            service.wake_relay()
            return result
        except ConcurrencyError:
            await asyncio.sleep(random.uniform(0.002, 0.01) * (attempt + 1))
    raise Conflict("the lot or patient is being changed concurrently; try again")


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
        enrolled = await known_patient(service.store, subject_id, settings)
        patient = None
        if enrolled is not None:
            patient = KnownPatient(
                subject_id=enrolled.subject_id,
                group=enrolled.group,  # type: ignore[arg-type]  # a Group, stored as text
                enrolled_on=enrolled.enrolled_on,
            )
        lot_id = new_lot_id()
        context = command_context(request)

        async def work(uow: UnitOfWork) -> list[DomainEvent]:
            history = await uow.read_stream(patient_stream_id(subject_id))
            new_events = decide_harvest(
                fold_patient(_decoded(history)), command, patient, subject_id, lot_id, today=utc_today()
            )
            check_within_study(await study_end(uow, subject_id), subject_id, command.harvested_on, "a harvest")
            await append_cells_events(
                uow, subject_id, lot_id, new_events, patient_version=len(history), lot_version=0, context=context
            )
            return new_events

        return lot_out(fold_lot(await transact(service, work)))

    @router.post(
        "/lots/{lot_id}/release",
        status_code=201,
        response_model=LotOut,
        summary="Record a lot's QC result: released, or failed QC (recorded, then answered 422)",
    )
    async def release(lot_id: str, command: ReleaseLot, request: Request) -> LotOut:
        context = command_context(request)

        async def work(uow: UnitOfWork) -> tuple[Lot, list[DomainEvent]]:
            lot_history = _decoded(await uow.read_stream(lot_stream_id(lot_id)))
            lot = fold_lot(lot_history)
            new_events = decide_release(lot, command, lot_id)
            assert lot.subject_id is not None  # the lot exists: decide_release refused otherwise
            patient_version = await uow.stream_version(patient_stream_id(lot.subject_id))
            await append_cells_events(
                uow,
                lot.subject_id,
                lot_id,
                new_events,
                patient_version=patient_version,
                lot_version=len(lot_history),
                context=context,
            )
            return fold_lot([*lot_history, *new_events]), new_events

        lot, new_events = await transact(service, work)
        refusal = qc_refusal(new_events)
        if refusal is not None:  # the QC failure is recorded; the release asked for did not happen
            raise Invalid(refusal, code="QcFailed")
        return lot_out(lot)

    @router.post(
        "/patients/{subject_id}/infusions",
        status_code=201,
        response_model=RecordedInfusion,
        summary="Record an infusion of a released lot into the patient it was harvested from",
    )
    async def infuse(subject_id: str, command: InfuseCells, request: Request) -> RecordedInfusion:
        context = command_context(request)

        async def work(uow: UnitOfWork) -> list[Envelope]:
            lot_history = await uow.read_stream(lot_stream_id(command.lot_id))
            patient_history = await uow.read_stream(patient_stream_id(subject_id))
            lot, patient = fold_lot(_decoded(lot_history)), fold_patient(_decoded(patient_history))
            # The chain of identity is checked first, inside decide_infusion.
            new_events = decide_infusion(lot, patient, subject_id, command, today=utc_today())
            check_within_study(await study_end(uow, subject_id), subject_id, command.given_on, "an infusion")
            return await append_cells_events(
                uow,
                subject_id,
                command.lot_id,
                new_events,
                patient_version=len(patient_history),
                lot_version=len(lot_history),
                context=context,
            )

        envelopes = await transact(service, work)
        count_deviations(envelopes)
        infusion = envelopes[0]
        return RecordedInfusion.model_validate(
            {**infusion.payload, "event_id": infusion.event_id, "deviations": deviations_of(envelopes)}
        )

    @router.get(
        "/patients/{subject_id}/infusions",
        response_model=PatientInfusions,
        summary="The patient's infusions, lots and cell-therapy deviations",
    )
    async def get_infusions(subject_id: str) -> PatientInfusions:
        history = await service.store.read_stream(patient_stream_id(subject_id))
        if not history:
            if await find_patient(service.store, subject_id) is None:
                raise NotFound(f"no patient is enrolled with subject id {subject_id}")
        view = infusions(fold_patient(_decoded(history)))
        return view.model_copy(update={"subject_id": subject_id})

    @router.get("/lots/{lot_id}", response_model=LotOut, summary="One lot, from its own stream")
    async def get_lot(lot_id: str) -> LotOut:
        lot = fold_lot(_decoded(await service.store.read_stream(lot_stream_id(lot_id))))
        if lot.status is None:
            raise NotFound(f"lot {lot_id} does not exist")
        return lot_out(lot)

    return router
