"""The enrollment service's use cases: enroll a patient, record a clinical event (dialysis,
transplant, death, withdrawal), record a biopsy, report an adverse event, erase a withdrawn
patient's data. Each is one function of a command and a unit of work; the adapter (api.py)
runs it in ``store.transact``, which runs it again on the new history when a concurrent writer
got there first.

Two steps happen outside a transaction, by design: the patient's data key is created before
the enrollment is recorded (:func:`create_patient_key`: every payload is sealed with it), and
an erasure's key deletion follows its commit (``KeyPurger.purge``: the recorded erasure is never
lost, whatever happens to the deletion).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, get_args

from prometheus_client import Counter

from contracts.enrollment import AdverseEventReported, AdverseEventUpdated, CtcaeGrade
from services.enrollment.domain import (
    AdverseEvent,
    EnrollPatient,
    PatientView,
    RecordBiopsy,
    RecordClinicalEvent,
    ReportAdverseEvent,
    check_enrollable,
    decide_enroll_patient,
    decide_erase_patient,
    decide_record_biopsy,
    decide_record_clinical_event,
    decide_report_adverse_event,
    fold,
    patient_view,
)
from shared import metrics
from shared.commands import Command
from shared.erasures import remember_erased
from shared.errors import Conflict
from shared.events import DomainEvent, Envelope
from shared.keys import KeyErased
from shared.store import UnitOfWork


def stream_id(subject_id: str) -> str:
    return f"patient-{subject_id}"


def erasure_stream_id(subject_id: str) -> str:
    """The erasure event's own stream: recorded in clear (shared.sealing), apart from the
    patient's sealed stream, which is unreadable once the key is gone."""
    return f"erasure-{subject_id}"


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Enroll(Command):
    patient: EnrollPatient


@dataclass(frozen=True)
class RecordEvent(Command):
    subject_id: str
    event: RecordClinicalEvent


@dataclass(frozen=True)
class RecordBiopsyFindings(Command):
    subject_id: str
    biopsy: RecordBiopsy


@dataclass(frozen=True)
class ReportAdverse(Command):
    subject_id: str
    ae_id: str
    report: ReportAdverseEvent


@dataclass(frozen=True)
class Erase(Command):
    subject_id: str


# --------------------------------------------------------------------------- enrolling


class PatientKeys(Protocol):
    """Where patients' data keys are made (:class:`shared.keys.KeyVault`)."""

    async def create(self, subject_id: str) -> bytes: ...


async def create_patient_key(command: Enroll, keys: PatientKeys) -> None:
    """The checks that need no state, then the patient's data key — before the transaction
    that records the enrollment, whose payload is sealed with it. No key is made for an
    enrollment refused on its face; an erased subject id is never given a key again (409)."""
    check_enrollable(command.patient, today=command.today)
    try:
        await keys.create(command.patient.subject_id)
    except KeyErased:
        raise Conflict(
            f"subject {command.patient.subject_id} was erased and cannot be enrolled again; use a new pseudonym",
            code="erased",
        ) from None


async def enroll(command: Enroll, uow: UnitOfWork) -> PatientView:
    """Record the enrollment (once, into a group whose criteria the patient meets)."""
    subject_id = command.patient.subject_id
    history = await _history(uow, subject_id)
    new_events = decide_enroll_patient(fold(history), command.patient, today=command.today)
    await uow.append(stream_id(subject_id), new_events, len(history), command.context)
    return patient_view(fold([*history, *new_events]), subject_id)


# --------------------------------------------------------------------------- records


async def record_clinical_event(command: RecordEvent, uow: UnitOfWork) -> Envelope:
    """Record dialysis start, transplant, death or withdrawal (each once; nothing after death)."""
    history = await _history(uow, command.subject_id)
    new_events = decide_record_clinical_event(fold(history), command.event, command.subject_id, today=command.today)
    [recorded] = await uow.append(stream_id(command.subject_id), new_events, len(history), command.context)
    return recorded


