"""FHIR R4 lab results: ``POST /fhir/Observation`` and transaction Bundles of Observation POSTs.

Validation uses the R4B models of ``fhir.resources`` (its top-level package is R5; R4B is
wire-compatible with R4 for Observation and Bundle). Pure: the HTTP adapter hands the body in
and turns :class:`LabRejection` into :func:`outcome_for` with the status it chooses.

Mapping (contract): subject ``subject.reference`` ``Patient/<id>`` (relative, or an absolute URL
ending so) or else ``subject.identifier.value``; result id ``identifier[0].value``; status
``final``/``amended``/``corrected``/``preliminary`` (``amended`` is R4's word for a changed
final result, so it counts as ``corrected``); time ``effectiveDateTime`` (a date-only value is
midnight UTC of that date; year or year-month alone is refused as not a collection date); value
``valueQuantity.value``, unit its UCUM ``code`` when present (else its display ``unit``); the
LOINC code is the ``code.coding`` whose system is ``http://loinc.org`` (an accepted one first
when several are); lab id the first ``performer`` ``Organization/<id>``.

Message id (what makes "the same POST twice" have one effect): ``Observation/<id>/_history/
<meta.versionId>`` when the client versions its resources, else ``sha256:<hex>`` of the
canonical JSON (sorted keys, no blanks) of the resource. Not the bare ``id``: in FHIR an amended
Observation keeps its ``id``, so keying on it would swallow the correction as a duplicate; the
version (or the content) is what distinguishes two submissions.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

from fhir.resources.R4B.bundle import Bundle, BundleEntry
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.operationoutcome import OperationOutcome
from pydantic import ValidationError

from contracts.labs import ACCEPTED_CODES
from services.labs.catalogue import measure
from services.labs.inputs import IncomingResult, LabRejection, json_too_deep, nested_too_deeply, show

MAX_BODY_BYTES = 1 << 20
LOINC_SYSTEM = "http://loinc.org"
UCUM_SYSTEM = "http://unitsofmeasure.org"
Reject = Callable[[str, str], LabRejection]
_STATUSES = {"final": "final", "amended": "corrected", "corrected": "corrected", "preliminary": "preliminary"}
_BUNDLE_TYPES = ("transaction", "batch")
PATIENT_REFERENCE = re.compile(r"(?:.*/)?Patient/([^/]+)(?:/_history/[^/]+)?")
_ORGANIZATION_REFERENCE = re.compile(r"(?:.*/)?Organization/([^/]+)")
_OTHER_VALUES = ("valueCodeableConcept", "valueString", "valueBoolean", "valueInteger", "valueRange",
                 "valueRatio", "valueSampledData", "valueTime", "valueDateTime", "valuePeriod")
_OTHER_EFFECTIVE = ("effectivePeriod", "effectiveTiming", "effectiveInstant")

ISSUE_TYPES = frozenset({
    "invalid", "structure", "required", "value", "invariant", "security", "login", "unknown", "expired",
    "forbidden", "suppressed", "processing", "not-supported", "duplicate", "multiple-matches", "not-found",
    "deleted", "too-long", "code-invalid", "extension", "too-costly", "business-rule", "conflict",
    "transient", "lock-error", "no-store", "exception", "timeout", "incomplete", "throttled", "informational",
})
"""FHIR R4 IssueType codes (http://hl7.org/fhir/issue-type)."""

_ISSUE_OF_CODE = {
    "payload_too_large": "too-long", "bad_encoding": "structure", "malformed_json": "structure",
    "wrong_type": "structure", "wrong_resource_type": "not-supported", "invalid_resource": "invalid",
    "missing_subject": "required", "bad_subject_reference": "value", "missing_result_id": "required", "missing_value": "required",
    "missing_unit": "required", "missing_collected_at": "required", "unknown_loinc": "code-invalid",
    "unit_mismatch": "code-invalid", "unsupported_status": "code-invalid", "non_finite_value": "value",
    "value_out_of_range": "value", "collected_too_early": "value", "collected_in_future": "value",
    "bad_datetime": "value", "bad_subject_id": "value", "bad_result_id": "value", "bad_message_id": "value",
    "bad_lab_id": "value", "result_id_conflict": "conflict", "analyte_mismatch": "conflict",
    "unknown_subject": "not-found", "bad_request": "not-supported", "censored_value": "value",
    "too_deep": "structure",
}


# --------------------------------------------------------------------------- entry points


def parse_observation(body: dict[str, Any] | bytes | str) -> IncomingResult:
    """One Observation (JSON bytes/text or an already-decoded object) as an
    :class:`IncomingResult` that passed :func:`measure`. Raises :class:`LabRejection`."""
    return _observation(_load(body))


def parse_bundle(body: dict[str, Any] | bytes | str) -> list[IncomingResult | LabRejection]:
    """A ``transaction`` (or ``batch``) Bundle of Observation POSTs: one item per entry, in
    order, either the result or the refusal of that entry (``reason`` prefixed ``entry[i]:``).

    A Bundle that is not one at all (wrong JSON, wrong resourceType or type, invalid envelope, or
    nested too deeply outside its resources) raises :class:`LabRejection`. Entries are judged one by one, so a transaction is *not*
    all-or-nothing here: each result is independently idempotent and a bad entry must be
    reported, not take its good neighbours down with it.
    """
    bundle = _load(body)
    if bundle.get("resourceType") != "Bundle":
        raise LabRejection(f"resourceType {show(bundle.get('resourceType'))} is not Bundle", "wrong_resource_type",
                           raw=_canonical(bundle))
    if bundle.get("type") not in _BUNDLE_TYPES:
        raise LabRejection(f"Bundle type {show(bundle.get('type'))} is not transaction or batch",
                           "wrong_resource_type", raw=_canonical(bundle))
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise LabRejection("Bundle.entry must be an array", "invalid_resource", raw=_canonical(bundle))
    # The Bundle itself, its resources aside: each of those is judged (and may be refused) alone.
    envelope = bundle | {"entry": [{k: v for k, v in e.items() if k != "resource"} if isinstance(e, dict) else e
                                   for e in entries]}
    if nested_too_deeply(envelope):
        raise json_too_deep("Bundle", _canonical(bundle))
    _validate(Bundle, {key: value for key, value in bundle.items() if key != "entry"}, "Bundle")
    return [_entry(index, entry) for index, entry in enumerate(entries)]


def operation_outcome(reason: str, code: str = "invalid") -> dict[str, Any]:
    """A FHIR OperationOutcome (one ``error`` issue, ``code`` from the IssueType value set,
    ``diagnostics`` the reason), as JSON-ready dict, validated against the R4B model."""
    if code not in ISSUE_TYPES:
        raise ValueError(f"{code!r} is not a FHIR IssueType code")
    outcome = OperationOutcome.model_validate(
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": reason}]}
    )
    return outcome.model_dump(mode="json", exclude_none=True)


def outcome_for(rejection: LabRejection) -> dict[str, Any]:
    """The OperationOutcome answering a refusal, its IssueType chosen from the refusal's code."""
    return operation_outcome(rejection.reason, _ISSUE_OF_CODE.get(rejection.code, "invalid"))


# --------------------------------------------------------------------------- parsing


def _load(body: dict[str, Any] | bytes | str) -> dict[str, Any]:
    if isinstance(body, dict):
        return body
    if isinstance(body, bytes):
        if len(body) > MAX_BODY_BYTES:
            raise LabRejection(f"body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}", "payload_too_large")
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise LabRejection(f"body is not valid UTF-8 (offset {error.start})", "bad_encoding") from None
    try:
        loaded = json.loads(body)
    except json.JSONDecodeError as error:
        raise LabRejection(f"malformed JSON: {error.msg} at line {error.lineno} column {error.colno}",
                           "malformed_json", raw=body[:MAX_BODY_BYTES]) from None
    except RecursionError:
        raise json_too_deep("JSON body", body[:MAX_BODY_BYTES]) from None
    if not isinstance(loaded, dict):
        raise LabRejection(f"JSON body must be an object, not {type(loaded).__name__}", "wrong_type",
                           raw=body[:MAX_BODY_BYTES])
    return loaded


def _entry(index: int, entry: Any) -> IncomingResult | LabRejection:
    try:
        if not isinstance(entry, dict):
            raise LabRejection("entry must be an object", "invalid_resource")
        _validate(BundleEntry, {key: value for key, value in entry.items() if key != "resource"}, "Bundle.entry")
        request = entry.get("request") or {}
        url = str(request.get("url", "")).split("?")[0].rstrip("/")
        if request.get("method") != "POST" or not url.endswith("Observation"):
            raise LabRejection(
                f"request {show(request.get('method'))} {show(request.get('url'))} is not POST Observation",
                "bad_request",
            )
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            raise LabRejection("entry has no resource", "invalid_resource")
        return _observation(resource)
    except LabRejection as rejection:
        return LabRejection(f"entry[{index}]: {rejection.reason}", rejection.code, message_id=rejection.message_id,
                            subject_id=rejection.subject_id, raw=rejection.raw or _canonical(entry))


def _observation(resource: dict[str, Any]) -> IncomingResult:
    raw = _canonical(resource)
    if nested_too_deeply(resource):
        raise json_too_deep("Observation", raw)
    if resource.get("resourceType") != "Observation":
        raise LabRejection(f"resourceType {show(resource.get('resourceType'))} is not Observation",
                           "wrong_resource_type", raw=raw)
    observation = _validate(Observation, resource, "Observation", raw)
    message_id = _message_id(observation, raw)
    subject_id = _subject(observation, raw, message_id)

    def reject(reason: str, code: str) -> LabRejection:
        return LabRejection(reason, code, message_id=message_id, subject_id=subject_id, raw=raw)

    if not observation.identifier or not observation.identifier[0].value:
        raise reject("Observation.identifier[0].value (the result id) is missing", "missing_result_id")
    status = _STATUSES.get(observation.status or "")
    if status is None:
        raise reject(f"status {show(observation.status)} is not final, amended, corrected or preliminary",
                     "unsupported_status")
    value, unit = _quantity(resource, observation, reject)
    result = IncomingResult(
        message_id=message_id,
        subject_id=subject_id,
        lab_id=_lab_id(observation),
        source="fhir",
        loinc=_loinc(observation, reject),
        value=value,
        unit=unit,
        collected_at=_effective(resource, observation, reject),
        status=status,
        result_id=observation.identifier[0].value,
        raw=raw,
    )
    measure(result)
    return result


def _validate(model: type[Any], data: dict[str, Any], what: str, raw: str | None = None) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in issue['loc']) or what}: {' '.join(issue['msg'].split())}"
            for issue in error.errors()[:3]
        )
        raise LabRejection(f"invalid {what}: {show(problems, 300)}", "invalid_resource",
                           raw=raw or _canonical(data)) from None


