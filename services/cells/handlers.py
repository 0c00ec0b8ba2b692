"""The cells service's use cases: harvest adipose tissue (a new lot), release a lot (its QC
result), infuse a released lot. Each is one function of a command and a unit of work; the
adapter (api.py) runs it in ``store.transact``.

Streams (see the domain's docstring for why both):
- ``cells-patient-<subject_id>``: every cells event of the subject (harvests, QC results,
  infusions, deviations) — the **published** copy, on ``<prefix>.cells.<EventType>``;
- ``lot-<lot_id>``: the events of one lot (harvest, QC result, infusion; no deviations) — a
  **private** copy (never published, see ``app.py``), so that "a lot is infused once" is
  decided on the lot's own history under optimistic concurrency.

Each use case reads the streams it needs, decides — the end-of-study rule (nothing after death or
withdrawal) included, on the status read in the same transaction — and appends to both streams,
each at the version it read; a concurrent writer on either makes the whole use case run again on
the new history. Appends always go patient stream first, then lot stream, so two PostgreSQL
writers wait for each other in one order and never deadlock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from contracts.deviations import ProtocolDeviationDetected
from services.cells.domain import (
    HarvestAdiposeTissue,
    InfuseCells,
    Lot,
    ReleaseLot,
    decide_harvest,
    decide_infusion,
    decide_release,
    fold_lot,
    fold_patient,
    qc_refusal,
)
from services.clinical import check_within_study, count_deviations, study_end
from services.clinical.patients import KnownPatient
from shared.commands import Command
from shared.events import CommandContext, DomainEvent, Envelope
from shared.ids import new_event_id
from shared.store import UnitOfWork

LOT_STREAM_PREFIX = "lot-"


def patient_stream_id(subject_id: str) -> str:
    return f"cells-patient-{subject_id}"


def lot_stream_id(lot_id: str) -> str:
    return f"{LOT_STREAM_PREFIX}{lot_id}"


def new_lot_id() -> str:
    """``LOT-`` + a UUIDv7 in hex: unique, time-ordered, and saying nothing about the donor."""
    return f"LOT-{new_event_id().hex.upper()}"


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Harvest(Command):
    subject_id: str
    harvest: HarvestAdiposeTissue
    lot_id: str = field(default_factory=new_lot_id)
    """Chosen once per command, so a retried transaction records the same lot."""


@dataclass(frozen=True)
class Release(Command):
    lot_id: str
    qc: ReleaseLot


@dataclass(frozen=True)
class Infuse(Command):
    subject_id: str
    infusion: InfuseCells


# --------------------------------------------------------------------------- use cases


async def harvest(command: Harvest, uow: UnitOfWork) -> Lot:
    """Record the harvest as a new lot of an enrolled, treated patient; returns the lot."""
    subject_id = command.subject_id
    history = await uow.read_stream(patient_stream_id(subject_id))
    patient = KnownPatient.from_register(await uow.patients.find(subject_id))
    new_events = decide_harvest(
        fold_patient(_decoded(history)), command.harvest, patient, subject_id, command.lot_id, today=command.today
    )
    check_within_study(await study_end(uow, subject_id), subject_id, command.harvest.harvested_on, "a harvest")
    await _append(uow, subject_id, command.lot_id, new_events,
                  patient_version=len(history), lot_version=0, context=command.context)
    return fold_lot(new_events)


@dataclass(frozen=True)
class Released:
    """The lot after its QC result, and the reason it failed QC (None: released)."""

    lot: Lot
    qc_failure: str | None


async def release(command: Release, uow: UnitOfWork) -> Released:
    """Record the lot's QC result: released, or failed QC (recorded all the same)."""
    lot_history = _decoded(await uow.read_stream(lot_stream_id(command.lot_id)))
    lot = fold_lot(lot_history)
    new_events = decide_release(lot, command.qc, command.lot_id)
    assert lot.subject_id is not None  # the lot exists: decide_release refused otherwise
    patient_version = await uow.stream_version(patient_stream_id(lot.subject_id))
    await _append(uow, lot.subject_id, command.lot_id, new_events,
                  patient_version=patient_version, lot_version=len(lot_history), context=command.context)
    return Released(fold_lot([*lot_history, *new_events]), qc_refusal(new_events))


async def infuse(command: Infuse, uow: UnitOfWork) -> list[Envelope]:
    """Record the infusion of a released lot into the patient it came from (the chain of
    identity is checked first, inside ``decide_infusion``) and the deviations it raises, counted
    once committed. Returns the published envelopes: the infusion first, then its deviations."""
    subject_id, lot_id = command.subject_id, command.infusion.lot_id
    lot_history = await uow.read_stream(lot_stream_id(lot_id))
    patient_history = await uow.read_stream(patient_stream_id(subject_id))
    lot, patient = fold_lot(_decoded(lot_history)), fold_patient(_decoded(patient_history))
    new_events = decide_infusion(lot, patient, subject_id, command.infusion, today=command.today)
    check_within_study(await study_end(uow, subject_id), subject_id, command.infusion.given_on, "an infusion")
    envelopes = await _append(uow, subject_id, lot_id, new_events, patient_version=len(patient_history),
                              lot_version=len(lot_history), context=command.context)
    uow.on_commit(lambda: count_deviations(envelopes))
    return envelopes


# --------------------------------------------------------------------------- writing


def _decoded(envelopes: Sequence[Envelope]) -> list[DomainEvent]:
    return [envelope.decode() for envelope in envelopes]


async def _append(
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
