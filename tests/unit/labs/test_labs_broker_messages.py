"""Broker JSON on ``labs.results`` (contract, "Lab results in" 1)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.labs.broker_messages import MAX_PAYLOAD_BYTES, parse_broker_result
from services.labs.inputs import MAX_JSON_DEPTH, LabRejection

BODY = {
    "message_id": "6f1c1c2e-0b7a-4a56-9e53-3f0b3c6a1d01", "subject_id": "IGA-A-001", "lab_id": "LAB1",
    "loinc": "2160-0", "value": 2.1, "unit": "mg/dL", "collected_at": "2015-06-01T08:30:00Z",
    "status": "final", "result_id": "R-2015-0001",
}


def encode(body: object) -> bytes:
    return json.dumps(body).encode()


def code_of(data: bytes, headers: dict | None = None) -> str:
    with pytest.raises(LabRejection) as caught:
        parse_broker_result(data, headers or {})
    return caught.value.code


def test_contract_example():
    result = parse_broker_result(encode(BODY), {"Nats-Msg-Id": BODY["message_id"]})
    assert result.source == "broker"
    assert (result.message_id, result.subject_id, result.lab_id, result.result_id) == (
        BODY["message_id"], "IGA-A-001", "LAB1", "R-2015-0001")
    assert (result.loinc, result.value, result.unit, result.status) == ("2160-0", 2.1, "mg/dL", "final")
    assert result.collected_at == datetime(2015, 6, 1, 8, 30, tzinfo=UTC)
    assert json.loads(result.raw) == BODY


def test_offsets_become_utc_and_extra_fields_are_ignored():
    body = BODY | {"collected_at": "2015-06-01T10:30:00+02:00", "comment": "haemolysed", "lab_id": None}
    result = parse_broker_result(encode(body), {})
    assert result.collected_at == datetime(2015, 6, 1, 8, 30, tzinfo=UTC)
    assert result.lab_id is None


def test_integer_value_and_lower_case_header_are_accepted():
    result = parse_broker_result(encode(BODY | {"value": 2}), {"nats-msg-id": BODY["message_id"]})
    assert result.value == 2.0


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"{not json", "malformed_json"),
        (b"", "malformed_json"),
        (b"[1, 2]", "wrong_type"),
        (b"\xff\xfe{}", "bad_encoding"),
        (b"[" * 50_000 + b"]" * 50_000, "payload_too_large"),
        (b"[" * 30_000 + b"]" * 30_000, "too_deep"),  # nested too deeply for the parser
        (b"[" * 30_000, "too_deep"),
        (b" " * (MAX_PAYLOAD_BYTES + 1), "payload_too_large"),
    ],
)
def test_malformed_payloads(data, code):
    assert code_of(data) == code


def test_deeply_nested_object_is_refused_not_crashing():
    nested = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
    with pytest.raises(LabRejection) as caught:
        parse_broker_result(nested, {})
    assert caught.value.reason == f"JSON body is nested more than {MAX_JSON_DEPTH} levels deep (objects and arrays)"


def test_nesting_is_capped_even_in_members_that_are_not_read():
    """An ignored member nested 300 levels deep was accepted with the result (Python's parser reads
    about 900); broker bodies have the FHIR inputs' cap."""
    def body_with_extra(depth: int) -> bytes:  # the body is one level, the extra member the rest
        return encode(BODY | {"extra": json.loads("[" * (depth - 1) + "]" * (depth - 1))})

    assert parse_broker_result(body_with_extra(MAX_JSON_DEPTH), {}).value == 2.1
    with pytest.raises(LabRejection) as caught:
        parse_broker_result(body_with_extra(MAX_JSON_DEPTH + 1), {})
    assert (caught.value.code, caught.value.message_id, caught.value.subject_id) == (
        "too_deep", BODY["message_id"], "IGA-A-001")
    assert code_of(body_with_extra(300)) == "too_deep"


@pytest.mark.parametrize("field", ["message_id", "subject_id", "loinc", "value", "unit", "collected_at", "status",
                                   "result_id"])
