"""Reading the subject of a refused lab input from its raw text (services/labs/refused_subject.py):
where each channel puts it, in input no parser took, never raising, and only study pseudonyms."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from services.labs.redaction import looks_personal
from services.labs.refused_subject import refused_subject

pseudonyms = st.from_regex(r"[A-Z]{2,4}-[A-Z]-[0-9]{1,3}(\.[0-9])?", fullmatch=True).filter(
    lambda value: not looks_personal(value))
sources = st.sampled_from(["broker", "mllp", "fhir"])


def oru(subject: str, control_id: str = "bad id!", msh: str = "MSH|^~\\&") -> str:
    field = msh[3]
    return "\r".join([
        f"{msh}{field}LIS{field}LAB{field}{field}{field}20150601{field}{field}ORU^R01{field}{control_id}{field}P{field}2.5",
        f"PID{field}1{field}{field}{subject}^^^STUDY^PI~MRN-99{field}{field}Doe^Jane",
        f"OBX{field}1{field}NM{field}2160-0^Creatinine^LN{field}{field}1.2{field}mg/dL",
    ])


def observation(subject: dict[str, object]) -> dict[str, object]:
    return {"resourceType": "Observation", "status": ["final"], "subject": subject,
            "valueQuantity": {"value": 1.2, "unit": "mg/dL"}, "identifier": [{"value": "r-1"}]}


def test_each_channel_names_the_subject_where_its_format_puts_it() -> None:
    assert refused_subject("mllp", oru("IGA-A-001")) == "IGA-A-001"
    assert refused_subject("mllp", "\x0b" + oru("IGA-A-001", msh="MSH#^~\\&").replace("|", "#") + "\x1c\r") == "IGA-A-001"
    assert refused_subject("mllp", oru("IGA-A-001", msh="MSH|*~\\&").replace("^", "*")) == "IGA-A-001"
    reference = observation({"reference": "Patient/IGA-A-002"})
    assert refused_subject("fhir", json.dumps(reference)) == "IGA-A-002"
    assert refused_subject("fhir", json.dumps(reference)[:-20]) == "IGA-A-002"  # malformed JSON
    identifier = observation({"identifier": {"system": "urn:study", "value": "IGA-A-003"}})
    assert refused_subject("fhir", json.dumps(identifier)) == "IGA-A-003"
    assert refused_subject("fhir", json.dumps(identifier)[:-20]) == "IGA-A-003"
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [{"resource": {"resourceType": "Patient"}},
                                                                     {"resource": reference}]}
    assert refused_subject("fhir", json.dumps(bundle)) == "IGA-A-002"
    assert refused_subject("broker", '{"subject_id": "IGA-A-004", "value": 1.2') == "IGA-A-004"
    assert refused_subject("broker", '{"subject_id": "IGA\\u002dA-5", "value": ') == "IGA-A-5"
    assert refused_subject("broker", '{"subject_id": "IGA-A-006", "value": "x"}') == "IGA-A-006"


def test_no_subject_when_in_doubt() -> None:
    assert refused_subject("mllp", oru("John Smith")) is None  # personal data, never a pseudonym
    assert refused_subject("mllp", oru("IGA\\T\\A-1")) is None  # an escape sequence: not read
    assert refused_subject("mllp", oru("[redacted]")) is None
    assert refused_subject("mllp", "MSH|^~\\&|LIS\rOBX|1|NM") is None  # no PID
    assert refused_subject("fhir", json.dumps(observation({"reference": "Group/IGA-A-1"}))) is None
    assert refused_subject("fhir", '{"subject": {"display": "IGA-A-1"}') is None
    assert refused_subject("broker", '{"subject_id": "19800203", "value": 1') is None  # a birth date
    assert refused_subject("broker", '{"subject_id": 12, "value": 1}') is None
    assert refused_subject("broker", "") is None and refused_subject("mllp", None) is None


@settings(max_examples=300, deadline=None)
@given(source=sources, text=st.text(max_size=300))
def test_any_text_gives_a_pseudonym_or_nothing_and_never_raises(source: str, text: str) -> None:
    found = refused_subject(source, text)  # type: ignore[arg-type]
    assert found is None or (found.strip() == found and found and not looks_personal(found))


@settings(max_examples=200, deadline=None)
@given(subject=pseudonyms, control_id=st.text(alphabet=st.characters(blacklist_characters="|\r\n"), max_size=30))
def test_pid_3_is_read_whatever_else_is_wrong_with_the_message(subject: str, control_id: str) -> None:
    assert refused_subject("mllp", oru(subject, control_id)) == subject


@settings(max_examples=200, deadline=None)
@given(subject=pseudonyms, cut=st.integers(min_value=0, max_value=200), data=st.data())
def test_json_and_fhir_cut_anywhere_after_the_subject_still_name_it(subject: str, cut: int, data: st.DataObject) -> None:
    broker = json.dumps({"message_id": "m-1", "subject_id": subject, "value": 1.2, "unit": "mg/dL"})
    end = broker.index(subject) + len(subject) + 1  # the value's closing quote
    assert refused_subject("broker", broker[: data.draw(st.integers(end, len(broker)))]) == subject
    fhir = json.dumps(observation({"reference": f"Patient/{subject}"}))
    end = fhir.index(subject) + len(subject) + 1
    assert refused_subject("fhir", fhir[: min(len(fhir), end + cut)]) == subject
