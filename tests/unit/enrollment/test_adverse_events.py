"""Adverse events on the patient aggregate: first report, follow-ups, resends, and the rules a
report shares with the other records (contract: "Clinical evidence (v2)")."""

from __future__ import annotations

from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from contracts.enrollment import AdverseEventReported, AdverseEventUpdated
from services.enrollment.domain import (
    PatientState,
    RecordClinicalEvent,
    ReportAdverseEvent,
    decide_record_clinical_event,
    decide_report_adverse_event,
    patient_view,
)
from shared.errors import Invalid
from tests.unit.enrollment.test_enrollment_domain import ENROLLED_ON, TODAY, enrolled, fold_onto, record

SUBJECT = "IGA-A-001"


def report(**overrides: object) -> ReportAdverseEvent:
    fields: dict[str, object] = {
        "term": "hyperglycaemia", "onset_on": date(2014, 3, 11), "grade": 1, "serious": False,
        "related_to": ["mp_pulse"], "causality": "probable", "outcome": "recovered",
        "resolved_on": date(2014, 3, 14),
    }
    fields.update(overrides)
    return ReportAdverseEvent.model_validate(fields)


def reported(state: PatientState, command: ReportAdverseEvent, ae_id: str = "AE-1") -> PatientState:
    return fold_onto(state, decide_report_adverse_event(state, command, SUBJECT, ae_id, today=TODAY))


def test_the_first_report_records_the_adverse_event() -> None:
    events = decide_report_adverse_event(enrolled(), report(), SUBJECT, "AE-1", today=TODAY)
    assert events == [AdverseEventReported(
        subject_id=SUBJECT, ae_id="AE-1", term="hyperglycaemia", onset_on=date(2014, 3, 11), grade=1,
        serious=False, related_to=("mp_pulse",), causality="probable", outcome="recovered",
        resolved_on=date(2014, 3, 14),
    )]


def test_the_same_report_again_changes_nothing() -> None:
    state = reported(enrolled(), report())
    assert decide_report_adverse_event(state, report(), SUBJECT, "AE-1", today=TODAY) == []


def test_a_follow_up_replaces_the_earlier_report() -> None:
    state = reported(enrolled(), report(outcome="recovering", resolved_on=None))
    events = decide_report_adverse_event(state, report(grade=2), SUBJECT, "AE-1", today=TODAY)
    assert [type(e) for e in events] == [AdverseEventUpdated]
    state = fold_onto(state, events)
    (ae,) = state.adverse_events
    assert (ae.grade, ae.outcome, ae.resolved_on) == (2, "recovered", date(2014, 3, 14))
    assert patient_view(state, SUBJECT).adverse_events == [ae]


def test_adverse_events_are_kept_apart_by_their_id_in_the_order_first_reported() -> None:
    state = reported(reported(enrolled(), report()), report(term="insomnia"), "AE-2")
    state = reported(state, report(grade=2), "AE-1")
    assert [(ae.ae_id, ae.term, ae.grade) for ae in state.adverse_events] == [
        ("AE-1", "hyperglycaemia", 2), ("AE-2", "insomnia", 1)]


def test_related_to_is_a_set() -> None:
    state = reported(enrolled(), report(related_to=["cell_infusion", "mp_pulse"]))
    resend = report(related_to=["mp_pulse", "cell_infusion", "mp_pulse"])
    assert decide_report_adverse_event(state, resend, SUBJECT, "AE-1", today=TODAY) == []


@pytest.mark.parametrize(("grade", "outcome"), [(5, "recovered"), (4, "fatal"), (1, "fatal")])
def test_grade_5_goes_with_a_fatal_outcome_and_only_with_it(grade: int, outcome: str) -> None:
    with pytest.raises(Invalid, match="grade 5"):
        decide_report_adverse_event(enrolled(), report(grade=grade, outcome=outcome, resolved_on=None),
                                    SUBJECT, "AE-1", today=TODAY)


def test_a_fatal_grade_5_event_is_accepted() -> None:
    command = report(grade=5, outcome="fatal", serious=True, resolved_on=date(2014, 4, 1))
    assert decide_report_adverse_event(enrolled(), command, SUBJECT, "AE-1", today=TODAY)


