"""The exports' inputs from projection rows: the effective event of each lab result id, each
adverse event's reports by version (the latest last), and only enrolled patients as subjects."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

from services.outcomes.cdisc.source import StudyData, study_data
from services.outcomes.domain import compute_outcome, fold
from services.outcomes.projector import ProjectedPatient
from services.outcomes.queries import PatientRecord, TimelineEntry
from services.outcomes.timeline import timeline_row
from services.outcomes.wire import Meta
from shared.events import DomainEvent
from tests.unit.outcomes.cdisc_study import A1, ADVERSE_EVENTS, URINE, reported
from tests.unit.outcomes.outcome_events import enrolled

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def entry(event: DomainEvent, version: int, minute: int) -> TimelineEntry:
    """The timeline row the projection writes for ``event`` (eGFR), read back as the query does."""
    meta = Meta(uuid.uuid4(), type(event).__name__, "s", 1, version, T0, T0 + timedelta(minutes=minute))
    row = timeline_row(meta, event, "labs")
    assert row is not None
    return TimelineEntry(str(row["event_id"]), row["occurred_on"], row["recorded_at"], row["kind"], row["source"],
                         json.loads(row["detail_json"]))


def record(subject_id: str, entries: list[TimelineEntry], enrolled_too: bool = True) -> PatientRecord:
    facts = fold(subject_id, [enrolled(sid=subject_id)] if enrolled_too else [])
    outcome = compute_outcome(facts) if enrolled_too else None
    return PatientRecord(ProjectedPatient(facts), outcome, entries)


def test_each_result_id_gives_its_newest_version_whatever_the_order_recorded() -> None:
    typo, fixed = reported("R1", 2.4, "2014-06-01", A1), reported("R1", 24.0, "2014-06-01", A1, status="corrected")
    other = reported("R2", 30.0, "2014-07-01", A1)
    data = study_data([record(A1, [entry(fixed, 4, 1), entry(typo, 2, 2), entry(other, 2, 3)])])
    assert sorted((e.result_id, e.egfr, e.status, e.loinc) for e in data.egfr) == [
        ("R1", 24.0, "corrected", "98979-8"), ("R2", 30.0, "final", "98979-8")]
    assert data.egfr[0].subject_id == A1


def test_urine_results_and_adverse_events_are_read_from_their_kinds() -> None:
    first, second = URINE
    newer = first.model_copy(update={"value": 1.7, "status": "corrected"})
    reports = [e for e in ADVERSE_EVENTS if e.subject_id == A1]
    first_report, follow_up = reports
    data = study_data([record(A1, [
        entry(first, 2, 1), entry(newer, 4, 2), entry(second, 2, 3),
        entry(follow_up, 7, 4), entry(first_report, 5, 5),  # the follow-up was read first
    ])])
    assert [(u.result_id, u.value) for u in data.urine] == [("A1-U1", 1.7), ("A1-U2", 0.6)]
    assert [(type(a).__name__, a.ae_id, a.grade) for a in data.adverse_events] == [
        ("AdverseEventReported", "AE-1", 2), ("AdverseEventUpdated", "AE-1", 3)]  # by version, the latest last


def test_only_enrolled_patients_are_subjects() -> None:
    data = study_data([record(A1, []), record("IGA-A-404", [], enrolled_too=False)])
    assert [s.subject_id for s in data.subjects] == [A1]
    assert data == StudyData(data.subjects, [], [], [])
