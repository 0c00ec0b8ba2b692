"""The bounds of a clinical date (shared.clinical_dates), the same for every command that carries
one: 1899-12-31 refused, 1900-01-01 accepted, today + 1 day accepted, today + 2 days refused,
each refusal naming the field and the bound. Lab collection times share the lower bound (their
upper bound is labs' own, 5 minutes ahead: tests/unit/labs/test_labs_normalise.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.cells import domain as cells
from services.enrollment import domain as enrollment
from services.labs.catalogue import measure
from services.labs.inputs import IncomingResult, LabRejection
from services.pulse import domain as pulse
from shared.clinical_dates import EARLIEST_CLINICAL_DATE, check_clinical_date
from shared.errors import Invalid

TODAY = date(2026, 12, 5)
EARLIEST = date(1900, 1, 1)
SUBJECT = "IGA-A-001"


def enroll(on: date) -> object:
    command = enrollment.EnrollPatient(
        subject_id=SUBJECT, sex="F", age_years=58, weight_kg=61.5, group="A", enrolled_on=on, baseline_egfr=27.0
    )
    enrollment.check_enrollable(command, today=TODAY)
    return enrollment.decide_enroll_patient(enrollment.INITIAL_STATE, command, today=TODAY)


def enrolled_on_earliest() -> enrollment.PatientState:
    return enrollment.fold(enroll(EARLIEST))  # type: ignore[arg-type]


def clinical_event(type_: str) -> Callable[[date], object]:
    def record(on: date) -> object:
        command = enrollment.RecordClinicalEvent(type=type_, on=on)  # type: ignore[arg-type]
        return enrollment.decide_record_clinical_event(enrolled_on_earliest(), command, SUBJECT, today=TODAY)

    return record


def biopsy(on: date) -> object:
    command = enrollment.RecordBiopsy(performed_on=on, lee_grade="III")
    return enrollment.decide_record_biopsy(enrolled_on_earliest(), command, SUBJECT, today=TODAY)


def pulse_dose(on: date) -> object:
    known = pulse.KnownPatient(subject_id=SUBJECT, group="A", enrolled_on=EARLIEST)
    command = pulse.AdministerPulseDose(cycle=1, day=1, given_on=on, dose_mg=1000, weight_kg=40)
    return pulse.decide_administer_pulse_dose(pulse.INITIAL_STATE, command, known, SUBJECT, today=TODAY)


KNOWN_TO_CELLS = cells.KnownPatient(subject_id=SUBJECT, group="A", enrolled_on=EARLIEST)


def harvest(on: date) -> object:
    command = cells.HarvestAdiposeTissue(harvested_on=on, fat_grams=120)
    return cells.decide_harvest(cells.NO_CELL_PATIENT, command, KNOWN_TO_CELLS, SUBJECT, "LOT-1", today=TODAY)


def infusion(on: date) -> object:
    harvested = harvest(EARLIEST)
    qc = cells.ReleaseLot(cell_count=3.1e7, viability_pct=92)
    released = cells.decide_release(cells.fold_lot(harvested), qc, "LOT-1")
    history = [*harvested, *released]  # type: ignore[misc]
    command = cells.InfuseCells(lot_id="LOT-1", given_on=on, cell_count=3.0e7)
    return cells.decide_infusion(cells.fold_lot(history), cells.fold_patient(history), SUBJECT, command, today=TODAY)


COMMANDS: dict[str, tuple[Callable[[date], object], str]] = {
    "enrollment": (enroll, "enrolled_on"),
    "dialysis_started": (clinical_event("dialysis_started"), "dialysis_started on"),
    "kidney_transplant": (clinical_event("kidney_transplant"), "kidney_transplant on"),
    "death": (clinical_event("death"), "death on"),
    "withdrawn": (clinical_event("withdrawn"), "withdrawn on"),
    "biopsy": (biopsy, "performed_on"),
    "pulse dose": (pulse_dose, "given_on"),
    "harvest": (harvest, "harvested_on"),
    "infusion": (infusion, "given_on"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("on", [EARLIEST, TODAY + timedelta(days=1)], ids=["1900-01-01", "today+1"])
def test_a_date_within_the_bounds_is_accepted(command: str, on: date) -> None:
    decide, _ = COMMANDS[command]
    assert decide(on)


OUT_OF_BOUNDS = [
    (date(1899, 12, 31), "is before 1900-01-01", "DateTooEarly"),
    (date(1, 1, 1), "is before 1900-01-01", "DateTooEarly"),
    (TODAY + timedelta(days=2), "is after 2026-12-06 (today + 1 day)", "DateInFuture"),
    (date(9999, 12, 31), "is after 2026-12-06 (today + 1 day)", "DateInFuture"),
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("on", "bound", "code"), OUT_OF_BOUNDS, ids=["1899-12-31", "0001-01-01", "today+2", "9999-12-31"]
)
def test_a_date_out_of_bounds_is_refused_naming_the_field_and_the_bound(
    command: str, on: date, bound: str, code: str
) -> None:
    decide, field = COMMANDS[command]
    with pytest.raises(Invalid) as refused:
        decide(on)
    assert refused.value.reason.startswith(f"{field} {on.isoformat()} {bound}")
    assert refused.value.code == code


def test_an_enrollment_refused_for_its_date_is_refused_before_its_key_is_made() -> None:
    command = enrollment.EnrollPatient(
        subject_id=SUBJECT, sex="F", age_years=58, weight_kg=61.5, group="A", enrolled_on=date(1, 1, 1),
        baseline_egfr=27.0,
    )
    with pytest.raises(Invalid, match="enrolled_on 0001-01-01 is before 1900-01-01"):
        enrollment.check_enrollable(command, today=TODAY)


@given(st.dates(), st.dates(min_value=date(2000, 1, 1), max_value=date(2100, 1, 1)))
def test_a_date_is_accepted_exactly_when_within_1900_and_tomorrow(on: date, today: date) -> None:
    within = EARLIEST_CLINICAL_DATE <= on <= today + timedelta(days=1)
    try:
        check_clinical_date("on", on, today=today)
    except Invalid:
        assert not within
    else:
        assert within


def lab_result(collected_at: datetime) -> IncomingResult:
    return IncomingResult(
        message_id="m1", subject_id=SUBJECT, source="broker", loinc="2160-0", value=2.1, unit="mg/dL",
        collected_at=collected_at, status="final", result_id="r1", raw="{}",
    )


def test_a_lab_result_collected_before_1900_is_refused_with_its_own_code() -> None:
    with pytest.raises(LabRejection) as refused:
        measure(lab_result(datetime(1899, 12, 31, 23, 59, tzinfo=UTC)))
    assert refused.value.code == "collected_too_early"
    assert refused.value.reason == (
        "collected_at 1899-12-31T23:59:00+00:00 is before 1900-01-01, the earliest clinical date accepted"
    )
    measure(lab_result(datetime(1900, 1, 1, tzinfo=UTC)))
