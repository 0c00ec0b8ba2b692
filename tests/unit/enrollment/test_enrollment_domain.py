"""Enrollment decider: eligibility, pseudonyms, clinical events, biopsies, replay."""

from __future__ import annotations

import re
from datetime import date, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from contracts.enrollment import (
    BiopsyRecorded,
    DialysisStarted,
    KidneyTransplanted,
    PatientDied,
    PatientEnrolled,
    PatientWithdrawn,
)
from services.enrollment.domain import (
    INITIAL_STATE,
    EnrollPatient,
    PatientState,
    RecordBiopsy,
    RecordClinicalEvent,
    decide_enroll_patient,
    decide_record_biopsy,
    decide_record_clinical_event,
    evolve,
    fold,
    patient_view,
)
from shared.errors import Conflict, DomainError, Invalid, NotFound
from shared.events import DomainEvent, registry
from shared.personal_data import check_pseudonym

ENROLLED_ON = date(2014, 3, 2)
TODAY = date(2026, 12, 5)


def enroll_command(**overrides: object) -> EnrollPatient:
    fields: dict[str, object] = {
        "subject_id": "IGA-A-001",
        "sex": "F",
        "age_years": 58,
        "weight_kg": 61.5,
        "group": "A",
        "enrolled_on": ENROLLED_ON,
        "baseline_egfr": 27.0,
        "lee_grade": "IV",
    }
    fields.update(overrides)
    return EnrollPatient.model_validate(fields)


def enrolled(**overrides: object) -> PatientState:
    return fold(decide_enroll_patient(INITIAL_STATE, enroll_command(**overrides), today=TODAY))


def record(state: PatientState, type_: str, on: date) -> PatientState:
    events = decide_record_clinical_event(state, RecordClinicalEvent(type=type_, on=on), "IGA-A-001", today=TODAY)
    return fold_onto(state, events)


def fold_onto(state: PatientState, events: list[DomainEvent]) -> PatientState:
    for event in events:
        state = evolve(state, event)
    return state


# --------------------------------------------------------------------------- enrollment


def test_contract_example_enrolls_the_patient_with_every_field() -> None:
    command = enroll_command(mest_c={"M": 1, "E": 0, "S": 1, "T": 2, "C": 0})

    events = decide_enroll_patient(INITIAL_STATE, command, today=TODAY)

    assert events == [
        PatientEnrolled(
            subject_id="IGA-A-001",
            sex="F",
            age_years=58,
            weight_kg=61.5,
            group="A",
            enrolled_on=ENROLLED_ON,
            baseline_egfr=27.0,
            lee_grade="IV",
            mest_c={"M": 1, "E": 0, "S": 1, "T": 2, "C": 0},
        )
    ]


def test_command_reads_the_contract_json() -> None:
    command = EnrollPatient.model_validate_json(
        '{"subject_id": "IGA-A-001", "sex": "F", "age_years": 58, "weight_kg": 61.5, "group": "A",'
        ' "enrolled_on": "2014-03-02", "baseline_egfr": 27.0, "lee_grade": "IV"}'
    )
    assert command.enrolled_on == ENROLLED_ON


def test_group_a_with_egfr_50_is_ineligible() -> None:
    with pytest.raises(Invalid, match=r"group A requires a baseline eGFR below 45.*50 is not"):
        decide_enroll_patient(INITIAL_STATE, enroll_command(baseline_egfr=50.0), today=TODAY)


@pytest.mark.parametrize("egfr", [45.0, 45.000001, 90.0])
def test_group_a_needs_egfr_strictly_below_45(egfr: float) -> None:
    with pytest.raises(Invalid):
        decide_enroll_patient(INITIAL_STATE, enroll_command(baseline_egfr=egfr), today=TODAY)


def test_group_a_accepts_egfr_just_below_45() -> None:
    assert decide_enroll_patient(INITIAL_STATE, enroll_command(baseline_egfr=44.99), today=TODAY)


def test_group_a_without_egfr_is_ineligible() -> None:
    with pytest.raises(Invalid, match="none was given"):
        decide_enroll_patient(INITIAL_STATE, enroll_command(baseline_egfr=None), today=TODAY)


