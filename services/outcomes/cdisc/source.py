"""The exports' inputs from the outcomes projection: the enrolled subjects and the decoded events
of the timeline kinds the datasets read.

A timeline row's detail is its event's JSON without ``subject_id`` (services/outcomes/timeline.py),
so the event model decodes it back. Urine results and adverse events are read from the kinds in
:data:`URINE_KINDS` and :data:`ADVERSE_EVENT_KINDS`; an adverse event's reports are ordered by
their version in the patient's stream, so the last is the one the projection's facts keep.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from contracts.enrollment import AdverseEventReported, AdverseEventUpdated
from contracts.labs import EgfrComputed, UrineResultMeasured
from services.outcomes.cdisc.study import Subject
from services.outcomes.queries import PatientRecord, TimelineEntry

EGFR_KIND = "egfr"
URINE_KINDS = ("urine_result",)
FIRST_REPORT_KIND, FOLLOW_UP_KIND = "adverse_event", "adverse_event_follow_up"
ADVERSE_EVENT_KINDS = (FIRST_REPORT_KIND, FOLLOW_UP_KIND)
KINDS = (EGFR_KIND, *URINE_KINDS, *ADVERSE_EVENT_KINDS)
"""Every timeline kind the exports read."""

LAB_VERSION = "lab_stream_version"
"""Added to a lab result's detail by the projection: its labs stream version (newest wins)."""
REPORT_VERSION = "report_version"
"""Added to an adverse-event report's detail by the projection: its version in the patient's stream."""

Event = TypeVar("Event", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class StudyData:
    subjects: list[Subject]
    egfr: list[EgfrComputed]
    urine: list[UrineResultMeasured]
    adverse_events: list[AdverseEventReported | AdverseEventUpdated]
    """Every report of every adverse event, oldest version first (the latest is its state)."""


def study_data(records: Iterable[PatientRecord]) -> StudyData:
    """``records``: enrolled patients with their timeline rows of :data:`KINDS`, oldest first."""
    data = StudyData([], [], [], [])
    for record in records:
        if record.outcome is None:  # not enrolled yet: no subject of the study
            continue
        facts = record.patient.facts
        data.subjects.append(Subject(facts, record.outcome))
        entries = record.timeline
        data.egfr.extend(_effective(facts.subject_id, [e for e in entries if e.kind == EGFR_KIND], EgfrComputed))
        data.urine.extend(_effective(facts.subject_id, [e for e in entries if e.kind in URINE_KINDS],
                                     UrineResultMeasured))
        reports = sorted((e for e in entries if e.kind in ADVERSE_EVENT_KINDS),
                         key=lambda e: e.detail.get(REPORT_VERSION, 0))
        data.adverse_events.extend(
            _decoded(facts.subject_id, e, AdverseEventUpdated if e.kind == FOLLOW_UP_KIND else AdverseEventReported)
            for e in reports)
    return data


def _decoded(subject_id: str, entry: TimelineEntry, model: type[Event]) -> Event:
    """The event of a timeline row; keys the model does not know (the projection's additions,
    such as :data:`LAB_VERSION`) are left out."""
    fields: dict[str, Any] = {k: v for k, v in entry.detail.items() if k in model.model_fields}
    return model.model_validate({**fields, "subject_id": subject_id})


def _effective(subject_id: str, entries: list[TimelineEntry], model: type[Event]) -> list[Event]:
    """Per result id, the event with the highest labs stream version (then the latest recorded):
    the result's effective value, as the projection's facts keep it."""
    newest: dict[str, tuple[tuple[int, Any], TimelineEntry]] = {}
    for entry in entries:
        order = (entry.detail.get(LAB_VERSION, 0), entry.recorded_at)
        result_id = entry.detail["result_id"]
        if result_id not in newest or order >= newest[result_id][0]:
            newest[result_id] = (order, entry)
    return [_decoded(subject_id, entry, model) for _, entry in newest.values()]
