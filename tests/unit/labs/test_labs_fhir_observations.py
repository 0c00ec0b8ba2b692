"""FHIR R4 Observation and transaction Bundle (contract, "Lab results in" 3).

The example resources follow the shape of the FHIR R4 specification's laboratory examples
(https://hl7.org/fhir/R4/observation-example-f001-glucose.json.html: identifier, status, LOINC
code, subject reference, UCUM valueQuantity, performer, referenceRange), with creatinine
(LOINC 2160-0, mg/dL) instead of glucose and an effectiveDateTime instead of effectivePeriod,
and an eGFR like the spec's f205 eGFR example (mL/min/{1.73_m2}) coded 98979-8.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from services.labs.fhir_api import status_for
from services.labs.fhir_observations import (
    MAX_BODY_BYTES,
    operation_outcome,
    outcome_for,
    parse_bundle,
    parse_observation,
)
from services.labs.inputs import MAX_JSON_DEPTH, IncomingResult, LabRejection, nested_too_deeply

CREATININE = {
    "resourceType": "Observation",
    "identifier": [{"use": "official", "system": "http://www.bmc.nl/zorgportal/identifiers/observations",
                    "value": "6323"}],
    "status": "final",
    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                              "code": "laboratory"}]}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0",
                         "display": "Creatinine [Mass/volume] in Serum or Plasma"}]},
    "subject": {"reference": "Patient/IGA-A-001", "display": "IGA-A-001"},
    "effectiveDateTime": "2015-06-01T09:30:10+01:00",
    "issued": "2015-06-01T15:30:10+01:00",
    "performer": [{"reference": "Practitioner/f005", "display": "A. Langeveld"},
                  {"reference": "Organization/LAB1"}],
    "valueQuantity": {"value": 2.1, "unit": "mg/dl", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
    "interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                                    "code": "H", "display": "High"}]}],
    "referenceRange": [{"low": {"value": 0.6, "unit": "mg/dL", "system": "http://unitsofmeasure.org",
                                "code": "mg/dL"},
                        "high": {"value": 1.2, "unit": "mg/dL", "system": "http://unitsofmeasure.org",
                                 "code": "mg/dL"}}],
}

EGFR = {
    "resourceType": "Observation",
    "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5", "value": "1304-03720-eGFR"}],
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "98979-8",
                         "display": "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in "
                                    "Serum, Plasma or Blood by Creatinine-based formula (CKD-EPI 2021)"}]},
    "subject": {"identifier": {"system": "urn:study:nephrotrack", "value": "IGA-A-001"}},
    "effectiveDateTime": "2015-06-01T08:30:00Z",
    "valueQuantity": {"value": 54, "unit": "mL/min/1.73m2", "system": "http://unitsofmeasure.org",
                      "code": "mL/min/{1.73_m2}"},
    "method": {"coding": [{"system": "http://snomed.info/sct", "code": "117337005",
                           "display": "Calculated laboratory test method"}]},
}


def changed(base: dict, **changes) -> dict:
    resource = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            resource.pop(key, None)
        else:
            resource[key] = value
    return resource


def code_of(body) -> str:
    with pytest.raises(LabRejection) as caught:
        parse_observation(body)
    assert caught.value.reason
    return caught.value.code


def bundle(*resources, kind: str = "transaction") -> dict:
    return {"resourceType": "Bundle", "type": kind, "entry": [
        {"fullUrl": f"urn:uuid:00000000-0000-0000-0000-00000000000{n}", "resource": resource,
         "request": {"method": "POST", "url": "Observation"}}
        for n, resource in enumerate(resources)
    ]}


# --------------------------------------------------------------------------- Observation


def test_creatinine_observation():
    result = parse_observation(CREATININE)
    assert result.source == "fhir"
    assert (result.subject_id, result.result_id, result.lab_id) == ("IGA-A-001", "6323", "LAB1")
    assert (result.loinc, result.value, result.unit, result.status) == ("2160-0", 2.1, "mg/dL", "final")
    assert result.collected_at == datetime(2015, 6, 1, 8, 30, 10, tzinfo=UTC)
    assert result.message_id.startswith("sha256:") and len(result.message_id) == 7 + 64
    assert json.loads(result.raw) == CREATININE


def test_egfr_observation_with_subject_identifier():
    result = parse_observation(EGFR)
    assert (result.subject_id, result.result_id, result.loinc, result.value, result.unit) == (
        "IGA-A-001", "1304-03720-eGFR", "98979-8", 54.0, "mL/min/{1.73_m2}")
    assert result.lab_id is None


def test_the_same_post_twice_has_the_same_message_id():
    as_bytes = json.dumps(CREATININE, indent=2).encode()
    reordered = json.dumps(dict(reversed(list(CREATININE.items())))).encode()
    ids = {parse_observation(body).message_id for body in (CREATININE, as_bytes, reordered)}
    assert len(ids) == 1


def test_an_amended_resource_with_the_same_id_is_a_new_message():
    final = changed(CREATININE, id="obs-1", meta={"versionId": "1"})
    amended = changed(CREATININE, id="obs-1", meta={"versionId": "2"}, status="amended",
                      valueQuantity={"value": 1.8, "unit": "mg/dL", "system": "http://unitsofmeasure.org",
                                     "code": "mg/dL"})
    first, second = parse_observation(final), parse_observation(amended)
    assert (first.message_id, second.message_id) == ("Observation/obs-1/_history/1", "Observation/obs-1/_history/2")
    assert (second.status, second.value) == ("corrected", 1.8)
    assert parse_observation(changed(CREATININE, id="obs-1")).message_id.startswith("sha256:")


@pytest.mark.parametrize(("status", "expected"), [("final", "final"), ("amended", "corrected"),
                                                  ("corrected", "corrected"), ("preliminary", "preliminary")])
def test_statuses(status, expected):
    assert parse_observation(changed(CREATININE, status=status)).status == expected


def test_absolute_patient_reference():
    subject = {"reference": "https://fhir.example.org/r4/Patient/IGA-B-002/_history/3"}
    assert parse_observation(changed(CREATININE, subject=subject)).subject_id == "IGA-B-002"


def test_date_only_effective_is_midnight_utc():
    result = parse_observation(changed(CREATININE, effectiveDateTime="2015-06-01"))
    assert result.collected_at == datetime(2015, 6, 1, tzinfo=UTC)


def test_unit_falls_back_to_display_unit():
    quantity = {"value": 185.7, "unit": "\u00b5mol/L"}
    coded = changed(CREATININE, valueQuantity=quantity,
                    code={"coding": [{"system": "http://loinc.org", "code": "14682-9"}]})
    assert parse_observation(coded).unit == "\u00b5mol/L"
    local = quantity | {"system": "http://example.org/units", "code": "UMOLL"}
    assert parse_observation(changed(coded, valueQuantity=local)).unit == "\u00b5mol/L"


def test_accepted_loinc_is_preferred_among_several():
    code = {"coding": [{"system": "http://loinc.org", "code": "24362-6"},
                       {"system": "http://acme.example/codes", "code": "CREA"},
                       {"system": "http://loinc.org", "code": "2160-0"}]}
    assert parse_observation(changed(CREATININE, code=code)).loinc == "2160-0"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (changed(CREATININE, subject=None), "missing_subject"),
        (changed(CREATININE, subject={"display": "someone"}), "missing_subject"),
        (changed(CREATININE, subject={"reference": "Group/g1"}), "bad_subject_reference"),
        (changed(CREATININE, subject={"reference": "Patient/x' OR '1'='1"}), "bad_subject_id"),
        (changed(CREATININE, subject={"identifier": {"value": "1; DROP TABLE patients"}}), "bad_subject_id"),
        (changed(CREATININE, identifier=None), "missing_result_id"),
        (changed(CREATININE, identifier=[{"system": "urn:x"}]), "missing_result_id"),
        (changed(CREATININE, identifier=[{"value": "<script>alert(1)</script>"}]), "bad_result_id"),
        (changed(CREATININE, valueQuantity=None), "missing_value"),
        (changed(CREATININE, valueQuantity=None, valueString="2.1 mg/dL"), "missing_value"),
        (changed(CREATININE, valueQuantity={"unit": "mg/dL"}), "missing_value"),
        (changed(CREATININE, valueQuantity={"value": 2.1}), "missing_unit"),
        (changed(CREATININE, valueQuantity={"value": "1e400", "code": "mg/dL"}), "non_finite_value"),
        (changed(CREATININE, valueQuantity={"value": 2.1, "code": "mmol/L"}), "unit_mismatch"),
        (changed(CREATININE, valueQuantity={"value": 0, "code": "mg/dL"}), "value_out_of_range"),
        (changed(CREATININE, code={"coding": [{"system": "http://loinc.org", "code": "2345-7"}]}), "unknown_loinc"),
        (changed(CREATININE, code={"coding": [{"system": "http://snomed.info/sct", "code": "70901006"}]}),
         "unknown_loinc"),
        (changed(CREATININE, code={"text": "creatinine"}), "unknown_loinc"),
        (changed(CREATININE, status="entered-in-error"), "unsupported_status"),
        (changed(CREATININE, status="registered"), "unsupported_status"),
        (changed(CREATININE, effectiveDateTime=None), "missing_collected_at"),
        (changed(CREATININE, effectiveDateTime=None, effectivePeriod={"start": "2015-06-01T08:30:00Z"}),
         "missing_collected_at"),
        (changed(CREATININE, effectiveDateTime="2015-06"), "bad_datetime"),
        (changed(CREATININE, effectiveDateTime="2015-06-01T08:30:00"), "invalid_resource"),  # no zone
        (changed(CREATININE, effectiveDateTime="1899-12-31"), "collected_too_early"),
        (changed(CREATININE, status=7), "invalid_resource"),
        (changed(CREATININE, unexpected="field"), "invalid_resource"),
        (changed(CREATININE, resourceType="Patient"), "wrong_resource_type"),
        (changed(CREATININE, resourceType=None), "wrong_resource_type"),
        (b"{not json", "malformed_json"),
        (b"[]", "wrong_type"),
        (b"\xff\xfe", "bad_encoding"),
        (b" " * (MAX_BODY_BYTES + 1), "payload_too_large"),
        ("{" * 5000 + "}" * 5000, "malformed_json"),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "too_deep"),
    ],
)
def test_specific_reasons(body, code):
    assert code_of(body) == code


@pytest.mark.parametrize("comparator", ["<", "<=", ">=", ">", "ad"])
def test_a_value_with_a_comparator_is_refused_as_censored(comparator):
    """``>90`` is a bound, not an eGFR: counted as exact, it biased the outcomes (HL7's OBX-5
    ``>90`` was already refused so)."""
    quantity = EGFR["valueQuantity"] | {"comparator": comparator}
    with pytest.raises(LabRejection) as caught:
        parse_observation(changed(EGFR, valueQuantity=quantity))
    assert caught.value.code == "censored_value"
    assert f"comparator {comparator!r}" in caught.value.reason and caught.value.subject_id == "IGA-A-001"
    assert status_for(caught.value) == 422 and outcome_for(caught.value)["issue"][0]["code"] == "value"


def extension_chain(links: int, innermost: dict) -> list[dict]:
    """``links`` extensions, each inside the one before, the last with ``innermost``'s value."""
    chain = {"url": "http://example.org/x"} | innermost
    for _ in range(links - 1):
        chain = {"url": "http://example.org/x", "extension": [chain]}
    return [chain]