def _canonical(data: Any) -> str:
    """Sorted-key, blank-free JSON: two submissions of the same content get the same text (and
    so the same ``sha256`` message id) whatever their key order or formatting."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _message_id(observation: Observation, raw: str) -> str:
    version = observation.meta.versionId if observation.meta else None
    if observation.id and version:
        return f"Observation/{observation.id}/_history/{version}"
    return "sha256:" + hashlib.sha256(raw.encode("utf-8", errors="surrogatepass")).hexdigest()


def _subject(observation: Observation, raw: str, message_id: str) -> str:
    subject = observation.subject
    reference = subject.reference if subject else None
    if reference:
        match = PATIENT_REFERENCE.fullmatch(reference)
        if match is None:
            raise LabRejection(f"subject.reference {show(reference)} is not Patient/<id>", "bad_subject_reference",
                               message_id=message_id, raw=raw)
        return match.group(1)
    identifier = subject.identifier.value if subject and subject.identifier else None
    if not identifier:
        raise LabRejection("Observation.subject (Patient/<id> or identifier.value) is missing", "missing_subject",
                           message_id=message_id, raw=raw)
    return identifier


def _loinc(observation: Observation, reject: Reject) -> str:
    codings = (observation.code.coding if observation.code else None) or []
    codes = [coding.code for coding in codings if coding.system == LOINC_SYSTEM and coding.code]
    if not codes:
        raise reject(f"Observation.code has no LOINC coding (system {LOINC_SYSTEM})", "unknown_loinc")
    return next((code for code in codes if code in ACCEPTED_CODES), codes[0])


def _quantity(resource: dict[str, Any], observation: Observation, reject: Reject) -> tuple[float, str]:
    quantity = observation.valueQuantity
    if quantity is None:
        other = next((name for name in _OTHER_VALUES if name in resource), None)
        if other:
            raise reject(f"value must be a valueQuantity, not {other}", "missing_value")
        raise reject("Observation.valueQuantity is missing", "missing_value")
    if quantity.value is None:
        raise reject("valueQuantity.value is missing", "missing_value")
    if quantity.comparator is not None:
        # The HL7 path's rule: "<0.5" or ">90" is a bound, not a measurement, and counting it as
        # the value would bias every outcome computed from it.
        raise reject(f"valueQuantity.comparator {show(quantity.comparator)} makes the value censored "
                     "(a bound, not a measurement)", "censored_value")
    ucum = quantity.code if quantity.code and quantity.system in (None, UCUM_SYSTEM) else None
    unit = ucum or quantity.unit
    if not unit:
        raise reject("valueQuantity has neither a UCUM code nor a unit", "missing_unit")
    return float(quantity.value), unit


def _effective(resource: dict[str, Any], observation: Observation, reject: Reject) -> datetime:
    effective = observation.effectiveDateTime
    if effective is None:
        other = next((name for name in _OTHER_EFFECTIVE if name in resource), None)
        detail = f" ({other} is not accepted)" if other else ""
        raise reject(f"effectiveDateTime is missing{detail}", "missing_collected_at")
    if isinstance(effective, datetime):
        try:
            return effective.astimezone(UTC)
        except OverflowError:
            raise reject(f"effectiveDateTime {effective.isoformat()} is out of range", "bad_datetime") from None
    if isinstance(effective, date):
        return datetime(effective.year, effective.month, effective.day, tzinfo=UTC)
    raise reject(f"effectiveDateTime {show(str(effective))} is not precise to the day", "bad_datetime")


def _lab_id(observation: Observation) -> str | None:
    for performer in observation.performer or []:
        match = _ORGANIZATION_REFERENCE.fullmatch(performer.reference or "")
        if match:
            return match.group(1)
    return None
