"""The labs decider: what one incoming result means for its result id.

Pure functions only (no I/O, no clock, no asyncio): the caller passes ``now`` in. The three
channels (broker JSON, HL7 v2 over MLLP, FHIR R4) are parsed by their own modules into one
:class:`~services.labs.inputs.IncomingResult`; the catalogue (:mod:`services.labs.catalogue`)
says which results are acceptable, :mod:`services.labs.egfr` computes CKD-EPI 2021, and this
module decides and folds (creatinine and eGFR become an ``EgfrComputed``; urine protein, a
``UrineResultMeasured`` in its kept unit, with no eGFR):

    incoming = parse_...(payload)                 # raises LabRejection (specific reason)
    state = fold_result(events of stream_id(incoming.result_id))
    new_events = decide_result(state, incoming, patient, now=now)   # may raise LabRejection
    append new_events to stream_id(incoming.result_id)

and, on any :class:`~services.labs.inputs.LabRejection`, the ingestion records
:func:`~services.labs.inputs.rejection_event` on ``labs.rejected``.

Why one stream per result id: the result id is what a lab uses to say "this replaces that"
(a correction carries the id of the result it corrects), so the result id is the consistency
boundary that decides which value is *effective*.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import date, datetime

from contracts.enrollment import PatientEnrolled, Sex
from contracts.labs import URINE_UNITS, Analyte, EgfrComputed, LabResultCorrected, Status, UrineResultMeasured
from services.labs.catalogue import Measurement, validate_result
from services.labs.egfr import EQUATION, age_on, ckd_epi_2021
from services.labs.events import LabResultRecorded
from services.labs.inputs import IncomingResult, rejection_for
from shared.events import DomainEvent

# --------------------------------------------------------------------------- decider


@dataclass(frozen=True)
class KnownPatient:
    """What lab ingestion needs to know about an enrolled patient, learnt from
    ``PatientEnrolled`` (enrollment's published event)."""

    subject_id: str
    sex: Sex
    age_years: int
    enrolled_on: date


Effective = EgfrComputed | UrineResultMeasured
"""The published value of a result id: its eGFR (creatinine or a reported eGFR) or its urine
protein value."""


@dataclass(frozen=True)
class ResultState:
    """The fold of one ``labresult-<result_id>`` stream.

    ``effective`` is the latest :class:`EgfrComputed` or :class:`UrineResultMeasured` (the value
    readers use); it is ``None`` only between the first ``LabResultRecorded`` and that event.
    """

    result_id: str
    subject_id: str
    analyte: Analyte
    seen_message_ids: frozenset[str] = field(default_factory=frozenset)
    effective: Effective | None = None

    @property
    def effective_egfr(self) -> float | None:
        return self.effective.egfr if isinstance(self.effective, EgfrComputed) else None

    @property
    def status(self) -> Status | None:
        return self.effective.status if self.effective else None


def stream_id(result_id: str) -> str:
    return f"labresult-{result_id}"


_RANK: dict[str, int] = {"preliminary": 0, "final": 1, "corrected": 2}


def decide_result(
    state: ResultState | None,
    incoming: IncomingResult,
    patient: KnownPatient | None,
    *,
    now: datetime,
) -> list[DomainEvent]:
    """Decide what one incoming result means for its result id. Raises :class:`LabRejection`.

    - A message id this result id has already seen: no events (a redelivery has one effect).
    - The result id belongs to another subject, or to the other analyte: refused.
    - Otherwise the result is always recorded (``LabResultRecorded``: the fact that it came), and
      it becomes the *effective* value when it ranks at least as high as the current one:

          corrected > final > preliminary; within the same rank the later arrival wins.

      So a correction replaces the value whatever the arrival order (a ``final`` arriving after
      a ``corrected`` is recorded but changes nothing), a later correction replaces an earlier
      one, a ``final`` supersedes a ``preliminary``, and a ``preliminary`` never displaces a
      final or corrected value (it is effective, uncounted, only while nothing better exists;
      a newer preliminary replaces an older one by the same-rank rule).
    - When the effective value changes: ``EgfrComputed`` for creatinine and eGFR codes,
      ``UrineResultMeasured`` (value in the analyte's kept unit) for urine protein codes
      (``counted`` = not preliminary), preceded by ``LabResultCorrected`` (in the kept unit)
      when a ``corrected`` result replaced an earlier value. An arrival that would leave the
      effective value exactly as it is emits neither.

    Creatinine becomes an eGFR with CKD-EPI 2021 from the patient's sex and age on the UTC
    collection date. ``patient`` must be known: the adapter parks results for subjects it has not
    seen enrolled yet, so ``None`` here is refused (``unknown_subject``) rather than guessed.
    """
    if state is not None and incoming.message_id in state.seen_message_ids:
        return []
    measurement = validate_result(incoming, now)
    _check_belongs(state, incoming, measurement)
    if patient is None or patient.subject_id != incoming.subject_id:
        raise rejection_for(incoming, f"subject {incoming.subject_id} is not enrolled", "unknown_subject")
    recorded = _recorded(incoming, measurement)
    candidate = _effective(incoming, measurement, patient)
    current = state.effective if state else None
    if not _supersedes(candidate, current):
        return [recorded]
    events: list[DomainEvent] = [recorded]
    if incoming.status == "corrected" and current is not None:
        events.append(
            LabResultCorrected(
                result_id=incoming.result_id,
                subject_id=incoming.subject_id,
                previous_value=_canonical_value(current),
                new_value=measurement.canonical_value,
                canonical_unit=measurement.canonical_unit,
            )
        )
    events.append(candidate)
    return events


def _check_belongs(state: ResultState | None, incoming: IncomingResult, measurement: Measurement) -> None:
    if state is None:
        return
    if state.subject_id != incoming.subject_id:
        raise rejection_for(
            incoming,
            f"result id {incoming.result_id} already belongs to another subject",
            "result_id_conflict",
        )
    if state.analyte != measurement.analyte:
        raise rejection_for(
            incoming,
            f"result id {incoming.result_id} holds a {state.analyte} result; it cannot become {measurement.analyte}",
            "analyte_mismatch",
        )


def _supersedes(candidate: Effective, current: Effective | None) -> bool:
    if current is None:
        return True
    if _RANK[candidate.status] < _RANK[current.status]:
        return False
    return candidate.model_dump(exclude={"source"}) != current.model_dump(exclude={"source"})


def _canonical_value(effective: Effective) -> float:
    if isinstance(effective, UrineResultMeasured):
        return effective.value
    return effective.creatinine_mg_dl if effective.creatinine_mg_dl is not None else effective.egfr


def _recorded(incoming: IncomingResult, measurement: Measurement) -> LabResultRecorded:
    return LabResultRecorded(
        result_id=incoming.result_id,
        message_id=incoming.message_id,
        subject_id=incoming.subject_id,
        lab_id=incoming.lab_id,
        source=incoming.source,
        loinc=incoming.loinc,
        analyte=measurement.analyte,
        value=incoming.value,
        unit=incoming.unit,
        canonical_value=measurement.canonical_value,
        canonical_unit=measurement.canonical_unit,
        status=incoming.status,
        collected_at=incoming.collected_at,
    )


def _effective(incoming: IncomingResult, measurement: Measurement, patient: KnownPatient) -> Effective:
    common = dict(
        result_id=incoming.result_id,
        subject_id=incoming.subject_id,
        collected_at=incoming.collected_at,
        status=incoming.status,
        counted=incoming.status != "preliminary",
        source=incoming.source,
        loinc=incoming.loinc,
    )
    if measurement.analyte in URINE_UNITS:
        return UrineResultMeasured(
            analyte=measurement.analyte, value=measurement.canonical_value, unit=measurement.canonical_unit, **common,
        )
    if measurement.analyte == "egfr":
        return EgfrComputed(egfr=measurement.canonical_value, derived_from="reported", **common)
    age = age_on(patient.age_years, patient.enrolled_on, incoming.collected_at.date())
    return EgfrComputed(
        egfr=ckd_epi_2021(measurement.canonical_value, age, patient.sex),
        derived_from="creatinine",
        creatinine_mg_dl=measurement.canonical_value,
        equation=EQUATION,
        sex=patient.sex,
        age_years=age,
        **common,
    )


def evolve(state: ResultState | None, event: DomainEvent) -> ResultState | None:
    """Apply one event of a ``labresult-<result_id>`` stream. Events this stream never holds
    leave the state unchanged, so a reader can fold a mixed sequence safely."""
    if isinstance(event, LabResultRecorded):
        if state is None:
            return ResultState(event.result_id, event.subject_id, event.analyte, frozenset({event.message_id}))
        return replace(state, seen_message_ids=state.seen_message_ids | {event.message_id})
    if isinstance(event, EgfrComputed | UrineResultMeasured):
        if state is None:
            raise ValueError(f"{event.event_type} for {event.result_id} before any LabResultRecorded")
        return replace(state, effective=event)
    return state


def fold_result(events: Iterable[DomainEvent]) -> ResultState | None:
    state: ResultState | None = None
    for event in events:
        state = evolve(state, event)
    return state


def known_patient(enrolled: PatientEnrolled) -> KnownPatient:
    """The :class:`KnownPatient` that enrollment's published ``PatientEnrolled`` implies."""
    return KnownPatient(enrolled.subject_id, enrolled.sex, enrolled.age_years, enrolled.enrolled_on)