# Depth of an Observation with such a chain: itself, the list, two per link (a link holding a
# value[x] object counts one more): 64 for 31 links ending in valueQuantity, 65 for 32 in valueString.
AT_THE_LIMIT = changed(CREATININE, extension=extension_chain(31, {"valueQuantity": {"value": 1}}))
BEYOND = changed(CREATININE, extension=extension_chain(32, {"valueString": "x"}))
DEEP = changed(CREATININE, extension=extension_chain(130, {"valueString": "x"}))


def test_nesting_is_capped_before_validation():
    """130 nested extensions exhausted the recursion limit inside fhir.resources: an HTTP 500."""
    assert parse_observation(AT_THE_LIMIT).value == 2.1
    for resource in (BEYOND, DEEP, json.dumps(DEEP).encode()):
        with pytest.raises(LabRejection) as caught:
            parse_observation(resource)
        assert caught.value.code == "too_deep" and status_for(caught.value) == 400
        assert caught.value.reason == f"Observation is nested more than {MAX_JSON_DEPTH} levels deep (objects and arrays)"
        assert outcome_for(caught.value)["issue"][0]["code"] == "structure"
        assert json.loads(caught.value.raw)["identifier"] == CREATININE["identifier"]


WRAPS = (lambda v: [v], lambda v: {"k": v}, lambda v: [1, v, "x"], lambda v: {"a": [], "k": v})


