"""A patient's timeline: the row each event the timeline shows gives (``outcome_timeline``).

A row is a function of its one event (and its envelope), keyed by the event id: the live
projection and a rebuild give the same bytes for it, and inserting it twice is a no-op.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from contracts.cells import CellsInfused
from contracts.deviations import ProtocolDeviationDetected
from contracts.enrollment import (
    AdverseEventReported,
    AdverseEventUpdated,
    BiopsyRecorded,
    DialysisStarted,
    KidneyTransplanted,
    PatientDied,
    PatientEnrolled,
    PatientWithdrawn,
)
from contracts.labs import EgfrComputed, LabResultCorrected, UrineResultMeasured
from contracts.pulse import PulseDoseAdministered
from services.outcomes.wire import Meta
from shared.events import DomainEvent
from shared.moments import as_utc


def _utc_date(moment: datetime) -> date:
    return as_utc(moment).date()


def _timeline_kind(event: DomainEvent, envelope: Meta) -> tuple[str, date] | None:
    """(kind, the date it happened) of the events a patient's timeline shows. Kinds reuse the
    contract's names where it has them (``dialysis_started``, ``kidney_transplant``, …)."""
    match event:
        case PatientEnrolled():
            return "enrolled", event.enrolled_on
        case PulseDoseAdministered():
            return "pulse_dose", event.given_on
        case CellsInfused():
            return "infusion", event.given_on
        case EgfrComputed():
            return "egfr", _utc_date(event.collected_at)
        case UrineResultMeasured():
            return "urine_result", _utc_date(event.collected_at)
        case AdverseEventReported():
            return "adverse_event", event.onset_on
        case AdverseEventUpdated():
            return "adverse_event_follow_up", event.onset_on
        case LabResultCorrected():
            # The event carries no collection date; the correction happened when it was recorded.
            return "lab_correction", _utc_date(envelope.occurred_at)
        case ProtocolDeviationDetected():
            return "protocol_deviation", event.occurred_on
        case BiopsyRecorded():
            return "biopsy", event.performed_on
        case DialysisStarted():
            return "dialysis_started", event.on
        case KidneyTransplanted():
            return "kidney_transplant", event.on
        case PatientDied():
            return "death", event.on
        case PatientWithdrawn():
            return "withdrawn", event.on
    return None


TIMELINE_EVENTS: tuple[type[DomainEvent], ...] = (
    PatientEnrolled, PulseDoseAdministered, CellsInfused, EgfrComputed, UrineResultMeasured, LabResultCorrected,
    AdverseEventReported, AdverseEventUpdated, ProtocolDeviationDetected, BiopsyRecorded, DialysisStarted,
    KidneyTransplanted, PatientDied, PatientWithdrawn,
)
"""The event models ``_timeline_kind`` gives a row (keep the two in step)."""


def timeline_row(envelope: Meta, event: DomainEvent, source: str) -> dict[str, Any] | None:
    """The timeline row of one event, keyed by its event id (so inserting it twice is a no-op).
    An eGFR or urine row keeps its labs stream version, an adverse-event report its version in
    the patient's stream: which tells the effective value or report from a superseded one.

    The detail is the event's JSON in its model's field order (``model_dump_json``, pydantic's
    Rust serializer): a function of the event alone, so the same event gives the same bytes live
    and rebuilt; sorting its keys through the standard library cost three times as much."""
    found = _timeline_kind(event, envelope)
    if found is None:
        return None
    kind, occurred_on = found
    detail = event.model_dump_json(exclude=_NOT_IN_DETAIL)
    version_key = _VERSIONED.get(type(event))
    if version_key is not None:
        detail = f'{detail[:-1]},"{version_key}":{envelope.stream_version:d}}}'
    return {
        "event_id": envelope.event_id,
        "subject_id": getattr(event, "subject_id"),
        "occurred_on": occurred_on,
        "recorded_at": envelope.recorded_at,
        "kind": kind,
        "source": source,
        "detail_json": detail,
    }


_NOT_IN_DETAIL = {"subject_id"}

_VERSIONED: dict[type[DomainEvent], str] = {
    EgfrComputed: "lab_stream_version",
    UrineResultMeasured: "lab_stream_version",
    AdverseEventReported: "report_version",
    AdverseEventUpdated: "report_version",
}
"""Events of which only the newest version counts, and the detail key that carries it."""