async def record_biopsy(command: RecordBiopsyFindings, uow: UnitOfWork) -> Envelope:
    """Record follow-up biopsy findings (one biopsy per date)."""
    history = await _history(uow, command.subject_id)
    new_events = decide_record_biopsy(fold(history), command.biopsy, command.subject_id, today=command.today)
    [recorded] = await uow.append(stream_id(command.subject_id), new_events, len(history), command.context)
    return recorded


AdverseEventChange = Literal["reported", "updated", "unchanged"]


@dataclass(frozen=True)
class AdverseEventRecorded:
    """What a report of an adverse event did, and the adverse event as it now stands."""

    change: AdverseEventChange
    adverse_event: AdverseEvent
    event: Envelope | None
    """The event recorded (None when the report was already the adverse event's state)."""


async def report_adverse_event(command: ReportAdverse, uow: UnitOfWork) -> AdverseEventRecorded:
    """The first report of an adverse event, a follow-up that replaces it, or nothing (a resend).

    The first report that makes the adverse event serious — its first report, or a follow-up of
    one never reported serious before — is counted in ``nephrotrack_serious_adverse_events_total`` once committed, so an
    operator's alert fires for every serious adverse event, once.
    """
    subject_id, ae_id = command.subject_id, command.ae_id
    history = await _history(uow, subject_id)
    state = fold(history)
    new_events = decide_report_adverse_event(state, command.report, subject_id, ae_id, today=command.today)
    earlier = state.adverse_event(ae_id)
    envelopes = await uow.append(stream_id(subject_id), new_events, len(history), command.context)
    now = fold([*history, *new_events]).adverse_event(ae_id)
    assert now is not None  # reported now or before
    if now.serious and not _ever_serious(history, ae_id):
        uow.on_commit(lambda: serious_adverse_events(now.grade, now.treatment_related).inc())
    change: AdverseEventChange = "unchanged" if not envelopes else "reported" if earlier is None else "updated"
    return AdverseEventRecorded(change, now, envelopes[0] if envelopes else None)


def _ever_serious(history: list[DomainEvent], ae_id: str) -> bool:
    return any(isinstance(e, AdverseEventReported | AdverseEventUpdated) and e.ae_id == ae_id and e.serious
               for e in history)


def serious_adverse_events(grade: int, treatment_related: bool) -> Counter:
    """The series of ``nephrotrack_serious_adverse_events_total`` for this grade and relatedness."""
    return metrics.SERIOUS_ADVERSE_EVENTS.labels(grade=str(grade), treatment_related=str(treatment_related).lower())


def expose_serious_adverse_events() -> None:
    """Create every series at 0 when the process starts, so the first serious adverse event is
    an increase Prometheus sees (a series born at 1 has no earlier sample to increase from)."""
    for grade in get_args(CtcaeGrade):
        for treatment_related in (False, True):
            serious_adverse_events(grade, treatment_related)


# --------------------------------------------------------------------------- erasure


@dataclass(frozen=True)
class Erasure:
    """The erasure recorded for the subject, and whether this command recorded it (a repeat
    answers with the first one)."""

    event: Envelope
    first: bool


async def erase(command: Erase, uow: UnitOfWork) -> Erasure:
    """Record ``PatientDataErased`` for a patient who withdrew, on its own stream in clear, and
    the subject as erased in this service (``uow.erased``: their key is forgotten here at once).
    Idempotent: a repeated erasure records nothing and answers with the first. Deleting the
    key is the caller's next step, after the commit (``KeyPurger.purge``)."""
    done = await uow.read_stream(erasure_stream_id(command.subject_id))
    if done:
        return Erasure(done[0], first=False)
    history = await _history(uow, command.subject_id)
    new_events = decide_erase_patient(fold(history), command.subject_id, command.today)
    [erased] = await uow.append(erasure_stream_id(command.subject_id), new_events, 0, command.context)
    await remember_erased(uow, [command.subject_id])
    return Erasure(erased, first=True)


async def _history(uow: UnitOfWork, subject_id: str) -> list[DomainEvent]:
    return [envelope.decode() for envelope in await uow.read_stream(stream_id(subject_id))]
