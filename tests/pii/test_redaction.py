"""services/labs/redaction.py, pure: identifiers out, everything else byte for byte."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.labs.catalogue import measure
from services.labs.ingest import Refusal, _rejected_event
from services.labs.inputs import LabRejection
from services.labs.redaction import REDACTED, carries_personal_data, redact, redact_reason, redact_subject

HL7 = (
    "MSH|^~\\&|LIS|LAB|NEPHROTRACK|STUDY|20160601093000||ORU^R01|C-1|P|2.5\r"
    "PID|1||IGA-A-001^^^STUDY^PI~12345678^^^HOSP^MR||Smith^John||19800203|M|||1 Main St^^Town||555-1234\r"
    "NK1|1|Doerksen^Jane|SPO\r"
    "OBR|1||F-1||||20160601083000+0000\r"
    "NTE|1||patient John Smith called\r"
    "OBX|1|NM|2160-0^Creatinine^LN||1.2|mg/dL|||||F|||20160601083000+0000\r"
)


def test_hl7_keeps_the_pseudonym_and_the_results_and_nothing_that_identifies() -> None:
    out = redact(HL7)
    assert out is not None
    for gone in ("Smith", "John", "19800203", "12345678", "Doerksen", "Main St", "555-1234"):
        assert gone not in out, gone
    assert "PID|1||IGA-A-001^^^STUDY^PI~[redacted]||[redacted]||[redacted]|" in out
    assert out.split("\r")[0] == HL7.split("\r")[0]  # MSH as it was
    assert "OBX|1|NM|2160-0^Creatinine^LN||1.2|mg/dL|||||F|||20160601083000+0000" in out
    assert "OBR|1||F-1||||20160601083000+0000" in out


def test_messages_without_identifiers_are_unchanged() -> None:
    plain_hl7 = "MSH|^~\\&|LIS|LAB|||2015||ORU^R01|C|P|2.5\rPID|1||IGA-A-001^^^STUDY^PI\rOBX|1|NM|2160-0"
    assert redact(plain_hl7) == plain_hl7
    body = json.dumps({"message_id": "m-20150601-000123", "subject_id": "IGA-A-001", "loinc": "2160-0",
                       "value": 1.2, "unit": "mg/dL", "collected_at": "2015-06-01T08:30:00Z", "status": "final"})
    assert redact(body) == body
    assert redact("\\xff\\xfe not json garbage-t1234567890-17") == "\\xff\\xfe not json garbage-t1234567890-17"
    assert redact_reason("unit 'g/L' is not valid for LOINC 2160-0") == "unit 'g/L' is not valid for LOINC 2160-0"
    assert not carries_personal_data("unit_mismatch", body)


def test_json_identifier_fields_contained_patients_and_personal_subjects_are_redacted() -> None:
    fhir = {"resourceType": "Observation", "subject": {"reference": "Patient/John Smith", "display": "John Smith"},
            "contained": [{"resourceType": "Patient", "id": "p", "birthDate": "1980-02-03",
                           "name": [{"family": "Smith"}]}],
            "identifier": [{"value": "RES-1"}], "note": [{"text": "MRN 12345678"}]}
    out = json.loads(redact(json.dumps(fhir)) or "")
    assert out["subject"] == {"reference": REDACTED, "display": REDACTED}
    assert out["contained"] == [{"resourceType": "Patient", "id": "p", "_": REDACTED}]
    assert out["identifier"] == [{"value": "RES-1"}] and out["note"] == [{"text": REDACTED}]
    broker = {"message_id": "m", "subject_id": "1980-02-03", "patient_name": "John Smith", "loinc": "2160-0"}
    assert json.loads(redact(json.dumps(broker)) or "") == {**broker, "subject_id": REDACTED, "patient_name": REDACTED}


def test_text_that_is_not_json_loses_personal_looking_values_but_keeps_keys() -> None:
    garbage = '{"subject_id": "John Smith", "dob": "1980-02-03", "n": "MRN 12345678", "id": "IGA-A-1"'
    out = redact(garbage) or ""
    assert "John" not in out and "1980" not in out and "12345678" not in out
    assert '"subject_id": ' in out and '"IGA-A-1"' in out


@pytest.mark.parametrize("subject", ["John Smith", "1980-02-03", "MRN 12345678", "MRN12345678", "03.02.1980"])
def test_a_refusal_for_a_personal_subject_records_none_of_it(subject: str) -> None:
    from datetime import UTC, datetime

    from services.labs.inputs import IncomingResult

    raw = json.dumps({"subject_id": subject, "message_id": "m-1", "result_id": "r-1"})
    incoming = IncomingResult(message_id="m-1", subject_id=subject, source="broker", loinc="2160-0", value=1.2,
                              unit="mg/dL", collected_at=datetime(2016, 1, 1, tzinfo=UTC), status="final",
                              result_id="r-1", raw=raw)
    with pytest.raises(LabRejection) as caught:
        measure(incoming)
    assert caught.value.code == "personal_identifier" and subject not in caught.value.reason
    event = _rejected_event(Refusal(caught.value, "broker"))
    recorded = event.model_dump_json()
    assert subject not in recorded and json.dumps(subject)[1:-1] not in recorded
    assert event.reason and event.code == "personal_identifier" and event.message_id == "m-1"
    # an HL7 refusal carries the subject the parser read: redacted wherever it appears
    hl7_refusal = LabRejection(f"OBX 1: unit 'x' for {subject}", "unit_mismatch", message_id="c", subject_id=subject,
                               raw=f"MSH|^~\\&|L|L|||2015||ORU^R01|c|P|2.5\rPID|1||{subject}\rOBX|1|NM|2160-0")
    assert subject not in _rejected_event(Refusal(hl7_refusal, "mllp")).model_dump_json()
    assert redact_subject(subject) == REDACTED


@settings(max_examples=300, deadline=None, database=None)
@given(text=st.text(max_size=300))
def test_redaction_never_raises_and_is_stable(text: str) -> None:
    once = redact(text)
    assert isinstance(once, str)
    assert redact(once) == once or redact(redact(once)) == redact(once)
    redact_reason(text)


_TRIGGERS = st.sampled_from([
    "MRN 123456", "mrn:42-17", "MrN#9 9", "DOB 1980-02-03", "born 03/02/1980", "Birth date: 19800203",
    "\\u004dRN 123456", "\\u0044OB 1980-02-03", "IGA-A-001", "John Smith", "", " ", "\\\\", "PID|1||X",
])
_JSON_VALUES = st.recursive(
    st.none() | st.floats(allow_nan=False) | st.text(max_size=20) | _TRIGGERS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["subject_id", "note", "comment", "value", "x", "Mrn", "dob_note", "subject"]) | st.text(max_size=8),
        inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400)
@given(st.one_of(
    _JSON_VALUES.map(json.dumps),
    _JSON_VALUES.map(lambda value: json.dumps(value, ensure_ascii=False)),
    st.lists(st.text(max_size=12) | _TRIGGERS, max_size=6).map(" ".join),
))
def test_the_screened_path_redacts_exactly_what_the_full_path_does(text: str) -> None:
    """The screen (skip the MRN / birth-date patterns when the text cannot hold them) is only a
    shortcut: its answer is always the answer of running every pattern."""
    from services.labs.redaction import _redact

    assert _redact(text, (), screen=True) == _redact(text, (), screen=False)
