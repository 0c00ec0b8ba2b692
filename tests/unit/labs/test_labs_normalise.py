"""Accepted analytes, unit spellings and the static/clock checks of one result."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.labs import ACCEPTED_CODES
from services.labs.catalogue import measure, normalise_unit, validate_result
from services.labs.inputs import IncomingResult, LabRejection, raw_for_report, rejection_event
from shared.errors import Invalid

NOW = datetime(2024, 1, 1, tzinfo=UTC)


def result(**changes) -> IncomingResult:
    fields = dict(
        message_id="m-1", subject_id="IGA-A-001", lab_id="LAB1", source="broker", loinc="2160-0",
        value=2.1, unit="mg/dL", collected_at=datetime(2015, 6, 1, 8, 30, tzinfo=UTC), status="final",
        result_id="r-1", raw="{}",
    )
    return IncomingResult(**(fields | changes))


def rejection_code(**changes) -> str:
    with pytest.raises(LabRejection) as caught:
        validate_result(result(**changes), NOW)
    return caught.value.code


def test_accepted_codes_table():
    egfr_codes = {"98979-8", "33914-3", "48642-3", "48643-1", "62238-1", "69405-9", "50044-7", "88293-6",
                  "88294-4", "77147-7", "94677-2", "98980-6"}
    assert {code for code, entry in ACCEPTED_CODES.items() if entry.analyte == "egfr"} == egfr_codes
    assert ACCEPTED_CODES["2160-0"].unit == "mg/dL"
    assert ACCEPTED_CODES["14682-9"].unit == "umol/L"
    assert all(entry.meaning for entry in ACCEPTED_CODES.values())


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("mg/dL", "mg/dL"), ("mg/dl", "mg/dL"), ("MG/DL", "mg/dL"), (" mg/dL ", "mg/dL"),
        ("umol/L", "umol/L"), ("\u00b5mol/L", "umol/L"), ("\u03bcmol/L", "umol/L"), ("umol/l", "umol/L"),
        ("mL/min/{1.73_m2}", "mL/min/1.73m2"), ("mL/min/1.73m2", "mL/min/1.73m2"),
        ("mL/min/1.73 m2", "mL/min/1.73m2"), ("ml/min/1.73m\u00b2", "mL/min/1.73m2"),
        ("mL/min/1.73m^2", "mL/min/1.73m2"), ("mL/min/{1.73 m2}", "mL/min/1.73m2"),
    ],
)
def test_unit_spellings(spelling, canonical):
    assert normalise_unit(spelling) == canonical


@pytest.mark.parametrize("unit", ["", "mmol/L", "mg", "mL/min", "g/dL", "mg/dL; DROP TABLE x"])
def test_unknown_units(unit):
    assert normalise_unit(unit) is None


def test_creatinine_umol_is_converted_to_mg_dl_by_the_kdigo_factor():
    for umol, mg_dl in ((88.4, 1.0), (176.8, 2.0), (884.0, 10.0)):  # µmol/L ÷ 88.4, exactly
        measured = measure(result(loinc="14682-9", value=umol, unit="\u00b5mol/L"))
        assert (measured.analyte, measured.canonical_unit, measured.canonical_value) == ("creatinine", "mg/dL", mg_dl)


@given(st.floats(min_value=0.1, max_value=2652.0))
def test_any_creatinine_in_umol_is_divided_by_88_4(umol):
    assert measure(result(loinc="14682-9", value=umol, unit="umol/L")).canonical_value == umol / 88.4


def test_reported_egfr_is_kept():
    measured = measure(result(loinc="62238-1", value=27.5, unit="mL/min/{1.73_m2}"))
    assert (measured.analyte, measured.canonical_value, measured.canonical_unit) == ("egfr", 27.5, "mL/min/1.73m2")


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"loinc": "1234-5"}, "unknown_loinc"),
        ({"loinc": "glucose"}, "unknown_loinc"),
        ({"unit": "mmol/L"}, "unit_mismatch"),
        ({"unit": "umol/L"}, "unit_mismatch"),  # 2160-0 is mass concentration
        ({"loinc": "98979-8", "unit": "mg/dL"}, "unit_mismatch"),
        ({"value": math.nan}, "non_finite_value"),
        ({"value": math.inf}, "non_finite_value"),
        ({"value": 0.0}, "value_out_of_range"),
        ({"value": -1.0}, "value_out_of_range"),
        ({"value": 30.01}, "value_out_of_range"),
        ({"loinc": "14682-9", "unit": "umol/L", "value": 2700.0}, "value_out_of_range"),
        ({"loinc": "98979-8", "unit": "mL/min/1.73m2", "value": 0.0}, "value_out_of_range"),
        ({"loinc": "98979-8", "unit": "mL/min/1.73m2", "value": 200.5}, "value_out_of_range"),
        ({"collected_at": NOW + timedelta(hours=1)}, "collected_in_future"),
        ({"collected_at": datetime(1899, 12, 31, 23, 59, tzinfo=UTC)}, "collected_too_early"),
        ({"subject_id": ""}, "bad_subject_id"),
        ({"subject_id": "'; DROP TABLE patients;--"}, "bad_subject_id"),
        ({"result_id": ""}, "bad_result_id"),
        ({"result_id": "r 1"}, "bad_result_id"),
        ({"message_id": ""}, "bad_message_id"),
        ({"lab_id": "lab\x00"}, "bad_lab_id"),
    ],
)
def test_specific_rejections(changes, code):
    assert rejection_code(**changes) == code


def test_bounds_are_inclusive_where_the_contract_says():
    validate_result(result(value=30.0), NOW)
    validate_result(result(loinc="98979-8", unit="mL/min/1.73m2", value=200.0), NOW)
    validate_result(result(collected_at=datetime(1900, 1, 1, tzinfo=UTC)), NOW)
    validate_result(result(collected_at=NOW + timedelta(minutes=4)), NOW)  # lab clock skew


def test_rejection_is_a_422_domain_error_and_becomes_an_event():
    with pytest.raises(LabRejection) as caught:
        validate_result(result(loinc="1234-5"), NOW)
    error = caught.value
    assert isinstance(error, Invalid) and error.status_code == 422
    event = rejection_event(error, source="broker")
    assert (event.code, event.message_id, event.subject_id, event.raw) == ("unknown_loinc", "m-1", "IGA-A-001", "{}")
    assert "1234-5" in event.reason


def test_collected_at_must_be_aware_and_is_stored_in_utc():
    with pytest.raises(ValueError):
        result(collected_at=datetime(2015, 6, 1, 8, 30))
    local = datetime.fromisoformat("2015-06-01T10:30:00+02:00")
    assert result(collected_at=local).collected_at == datetime(2015, 6, 1, 8, 30, tzinfo=UTC)


@given(st.text(max_size=40))
def test_normalise_unit_never_raises(unit):
    assert normalise_unit(unit) in (None, "mg/dL", "umol/L", "mL/min/1.73m2")


def test_raw_for_report_keeps_bad_bytes_visible_and_bounded():
    assert raw_for_report(b"ok \xff") == "ok \\xff"
    assert raw_for_report(b"x" * 20, limit=8) == "xxxxxxxx... [12 more bytes]"
    error = LabRejection("payload is not valid UTF-8", "bad_encoding")
    assert rejection_event(error, source="broker", raw=raw_for_report(b"\xfe")).raw == "\\xfe"
