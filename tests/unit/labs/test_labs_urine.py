"""Urine protein (UPCR, 24-hour protein, UACR): the catalogue's codes and units, the conversions to
the kept units, the bounds, and the decider's UrineResultMeasured with the rules of creatinine."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.labs import ACCEPTED_CODES, URINE_UNITS, EgfrComputed, LabResultCorrected, UrineResultMeasured
from services.labs.catalogue import CREATININE_MG_PER_MMOL, convert, measure, normalise_unit
from services.labs.domain import KnownPatient, decide_result, fold_result
from services.labs.inputs import IncomingResult, LabRejection

NOW = datetime(2024, 1, 1, tzinfo=UTC)
PATIENT = KnownPatient("IGA-A-001", "F", 58, date(2014, 3, 2))


def urine(message_id: str = "m1", status: str = "final", value: float = 1.2, **changes) -> IncomingResult:
    fields = dict(
        message_id=message_id, subject_id="IGA-A-001", lab_id="LAB1", source="broker", loinc="2890-2",
        value=value, unit="g/g", collected_at=datetime(2015, 6, 1, 8, 30, tzinfo=UTC), status=status,
        result_id="u-1", raw="{}",
    )
    return IncomingResult(**(fields | changes))


def refusal(result: IncomingResult) -> LabRejection:
    with pytest.raises(LabRejection) as caught:
        measure(result)
    return caught.value


# --------------------------------------------------------------------------- catalogue


def test_urine_codes_in_the_catalogue():
    urine_codes = {code: (entry.analyte, entry.units) for code, entry in ACCEPTED_CODES.items()
                   if entry.analyte in URINE_UNITS}
    assert urine_codes == {
        "2890-2": ("upcr", ("mg/g", "mg/mg", "g/g")),
        "34366-5": ("upcr", ("mg/mmol", "g/mmol")),
        "2889-4": ("protein_24h", ("g/(24.h)", "mg/(24.h)")),
        "9318-7": ("uacr", ("mg/g", "ug/mg", "g/g")),
        "14959-1": ("uacr", ("mg/g", "ug/mg")),
        "14585-4": ("uacr", ("mg/mmol",)),
    }


def test_docs_list_every_accepted_code():
    accepted = (Path(__file__).parents[3] / "docs" / "labs.md").read_text().split("## Accepted analytes")[1]
    assert [code for code in ACCEPTED_CODES if code not in accepted.split("## Rules")[0]] == []


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("g/g", "g/g"), ("G/G", "g/g"), ("mg/g", "mg/g"), ("mg/g{creat}", "mg/g"), ("mg/mg", "mg/mg"),
        ("mg/mmol", "mg/mmol"), ("mg/mmol{Creat}", "mg/mmol"), ("g/mmol", "g/mmol"),
        ("\u00b5g/mg", "ug/mg"), ("ug/mg", "ug/mg"),
        ("g/(24.h)", "g/(24.h)"), ("g/24h", "g/(24.h)"), ("g/24 h", "g/(24.h)"), ("g/d", "g/(24.h)"),
        ("g/day", "g/(24.h)"), ("mg/(24.h)", "mg/(24.h)"), ("mg/24h", "mg/(24.h)"), ("mg/d", "mg/(24.h)"),
        ("mg/24hr", "mg/(24.h)"),
    ],
)
def test_urine_unit_spellings(spelling: str, canonical: str):
    assert normalise_unit(spelling) == canonical


@pytest.mark.parametrize(
    ("loinc", "value", "unit", "analyte", "kept", "unit_kept"),
    [
        ("2890-2", 1.5, "g/g", "upcr", 1.5, "g/g"),
        ("2890-2", 1500.0, "mg/g", "upcr", 1.5, "g/g"),
        ("2890-2", 1.5, "mg/mg", "upcr", 1.5, "g/g"),
        ("34366-5", 113.12, "mg/mmol", "upcr", 1.0, "g/g"),  # the contract's factor, exactly
        ("34366-5", 0.11312, "g/mmol", "upcr", 1.0, "g/g"),
        ("2889-4", 2.4, "g/(24.h)", "protein_24h", 2.4, "g/day"),
        ("2889-4", 2400.0, "mg/24h", "protein_24h", 2.4, "g/day"),
        ("9318-7", 300.0, "mg/g", "uacr", 300.0, "mg/g"),
        ("9318-7", 300.0, "ug/mg", "uacr", 300.0, "mg/g"),
        ("9318-7", 0.3, "g/g", "uacr", 300.0, "mg/g"),
        ("14959-1", 30.0, "mg/g", "uacr", 30.0, "mg/g"),
        ("14585-4", 11.312, "mg/mmol", "uacr", 100.0, "mg/g"),
    ],
)
def test_urine_values_are_kept_in_the_analytes_unit(loinc, value, unit, analyte, kept, unit_kept):
    measured = measure(urine(loinc=loinc, value=value, unit=unit))
    assert (measured.analyte, measured.canonical_unit) == (analyte, unit_kept)
    assert measured.canonical_value == pytest.approx(kept, rel=1e-12)


def test_one_g_per_g_is_113_12_mg_per_mmol_exactly():
    assert CREATININE_MG_PER_MMOL == 113.12
    assert measure(urine(loinc="34366-5", value=113.12, unit="mg/mmol")).canonical_value == 1.0
    assert measure(urine(loinc="34366-5", value=226.24, unit="mg/mmol")).canonical_value == 2.0


_CONVERSIONS = [("mg/g", "g/g", 1000.0), ("mg/mg", "g/g", 1.0), ("mg/mmol", "g/g", 113.12),
                ("g/mmol", "g/g", 0.11312), ("mg/(24.h)", "g/day", 1000.0), ("g/g", "mg/g", 0.001),
                ("mg/mmol", "mg/g", 0.11312), ("ug/mg", "mg/g", 1.0)]


@given(st.floats(min_value=1e-3, max_value=1e4), st.sampled_from(_CONVERSIONS))
def test_conversion_round_trips(value: float, conversion: tuple[str, str, float]):
    unit, kept, per_kept = conversion
    assert convert(value, unit, kept) * per_kept == pytest.approx(value, rel=1e-12)


@given(st.floats(min_value=1e-3, max_value=1e4), st.floats(min_value=1e-3, max_value=1e4),
       st.sampled_from(_CONVERSIONS))
def test_conversion_is_monotonic(a: float, b: float, conversion: tuple[str, str, float]):
    unit, kept, _ = conversion
    low, high = sorted((a, b))
    assert convert(low, unit, kept) <= convert(high, unit, kept)


@pytest.mark.parametrize(
    ("loinc", "unit"),
    [("2890-2", "mg/mmol"), ("34366-5", "mg/g"), ("34366-5", "g/g"), ("2889-4", "g/g"), ("2889-4", "mg/dL"),
     ("9318-7", "mg/mmol"), ("14585-4", "mg/g"), ("2160-0", "mg/g"), ("98979-8", "g/g"), ("2890-2", "mg/dL")],
)
def test_a_unit_that_does_not_belong_to_the_code_is_refused(loinc: str, unit: str):
    rejection = refusal(urine(loinc=loinc, unit=unit, value=1.0))
    assert rejection.code == "unit_mismatch"
    assert f"not valid for LOINC {loinc}" in rejection.reason


@given(st.sampled_from(sorted(code for code, entry in ACCEPTED_CODES.items() if entry.analyte in URINE_UNITS)),
       st.text(min_size=1, max_size=12))
def test_any_other_unit_is_refused_with_unit_mismatch(loinc: str, unit: str):
    if normalise_unit(unit) in ACCEPTED_CODES[loinc].units:
        return
    assert refusal(urine(loinc=loinc, unit=unit, value=1.0)).code == "unit_mismatch"


@pytest.mark.parametrize(
    ("loinc", "value", "unit"),
    [("2890-2", -0.5, "g/g"), ("2890-2", 0.0, "g/g"), ("2890-2", 60.0, "g/g"), ("2890-2", 60000.0, "mg/g"),
     ("34366-5", -1.0, "mg/mmol"), ("2889-4", 80.0, "g/d"), ("2889-4", -10.0, "mg/d"), ("9318-7", 40000.0, "mg/g"),
     ("14585-4", 4000.0, "mg/mmol")],
)
def test_negative_zero_and_absurd_urine_values_are_refused(loinc: str, value: float, unit: str):
    rejection = refusal(urine(loinc=loinc, value=value, unit=unit))
    assert rejection.code == "value_out_of_range"
    assert "outside the plausible range" in rejection.reason


def test_nephrotic_values_are_accepted():
    assert measure(urine(value=12.0)).canonical_value == 12.0
    assert measure(urine(loinc="2889-4", value=20000.0, unit="mg/24h")).canonical_value == 20.0


# --------------------------------------------------------------------------- decider


def deliver(history: list, result: IncomingResult) -> list:
    new = decide_result(fold_result(history), result, PATIENT, now=NOW)
    history.extend(new)
    return new


def test_a_upcr_in_mg_mmol_is_recorded_and_measured_in_g_per_g_without_an_egfr():
    recorded, measured = deliver([], urine(loinc="34366-5", value=56.56, unit="mg/mmol"))
    assert (recorded.analyte, recorded.value, recorded.unit, recorded.canonical_unit) == (
        "upcr", 56.56, "mg/mmol", "g/g")
    assert isinstance(measured, UrineResultMeasured)
    assert (measured.analyte, measured.value, measured.unit, measured.loinc) == ("upcr", 0.5, "g/g", "34366-5")
    assert (measured.status, measured.counted, measured.source) == ("final", True, "broker")


@pytest.mark.parametrize(("loinc", "value", "unit", "analyte", "kept", "kept_unit"), [
    ("2889-4", 1800.0, "mg/(24.h)", "protein_24h", 1.8, "g/day"),
    ("9318-7", 250.0, "mg/g", "uacr", 250.0, "mg/g"),
])
def test_other_urine_analytes_are_measured_in_their_kept_unit(loinc, value, unit, analyte, kept, kept_unit):
    events = deliver([], urine(loinc=loinc, value=value, unit=unit))
    assert not any(isinstance(event, EgfrComputed) for event in events)
    measured = events[-1]
    assert (measured.analyte, measured.value, measured.unit) == (analyte, kept, kept_unit)


def test_a_preliminary_is_recorded_but_not_counted_and_the_final_supersedes_it():
    history: list = []
    assert [e.counted for e in deliver(history, urine("m1", "preliminary", 1.4))[1:]] == [False]
    final = deliver(history, urine("m2", "final", 1300.0, unit="mg/g"))
    assert [type(e).__name__ for e in final] == ["LabResultRecorded", "UrineResultMeasured"]
    assert (final[-1].value, final[-1].counted) == (1.3, True)
    assert deliver(history, urine("m3", "preliminary", 2.0))[-1].__class__.__name__ == "LabResultRecorded"


def test_a_correction_replaces_the_value_in_the_kept_unit():
    history: list = []
    deliver(history, urine("m1", value=1.2))
    corrected = deliver(history, urine("m2", "corrected", 900.0, loinc="2890-2", unit="mg/g"))
    assert [type(e).__name__ for e in corrected] == ["LabResultRecorded", "LabResultCorrected", "UrineResultMeasured"]
    correction = corrected[1]
    assert isinstance(correction, LabResultCorrected)
    assert (correction.previous_value, correction.new_value, correction.canonical_unit) == (1.2, 0.9, "g/g")
    assert fold_result(history).effective.value == 0.9


def test_a_redelivery_has_one_effect():
    history: list = []
    deliver(history, urine("m1"))
    assert deliver(history, urine("m1")) == []


def test_the_same_value_again_under_a_new_message_is_recorded_but_changes_nothing():
    history: list = []
    deliver(history, urine("m1", value=1.2))
    assert [type(e).__name__ for e in deliver(history, urine("m2", value=1200.0, unit="mg/g"))] == [
        "LabResultRecorded"]


def test_a_result_id_cannot_switch_between_urine_and_creatinine():
    history: list = []
    deliver(history, urine("m1"))
    with pytest.raises(LabRejection) as caught:
        deliver(history, urine("m2", loinc="2160-0", value=1.1, unit="mg/dL"))
    assert caught.value.code == "analyte_mismatch"
    with pytest.raises(LabRejection) as caught:
        deliver(history, urine("m3", loinc="9318-7", value=30.0, unit="mg/g"))
    assert caught.value.code == "analyte_mismatch"


def test_an_unknown_subject_is_refused():
    with pytest.raises(LabRejection) as caught:
        decide_result(None, urine(), None, now=NOW)
    assert caught.value.code == "unknown_subject"