def test_group_b_with_lee_iii_is_ineligible() -> None:
    with pytest.raises(Invalid, match="group B requires Lee grade IV or V; Lee grade III was given"):
        decide_enroll_patient(INITIAL_STATE, enroll_command(group="B", lee_grade="III", baseline_egfr=None), today=TODAY)


def test_group_b_without_lee_grade_is_ineligible() -> None:
    with pytest.raises(Invalid, match="no Lee grade was given"):
        decide_enroll_patient(INITIAL_STATE, enroll_command(group="B", lee_grade=None), today=TODAY)


@pytest.mark.parametrize("grade", ["IV", "V"])
def test_group_b_accepts_lee_iv_and_v_whatever_the_egfr(grade: str) -> None:
    events = decide_enroll_patient(INITIAL_STATE, enroll_command(group="B", lee_grade=grade, baseline_egfr=80.0), today=TODAY)
    assert events[0].group == "B"


def test_control_requires_neither_criterion() -> None:
    command = enroll_command(subject_id="CTRL-01", group="control", baseline_egfr=None, lee_grade=None)
    assert decide_enroll_patient(INITIAL_STATE, command, today=TODAY)[0].group == "control"


def test_enrolling_twice_is_a_conflict() -> None:
    with pytest.raises(Conflict, match="already enrolled"):
        decide_enroll_patient(enrolled(), enroll_command(), today=TODAY)