@example(depth=MAX_JSON_DEPTH, shapes=[1], leaf=None)
@example(depth=MAX_JSON_DEPTH + 1, shapes=[0], leaf=None)
@example(depth=MAX_JSON_DEPTH, shapes=[3], leaf=None)
@given(st.integers(1, 3 * MAX_JSON_DEPTH), st.lists(st.integers(0, len(WRAPS) - 1), min_size=1, max_size=6),
       st.one_of(st.integers(), st.text(max_size=3), st.none()))
def test_the_depth_cap_counts_objects_and_arrays(depth, shapes, leaf):
    value = leaf
    for level in range(depth):
        value = WRAPS[shapes[level % len(shapes)]](value)
    deepest = depth + (shapes[0] == 3)  # the innermost {"a": [], …} holds an array one level deeper
    assert nested_too_deeply(value) == (deepest > MAX_JSON_DEPTH)


def test_rejection_carries_what_is_known():
    with pytest.raises(LabRejection) as caught:
        parse_observation(changed(CREATININE, status="cancelled"))
    error = caught.value
    assert error.subject_id == "IGA-A-001" and error.message_id.startswith("sha256:")
    assert json.loads(error.raw)["status"] == "cancelled"


# --------------------------------------------------------------------------- Bundle


def test_transaction_bundle_of_two():
    results = parse_bundle(json.dumps(bundle(CREATININE, EGFR)).encode())
    assert [type(item) for item in results] == [IncomingResult, IncomingResult]
    assert [item.loinc for item in results] == ["2160-0", "98979-8"]


