"""What the clinical command services (pulse, cells) learn from enrollment's events, and the
adapter plumbing they share. The patient their deciders take is
:class:`services.clinical.patients.KnownPatient` (a pure module, for the domains).

Enrollment's events are read from the broker by a durable consumer (``learn_from_enrollment``)
and kept locally, in the service's own database, so no command ever calls enrollment:

- ``PatientEnrolled`` → the register of known patients (:mod:`shared.patients`): who exists,
  their group and enrollment date. A command for a patient not yet known waits for the
  enrollment to arrive, up to ``NEPHROTRACK_UNKNOWN_PATIENT_WAIT_SECONDS`` (default 10), and is
  then answered 404 (:func:`known_patient`).
- ``PatientDied`` / ``PatientWithdrawn`` → a copy in a *private* stream
  ``patient-status-<subject_id>`` of this service's store (never published), so that a dose,
  harvest or infusion dated after the patient's death or withdrawal is refused
  (:func:`check_within_study`), by the rule enrollment applies to its own records: after death
  nothing, after withdrawal only death. Replaying the store rebuilds it like any other stream.
- ``PatientDataErased`` → the patient leaves the register (docs/erasure.md): their commands
  answer 404, and what was kept about them is sealed with their deleted key.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.deviations import DeviationCode, ProtocolDeviationDetected
from contracts.enrollment import PatientDied, PatientWithdrawn
from shared import metrics
from shared.consumer import InboundMessage
from shared.errors import Invalid, NotFound
from shared.events import CommandContext, DomainEvent, Envelope
from shared.patients import (
    EnrolledPatient,
    drop_erased_patients,
    find_patient,
    readable,
    remember_enrollments,
    wait_for_patient,
)
from shared.store import EventStore, UnitOfWork

if TYPE_CHECKING:  # the service shell is wiring's business; the deciders' imports stay light
    from shared.service import Service


M = TypeVar("M", bound=BaseModel)


class ClinicalSettings(BaseSettings):
    """Settings of the clinical command services (pulse, cells)."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    unknown_patient_wait_seconds: float = Field(
        default=10.0,
        ge=0,
        alias="NEPHROTRACK_UNKNOWN_PATIENT_WAIT_SECONDS",
        description="How long a command for a patient not yet learned from enrollment waits before 404.",
    )


# --------------------------------------------------------------------------- known patients


async def known_patient(store: EventStore, subject_id: str, settings: ClinicalSettings) -> EnrolledPatient | None:
    """The enrolled patient, waiting for enrollment's event if it has not arrived yet (no 404
    race for a command sent right after enrolling); None once the wait is over."""
    return await wait_for_patient(store, subject_id, settings.unknown_patient_wait_seconds)


# --------------------------------------------------------------------------- death and withdrawal

STATUS_STREAM_PREFIX = "patient-status-"
_END_OF_STUDY = {PatientDied.event_type, PatientWithdrawn.event_type}


def status_stream_id(subject_id: str) -> str:
    return f"{STATUS_STREAM_PREFIX}{subject_id}"


@dataclass(frozen=True)
class StudyEnd:
    """When the patient's participation ended, as learned from enrollment (None: not ended)."""

    died_on: date | None = None
    withdrawn_on: date | None = None


def fold_study_end(envelopes: Iterable[Envelope]) -> StudyEnd:
    died_on = withdrawn_on = None
    for envelope in envelopes:
        event = envelope.decode()
        if isinstance(event, PatientDied):
            died_on = event.on
        elif isinstance(event, PatientWithdrawn):
            withdrawn_on = event.on
    return StudyEnd(died_on=died_on, withdrawn_on=withdrawn_on)


async def study_end(reader: EventStore | UnitOfWork, subject_id: str) -> StudyEnd:
    return fold_study_end(await reader.read_stream(status_stream_id(subject_id)))