def test_each_required_field(field):
    body = {key: value for key, value in BODY.items() if key != field}
    assert code_of(encode(body)) == "missing_field"
    assert code_of(encode(BODY | {field: None})) == "missing_field"


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"value": "2.1"}, "wrong_type"),
        ({"value": True}, "wrong_type"),
        ({"value": [2.1]}, "wrong_type"),
        ({"subject_id": 1}, "wrong_type"),
        ({"lab_id": 7}, "wrong_type"),
        ({"value": 10**400}, "non_finite_value"),
        ({"status": "amended"}, "unsupported_status"),
        ({"collected_at": "2015-06-01T08:30:00"}, "bad_datetime"),
        ({"collected_at": "2015-06-01"}, "bad_datetime"),
        ({"collected_at": "yesterday"}, "bad_datetime"),
        ({"collected_at": "0001-01-01T00:00:00+01:00"}, "bad_datetime"),
        ({"loinc": "2345-7"}, "unknown_loinc"),
        ({"unit": "mmol/L"}, "unit_mismatch"),
        ({"value": 0}, "value_out_of_range"),
        ({"subject_id": "IGA-A-001'; DROP TABLE lab_results; --"}, "bad_subject_id"),
        ({"result_id": "1 OR 1=1"}, "bad_result_id"),
    ],
)
def test_specific_reasons(changes, code):
    assert code_of(encode(BODY | changes)) == code


def test_nan_in_json_is_non_finite():
    text = encode(BODY).replace(b"2.1", b"NaN")
    assert code_of(text) == "non_finite_value"


def test_header_must_match_body():
    with pytest.raises(LabRejection) as caught:
        parse_broker_result(encode(BODY), {"Nats-Msg-Id": "something-else"})
    error = caught.value
    assert error.code == "message_id_mismatch"
    assert (error.message_id, error.subject_id) == (BODY["message_id"], "IGA-A-001")
    assert "something-else" in error.reason


def test_rejection_keeps_raw_text():
    with pytest.raises(LabRejection) as caught:
        parse_broker_result(encode(BODY | {"loinc": "2345-7"}), {})
    assert json.loads(caught.value.raw)["loinc"] == "2345-7"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


CODE = re.compile(r"[a-z][a-z0-9_]*")


@given(st.binary(max_size=300))
def test_fuzz_bytes(data):
    """Arbitrary bytes are never a result: each is refused for what makes it so, with the text
    it carried (when it was text) for the report."""
    with pytest.raises(LabRejection) as caught:
        parse_broker_result(data, {})
    error = caught.value
    assert error.code in {"bad_encoding", "malformed_json", "wrong_type", "missing_field", "too_deep"}, error.code
    assert error.reason
    if error.code != "bad_encoding":
        assert error.raw == data.decode("utf-8")


@given(st.dictionaries(st.sampled_from(sorted(BODY) + ["x"]), json_values, max_size=10))
def test_fuzz_json_objects(body):
    """Any JSON object is accepted as exactly what it says, or refused with a stable code, the
    message id it carried and the whole body as raw."""
    data = json.dumps(body).encode()
    try:
        result = parse_broker_result(data, {"Nats-Msg-Id": body.get("message_id", "x")})
    except LabRejection as error:
        assert CODE.fullmatch(error.code) and error.reason
        assert error.raw == data.decode()
        carried = body.get("message_id")
        assert error.message_id == (carried if isinstance(carried, str) else None)
    else:
        assert (result.message_id, result.subject_id, result.result_id) == (
            body["message_id"], body["subject_id"], body["result_id"])
        assert result.value == body["value"] and result.raw == data.decode()


@given(st.sampled_from(sorted(BODY)), json_values)
def test_fuzz_one_field_of_a_valid_body(field, value):
    try:
        result = parse_broker_result(json.dumps(BODY | {field: value}).encode(), {})
    except LabRejection as error:
        assert error.reason and error.code
    else:
        assert result.subject_id == (value if field == "subject_id" else "IGA-A-001")