def test_resolution_before_onset_is_refused() -> None:
    with pytest.raises(Invalid, match="resolved_on 2014-03-10 is before onset_on 2014-03-11"):
        decide_report_adverse_event(enrolled(), report(resolved_on=date(2014, 3, 10)), SUBJECT, "AE-1", today=TODAY)


def test_onset_before_enrollment_is_refused() -> None:
    with pytest.raises(Invalid, match=f"before enrollment on {ENROLLED_ON}"):
        decide_report_adverse_event(enrolled(), report(onset_on=date(2014, 3, 1), resolved_on=None),
                                    SUBJECT, "AE-1", today=TODAY)


def test_onset_on_the_enrollment_date_is_accepted() -> None:
    assert decide_report_adverse_event(enrolled(), report(onset_on=ENROLLED_ON), SUBJECT, "AE-1", today=TODAY)


def test_after_death_nothing_may_begin_or_resolve() -> None:
    state = record(enrolled(), "death", date(2015, 1, 1))
    with pytest.raises(Invalid, match="onset_on 2015-01-02 is after IGA-A-001's death on 2015-01-01"):
        decide_report_adverse_event(state, report(onset_on=date(2015, 1, 2), resolved_on=None),
                                    SUBJECT, "AE-1", today=TODAY)
    with pytest.raises(Invalid, match="resolved_on 2015-02-01 is after"):
        decide_report_adverse_event(state, report(resolved_on=date(2015, 2, 1)), SUBJECT, "AE-1", today=TODAY)
    assert decide_report_adverse_event(state, report(), SUBJECT, "AE-1", today=TODAY)  # before death: reported late


def test_after_withdrawal_only_earlier_events_may_be_reported_or_followed_up() -> None:
    state = reported(enrolled(), report(outcome="recovering", resolved_on=None))
    state = record(state, "withdrawn", date(2014, 6, 1))
    with pytest.raises(Invalid, match="after IGA-A-001 withdrew on 2014-06-01"):
        decide_report_adverse_event(state, report(onset_on=date(2014, 6, 2), resolved_on=None),
                                    SUBJECT, "AE-2", today=TODAY)
    follow_up = decide_report_adverse_event(state, report(resolved_on=date(2014, 7, 1)), SUBJECT, "AE-1", today=TODAY)
    assert [type(e) for e in follow_up] == [AdverseEventUpdated]


def test_a_death_may_not_precede_an_adverse_event_already_recorded() -> None:
    state = reported(enrolled(), report(resolved_on=date(2015, 3, 1)))
    with pytest.raises(Invalid, match="precedes events already recorded"):
        decide_record_clinical_event(state, RecordClinicalEvent(type="death", on=date(2015, 2, 1)), SUBJECT,
                                     today=TODAY)


def test_an_adverse_event_of_a_patient_never_enrolled_is_not_found() -> None:
    with pytest.raises(Exception, match="no patient is enrolled"):
        decide_report_adverse_event(PatientState(), report(), SUBJECT, "AE-1", today=TODAY)


@pytest.mark.parametrize("field", ["onset_on", "resolved_on"])
def test_clinical_date_bounds_apply(field: str) -> None:
    with pytest.raises(Invalid, match=f"{field} 2999-01-01 is after"):
        decide_report_adverse_event(enrolled(), report(**{field: date(2999, 1, 1)}), SUBJECT, "AE-1", today=TODAY)


@pytest.mark.parametrize("body", [{"grade": 0}, {"grade": 6}, {"causality": "likely"}, {"related_to": ["surgery"]},
                                  {"outcome": "dead"}, {"term": ""}, {"unknown": 1}])
def test_the_body_is_validated(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        report(**body)


@given(st.lists(st.tuples(st.sampled_from(["AE-1", "AE-2", "AE-3"]), st.integers(1, 4)), max_size=12))
def test_the_state_is_the_latest_report_of_each_adverse_event(reports: list[tuple[str, int]]) -> None:
    state = enrolled()
    for ae_id, grade in reports:
        state = reported(state, report(grade=grade), ae_id)
    latest = dict(reports)
    assert {ae.ae_id: ae.grade for ae in state.adverse_events} == latest
    assert [ae.ae_id for ae in state.adverse_events] == list(dict.fromkeys(ae_id for ae_id, _ in reports))