def check_within_study(end: StudyEnd, subject_id: str, on: date, what: str) -> None:
    """Refuse a fact dated after the patient died or withdrew (the day itself is allowed)."""
    if end.died_on is not None and on > end.died_on:
        raise Invalid(
            f"{what} on {on} is after {subject_id}'s death on {end.died_on}; nothing after death can be recorded"
        )
    if end.withdrawn_on is not None and on > end.withdrawn_on:
        raise Invalid(
            f"{what} on {on} is after {subject_id} withdrew on {end.withdrawn_on}; "
            f"nothing after withdrawal is recorded except death (by enrollment)"
        )


async def learn_from_enrollment(uow: UnitOfWork, messages: list[InboundMessage]) -> None:
    """Batch handler of enrollment's events: remember enrollments, keep deaths and withdrawals,
    forget erased patients (their private status stream is sealed with their deleted key).

    Runs in the consumer's transaction with its inbox claims, so a redelivered message has no
    second effect; a death or withdrawal already kept (at most one of each) is skipped too.
    """
    await remember_enrollments(uow, messages)
    await drop_erased_patients(uow, messages)
    for _, envelope in readable(messages):
        if envelope.event_type not in _END_OF_STUDY:
            continue
        fact = envelope.decode()
        stream = status_stream_id(fact.subject_id)  # type: ignore[attr-defined]
        history = await uow.read_stream(stream)
        if any(e.event_type == envelope.event_type for e in history):
            continue
        await uow.append(stream, [fact], len(history), CommandContext.caused_by(envelope, actor="enrollment"))


# --------------------------------------------------------------------------- adapter plumbing


def publish_only_public_streams(service: Service, *private_prefixes: str) -> None:
    """Keep the events of streams named ``<prefix>…`` out of the outbox (never published).

    Uses the store's ``subject_for`` hook (None = private): the Service publishes every event
    by default, so the service wraps it once at wiring time.
    """
    publish = service.store.subject_for

    def subject_for(envelope: Envelope) -> str | None:
        return None if envelope.stream_id.startswith(private_prefixes) else publish(envelope)

    service.store.subject_for = subject_for


def count_deviations(envelopes: Sequence[Envelope]) -> None:
    """Count committed deviations in ``nephrotrack_protocol_deviations_total{code}``."""
    for envelope in envelopes:
        if envelope.event_type == ProtocolDeviationDetected.event_type:
            metrics.PROTOCOL_DEVIATIONS.labels(code=envelope.payload["code"]).inc()


def expose_deviation_codes(codes: Iterable[DeviationCode]) -> None:
    """Create the counter's series at 0 so dashboards see a code before it first happens."""
    for code in codes:
        metrics.PROTOCOL_DEVIATIONS.labels(code=code.value)


class DeviationFound(BaseModel):
    """A protocol deviation a command raised, as its response lists it."""

    model_config = ConfigDict(frozen=True)

    code: DeviationCode
    detail: str


def recorded_with_deviations(model: type[M], envelopes: Sequence[Envelope]) -> M:
    """A command's answer: the fact it recorded (the first envelope) as ``model``, with its event
    id and the deviations it raised."""
    fact = envelopes[0]
    return model.model_validate({**fact.payload, "event_id": fact.event_id, "deviations": deviations_of(envelopes)})


async def patient_history(store: EventStore, stream_id: str, subject_id: str) -> list[DomainEvent]:
    """A read of the patient's stream in this service; 404 when it is empty and the patient is
    not known either (a known patient with nothing recorded yet reads as empty)."""
    history = await store.read_stream(stream_id)
    if not history and await find_patient(store, subject_id) is None:
        raise NotFound(f"no patient is enrolled with subject id {subject_id}")
    return [envelope.decode() for envelope in history]


def deviations_of(envelopes: Sequence[Envelope]) -> list[DeviationFound]:
    """The deviations among ``envelopes`` (for command responses)."""
    return [
        DeviationFound(code=e.payload["code"], detail=e.payload["detail"])
        for e in envelopes
        if e.event_type == ProtocolDeviationDetected.event_type
    ]