def test_bad_entries_are_refused_one_by_one():
    entries = bundle(CREATININE, changed(EGFR, valueQuantity=None), EGFR)
    entries["entry"].append({"resource": {"resourceType": "Patient", "id": "p"},
                             "request": {"method": "POST", "url": "Patient"}})
    entries["entry"].append({"resource": CREATININE, "request": {"method": "DELETE", "url": "Observation/1"}})
    entries["entry"].append("not an entry")
    entries["entry"].append({"request": {"method": "POST", "url": "Observation"}})
    results = parse_bundle(entries)
    assert isinstance(results[0], IncomingResult) and isinstance(results[2], IncomingResult)
    refused = {index: item for index, item in enumerate(results) if isinstance(item, LabRejection)}
    assert {index: item.code for index, item in refused.items()} == {
        1: "missing_value", 3: "bad_request", 4: "bad_request", 5: "invalid_resource", 6: "invalid_resource"}
    assert refused[1].reason.startswith("entry[1]: ")
    assert json.loads(refused[1].raw)["resourceType"] == "Observation"
    assert refused[5].raw == '"not an entry"'


def test_a_too_deep_entry_is_refused_alone_and_a_too_deep_bundle_as_a_whole():
    results = parse_bundle(json.dumps(bundle(CREATININE, DEEP, EGFR)).encode())
    assert [type(item) for item in results] == [IncomingResult, LabRejection, IncomingResult]
    assert (results[1].code, results[1].reason.startswith("entry[1]: Observation is nested")) == ("too_deep", True)
    deep_request = bundle(EGFR)
    deep_request["entry"][0]["request"]["extension"] = extension_chain(40, {"valueString": "x"})
    for body in (deep_request, b'{"resourceType":"Bundle","type":"transaction","entry":' + b"[" * 5000 + b"]" * 5000 + b"}"):
        with pytest.raises(LabRejection) as caught:
            parse_bundle(body)
        assert caught.value.code == "too_deep" and status_for(caught.value) == 400