@pytest.mark.parametrize(
    "overrides",
    [
        {"age_years": -1},
        {"age_years": 121},
        {"weight_kg": 0},
        {"weight_kg": float("nan")},
        {"baseline_egfr": 0},
        {"sex": "X"},
        {"group": "C"},
        {"lee_grade": "VI"},
        {"enrolled_on": "not a date"},
        {"date_of_birth": "1990-01-02"},
        {"mest_c": {"T": 3}},
    ],
)
def test_command_refuses_malformed_fields(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        enroll_command(**overrides)


def test_commands_are_immutable() -> None:
    with pytest.raises(ValidationError):
        enroll_command().weight_kg = 70.0  # type: ignore[misc]


# --------------------------------------------------------------------------- pseudonyms


@pytest.mark.parametrize("subject_id", ["IGA-A-001", "IGA-B-12", "CTRL-01", "P0007", "CTRL-A", "S_12.3", "7"])
def test_study_codes_are_accepted(subject_id: str) -> None:
    check_pseudonym(subject_id)


@pytest.mark.parametrize(
    ("subject_id", "pattern"),
    [
        ("John Doe", "a person's name"),
        ("Doe, John", "a person's name"),
        ("O'Brien", "a person's name"),
        ("John", "a person's name"),
        ("Jean-Luc", "a person's name"),
        ("1990-01-02", "a date"),
        ("02/01/1990", "a date"),
        ("19900102", "a date"),
        ("02011990", "a date"),
        ("IGA-1990-01-02", "a date"),
        ("2 Jan 1990", "a date"),
        ("+44 20 7946 0958", "a phone number"),
        ("555-123-4567", "a phone number"),
        ("(555) 1234567", "a phone number"),
        ("MRN123", "a medical record number"),
        ("mrn-77", "a medical record number"),
        ("123456", "a medical record number"),
        ("P1234567", "a medical record number"),
        ("jdoe@example.org", "an email address"),
    ],
)
def test_personal_data_is_refused_naming_the_pattern(subject_id: str, pattern: str) -> None:
    with pytest.raises(Invalid) as refused:
        check_pseudonym(subject_id)
    assert pattern in refused.value.reason
    assert subject_id not in refused.value.reason  # refusals are logged: never echo the data


@pytest.mark.parametrize(
    ("subject_id", "rule"),
    [("", "1 to 64 characters"), ("A" * 65 + "1", "1 to 64 characters"), ("IGA A 1", "ASCII letters"), ("ABC", "digit")],
)
def test_badly_shaped_ids_are_refused(subject_id: str, rule: str) -> None:
    with pytest.raises(Invalid, match=rule):
        check_pseudonym(subject_id)


@pytest.mark.parametrize("subject_id", ["-1", "-IGA-A-001", "=1+2", "+12", "@SUM-1", "=HYPERLINK(1)"])
def test_ids_a_spreadsheet_reads_as_a_formula_are_refused(subject_id: str) -> None:
    with pytest.raises(Invalid) as refused:
        check_pseudonym(subject_id)
    assert refused.value.reason.startswith("the subject id must not start with '-', '=', '+' or '@'")
    assert "formula" in refused.value.reason


def test_enrollment_checks_the_pseudonym() -> None:
    with pytest.raises(Invalid, match="a date"):
        decide_enroll_patient(INITIAL_STATE, enroll_command(subject_id="1990-01-02"), today=TODAY)


study_codes = st.from_regex(r"[A-Z]{1,5}(-[A-Z]{1,2})?-[0-9]{1,4}|[A-Z]{1,3}[0-9]{1,5}", fullmatch=True)
birth_dates = st.dates(min_value=date(1900, 1, 1), max_value=date(2030, 12, 31))
date_formats = st.sampled_from(
    ["%Y-%m-%d", "%d/%m/%Y", "%m/%d/%Y", "%Y%m%d", "%d.%m.%Y", "%d-%m-%y", "%d%b%Y", "%d %B %Y", "%Y/%m/%d"]
)
phones = st.from_regex(r"\+?[0-9]{2,3}([ -]?[0-9]{2,4}){2,4}", fullmatch=True).filter(
    lambda s: sum(c.isdigit() for c in s) >= 7
)
capitalised = st.from_regex(r"[A-Z][a-z]{1,12}", fullmatch=True)
names = st.one_of(
    st.builds(lambda first, last: f"{first} {last}", capitalised, capitalised),
    st.builds(lambda first, last: f"{last}, {first}", capitalised, capitalised),
    st.builds(lambda first, last: f"{first}-{last}", capitalised, capitalised),
    st.builds(lambda first, last: f"{first}.{last}", capitalised, capitalised),
)
emails = st.emails()


@given(study_codes)
def test_any_study_code_is_accepted(subject_id: str) -> None:
    check_pseudonym(subject_id)


@given(birth_dates, date_formats, st.sampled_from(["", "IGA-", "P"]))
def test_any_written_date_is_refused(day: date, fmt: str, prefix: str) -> None:
    with pytest.raises(Invalid, match="a date"):
        check_pseudonym(prefix + day.strftime(fmt))


@given(phones)
def test_any_phone_number_is_refused(subject_id: str) -> None:
    with pytest.raises(Invalid, match="a phone number|a date|a medical record number"):
        check_pseudonym(subject_id)


@given(names)
def test_any_name_is_refused(subject_id: str) -> None:
    with pytest.raises(Invalid, match="a person's name"):
        check_pseudonym(subject_id)


@given(emails)
def test_any_email_is_refused(subject_id: str) -> None:
    with pytest.raises(Invalid, match="an email address"):
        check_pseudonym(subject_id)


@given(st.text(max_size=80))
def test_whatever_is_accepted_has_the_pseudonym_shape(subject_id: str) -> None:
    try:
        check_pseudonym(subject_id)
    except Invalid:
        return
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", subject_id)
    assert not subject_id.startswith(("-", "=", "+", "@"))
    assert re.search(r"[0-9-]", subject_id)
    assert not re.search(r"[0-9]{6}", subject_id)
    assert "mrn" not in subject_id.lower()


# --------------------------------------------------------------------------- clinical events


@pytest.mark.parametrize(
    ("type_", "model"),
    [
        ("dialysis_started", DialysisStarted),
        ("kidney_transplant", KidneyTransplanted),
        ("death", PatientDied),
        ("withdrawn", PatientWithdrawn),
    ],
)
def test_each_clinical_event_type_is_published_as_its_event(type_: str, model: type[DomainEvent]) -> None:
    events = decide_record_clinical_event(
        enrolled(), RecordClinicalEvent(type=type_, on=date(2016, 5, 1)), "IGA-A-001", today=TODAY
    )
    assert events == [model(subject_id="IGA-A-001", on=date(2016, 5, 1))]


def test_clinical_event_of_unknown_patient_is_not_found() -> None:
    with pytest.raises(NotFound, match="IGA-X-9"):
        decide_record_clinical_event(INITIAL_STATE, RecordClinicalEvent(type="death", on=ENROLLED_ON), "IGA-X-9", today=TODAY)


def test_each_clinical_event_type_is_recorded_once() -> None:
    state = record(enrolled(), "dialysis_started", date(2016, 5, 1))
    with pytest.raises(Conflict, match="dialysis_started is already recorded"):
        record(state, "dialysis_started", date(2016, 6, 1))


def test_clinical_event_before_enrollment_is_invalid() -> None:
    with pytest.raises(Invalid, match="before enrollment"):
        record(enrolled(), "kidney_transplant", ENROLLED_ON - timedelta(days=1))


def test_clinical_event_on_enrollment_day_is_accepted() -> None:
    assert record(enrolled(), "dialysis_started", ENROLLED_ON).event_on("dialysis_started") == ENROLLED_ON


@pytest.mark.parametrize("type_", ["dialysis_started", "kidney_transplant", "withdrawn"])
def test_nothing_is_recorded_after_death(type_: str) -> None:
    state = record(enrolled(), "death", date(2016, 1, 1))
    with pytest.raises(Conflict, match="died on 2016-01-01"):
        record(state, type_, date(2016, 1, 1))


@pytest.mark.parametrize("type_", ["dialysis_started", "kidney_transplant"])
def test_after_withdrawal_only_death_is_recorded(type_: str) -> None:
    state = record(enrolled(), "withdrawn", date(2015, 1, 1))
    with pytest.raises(Conflict, match="only death may still be recorded"):
        record(state, type_, date(2016, 1, 1))
    assert record(state, "death", date(2018, 1, 1)).status == "deceased"


def test_death_cannot_precede_what_is_already_recorded() -> None:
    state = record(enrolled(), "dialysis_started", date(2016, 5, 1))
    with pytest.raises(Invalid, match="precedes events already recorded"):
        record(state, "death", date(2016, 4, 30))
    assert record(state, "death", date(2016, 5, 1)).event_on("death") == date(2016, 5, 1)


def test_death_cannot_precede_the_withdrawal() -> None:
    state = record(enrolled(), "withdrawn", date(2016, 5, 1))
    with pytest.raises(Invalid, match="precedes"):
        record(state, "death", date(2016, 1, 1))


# --------------------------------------------------------------------------- biopsies


def biopsy(state: PatientState, on: date, **findings: object) -> list[DomainEvent]:
    return decide_record_biopsy(state, RecordBiopsy(performed_on=on, **findings), "IGA-A-001", today=TODAY)


def test_biopsy_is_recorded_with_its_findings() -> None:
    events = biopsy(enrolled(), date(2015, 3, 1), mesangial_deposits=True, iga_immunofluorescence="2+", lee_grade="III")
    assert events == [
        BiopsyRecorded(
            subject_id="IGA-A-001",
            performed_on=date(2015, 3, 1),
            mesangial_deposits=True,
            iga_immunofluorescence="2+",
            lee_grade="III",
        )
    ]


def test_biopsy_of_unknown_patient_is_not_found() -> None:
    with pytest.raises(NotFound):
        biopsy(INITIAL_STATE, date(2015, 3, 1))


def test_biopsy_before_enrollment_is_invalid() -> None:
    with pytest.raises(Invalid, match="before enrollment"):
        biopsy(enrolled(), ENROLLED_ON - timedelta(days=1))


def test_biopsy_after_death_is_invalid() -> None:
    state = record(enrolled(), "death", date(2016, 1, 1))
    with pytest.raises(Invalid, match="after IGA-A-001's death"):
        biopsy(state, date(2016, 1, 2))


def test_biopsy_after_withdrawal_is_invalid_but_one_taken_before_is_kept() -> None:
    state = record(enrolled(), "withdrawn", date(2016, 1, 1))
    with pytest.raises(Invalid, match="withdrew on 2016-01-01"):
        biopsy(state, date(2016, 1, 2))
    assert biopsy(state, date(2015, 12, 31))


def test_a_second_biopsy_on_the_same_date_is_a_conflict() -> None:
    state = fold_onto(enrolled(), biopsy(enrolled(), date(2015, 3, 1)))
    with pytest.raises(Conflict, match="already recorded"):
        biopsy(state, date(2015, 3, 1))


def test_biopsy_command_refuses_unknown_immunofluorescence() -> None:
    with pytest.raises(ValidationError):
        RecordBiopsy(performed_on=date(2015, 3, 1), iga_immunofluorescence="4+")


# --------------------------------------------------------------------------- view


def test_patient_view_of_unknown_patient_is_not_found() -> None:
    with pytest.raises(NotFound):
        patient_view(INITIAL_STATE, "IGA-A-001")


def test_patient_view_shows_demographics_events_biopsies_and_status() -> None:
    state = enrolled()
    assert patient_view(state, "IGA-A-001").status == "active"
    state = fold_onto(state, biopsy(state, date(2015, 3, 1), foot_process_effacement=False))
    state = record(state, "dialysis_started", date(2016, 5, 1))
    state = record(state, "withdrawn", date(2017, 1, 1))
    assert patient_view(state, "IGA-A-001").status == "withdrawn"
    state = record(state, "death", date(2019, 1, 1))

    view = patient_view(state, "IGA-A-001")

    assert view.model_dump(mode="json") == {
        "subject_id": "IGA-A-001",
        "sex": "F",
        "age_years": 58,
        "weight_kg": 61.5,
        "group": "A",
        "enrolled_on": "2014-03-02",
        "baseline_egfr": 27.0,
        "lee_grade": "IV",
        "mest_c": None,
        "status": "deceased",
        "dialysis_started_on": "2016-05-01",
        "kidney_transplant_on": None,
        "died_on": "2019-01-01",
        "withdrawn_on": "2017-01-01",
        "clinical_events": [
            {"type": "dialysis_started", "on": "2016-05-01"},
            {"type": "withdrawn", "on": "2017-01-01"},
            {"type": "death", "on": "2019-01-01"},
        ],
        "biopsies": [
            {
                "performed_on": "2015-03-01",
                "mesangial_deposits": None,
                "iga_immunofluorescence": None,
                "mesangial_proliferation": None,
                "foot_process_effacement": False,
                "lee_grade": None,
            }
        ],
        "adverse_events": [],
    }


# --------------------------------------------------------------------------- replay properties

days_after_enrollment = st.integers(min_value=-30, max_value=3000).map(lambda n: ENROLLED_ON + timedelta(days=n))
patient_commands = st.lists(
    st.one_of(
        st.builds(
            RecordClinicalEvent,
            type=st.sampled_from(["dialysis_started", "kidney_transplant", "death", "withdrawn"]),
            on=days_after_enrollment,
        ),
        st.builds(RecordBiopsy, performed_on=days_after_enrollment, lee_grade=st.none() | st.sampled_from(["I", "V"])),
    ),
    max_size=12,
)


def run(commands: list[RecordClinicalEvent | RecordBiopsy]) -> tuple[PatientState, list[DomainEvent]]:
    """Decide each command against the state so far, keeping what was accepted."""
    history = decide_enroll_patient(INITIAL_STATE, enroll_command(), today=TODAY)
    state = fold(history)
    for command in commands:
        try:
            if isinstance(command, RecordClinicalEvent):
                events = decide_record_clinical_event(state, command, "IGA-A-001", today=TODAY)
            else:
                events = decide_record_biopsy(state, command, "IGA-A-001", today=TODAY)
        except DomainError:
            continue
        history += events
        state = fold_onto(state, events)
    return state, history


@settings(deadline=None)
@given(patient_commands)
def test_replaying_the_decided_events_rebuilds_the_same_state(commands: list) -> None:
    state, history = run(commands)

    stored = [registry.decode(e.event_type, e.schema_version, e.model_dump(mode="json")) for e in history]

    assert fold(history) == state
    assert fold(stored) == state
    assert fold(stored) == fold(stored)


@settings(deadline=None)
@given(patient_commands)
def test_recorded_history_is_clinically_consistent(commands: list) -> None:
    state, history = run(commands)

    types = [e.type for e in state.clinical_events]
    assert len(types) == len(set(types))
    dates = [e.on for e in state.clinical_events] + [b.performed_on for b in state.biopsies]
    assert all(d >= ENROLLED_ON for d in dates)
    died_on = state.event_on("death")
    if died_on is not None:
        assert all(d <= died_on for d in dates)
    withdrawn_on = state.event_on("withdrawn")
    if withdrawn_on is not None:
        after = history[[type(e) for e in history].index(PatientWithdrawn) + 1 :]
        assert all(isinstance(e, PatientDied | BiopsyRecorded) for e in after)
        assert all(b.performed_on <= withdrawn_on for b in after if isinstance(b, BiopsyRecorded))