def test_batch_bundle_is_accepted_too():
    assert len(parse_bundle(bundle(EGFR, kind="batch"))) == 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (CREATININE, "wrong_resource_type"),
        (bundle(EGFR, kind="searchset"), "wrong_resource_type"),
        ({"resourceType": "Bundle", "type": "transaction", "entry": {}}, "invalid_resource"),
        ({"resourceType": "Bundle", "type": "transaction", "total": "many"}, "invalid_resource"),
        (b"\x00", "malformed_json"),
    ],
)
def test_refused_bundles(body, code):
    with pytest.raises(LabRejection) as caught:
        parse_bundle(body)
    assert caught.value.code == code


def test_empty_transaction_has_nothing_to_record():
    assert parse_bundle({"resourceType": "Bundle", "type": "transaction"}) == []


# --------------------------------------------------------------------------- OperationOutcome


def test_operation_outcome():
    assert operation_outcome("unit 'mmol/L' is not valid for LOINC 2160-0") == {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invalid", "diagnostics": "unit 'mmol/L' is not valid for LOINC 2160-0"}],
    }
    with pytest.raises(ValueError):
        operation_outcome("x", "made-up")


@pytest.mark.parametrize(("code", "issue"), [("unknown_loinc", "code-invalid"), ("missing_subject", "required"),
                                             ("malformed_json", "structure"), ("result_id_conflict", "conflict"),
                                             ("payload_too_large", "too-long"), ("something_new", "invalid")])
def test_outcome_for_rejection(code, issue):
    outcome = outcome_for(LabRejection("why", code))
    assert outcome["issue"][0]["code"] == issue and outcome["issue"][0]["diagnostics"] == "why"


# --------------------------------------------------------------------------- fuzz

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


def accepts_or_refuses(parse, body) -> None:
    try:
        parse(body)
    except LabRejection as error:
        assert error.reason and error.code
        outcome_for(error)


@given(st.dictionaries(st.text(max_size=20), json_values, max_size=8))
def test_fuzz_arbitrary_json_objects(body):
    accepts_or_refuses(parse_observation, body)
    accepts_or_refuses(parse_bundle, body)


@given(st.sampled_from(sorted(CREATININE)), json_values)
def test_fuzz_one_field_of_a_valid_observation(field, value):
    accepts_or_refuses(parse_observation, changed(CREATININE) | {field: value})


@given(st.sampled_from(["subject", "valueQuantity", "code", "identifier"]), st.text(max_size=12), json_values)
def test_fuzz_nested_fields(field, key, value):
    resource = changed(CREATININE)
    if isinstance(resource[field], dict):
        resource[field] = resource[field] | {key: value}
    else:
        resource[field] = [resource[field][0] | {key: value}]
    accepts_or_refuses(parse_observation, resource)


@given(st.lists(json_values, max_size=4))
def test_fuzz_bundle_entries(entries):
    parse_bundle_items = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    accepts_or_refuses(parse_bundle, parse_bundle_items)


@given(st.binary(max_size=300))
def test_fuzz_bytes(data):
    accepts_or_refuses(parse_observation, data)
    accepts_or_refuses(parse_bundle, data)
