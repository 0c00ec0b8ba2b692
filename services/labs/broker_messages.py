"""Parsing lab results that arrive as JSON on the NATS subject ``labs.results``.

The contract's body::

    {"message_id": "…", "subject_id": "…", "lab_id": "…", "loinc": "2160-0", "value": 2.1,
     "unit": "mg/dL", "collected_at": "2015-06-01T08:30:00Z", "status": "final",
     "result_id": "…"}

with header ``Nats-Msg-Id`` = ``message_id``. ``lab_id`` may be absent or null; unknown extra
fields are ignored (senders may add fields, as the contract allows). Every refusal is a
:class:`LabRejection` with a specific reason; nothing else is raised.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from services.labs.catalogue import measure
from services.labs.inputs import IncomingResult, LabRejection, json_too_deep, nested_too_deeply, show

MAX_PAYLOAD_BYTES = 64 * 1024
MSG_ID_HEADER = "Nats-Msg-Id"
_STATUSES = ("final", "corrected", "preliminary")
_REQUIRED_STRINGS = ("message_id", "subject_id", "loinc", "unit", "collected_at", "status", "result_id")

Reject = Callable[[str, str], LabRejection]


def parse_broker_result(data: bytes, headers: Mapping[str, Any] | None) -> IncomingResult:
    """One broker message as an :class:`IncomingResult` that passed :func:`measure`.

    The ``Nats-Msg-Id`` header (matched case-insensitively), when present, must equal the
    body's ``message_id``: JetStream de-duplicates on the header and we on the body, and the two
    disagreeing would let one message have two effects.
    """
    text = _decode(data)
    body = _load_object(text)
    message_id = body.get("message_id") if isinstance(body.get("message_id"), str) else None
    subject_id = body.get("subject_id") if isinstance(body.get("subject_id"), str) else None

    def reject(reason: str, code: str) -> LabRejection:
        return LabRejection(reason, code, message_id=message_id, subject_id=subject_id, raw=text)

    if nested_too_deeply(body):
        raise json_too_deep("JSON body", text, message_id=message_id, subject_id=subject_id)
    for name in _REQUIRED_STRINGS:
        if name not in body or body[name] is None:
            raise reject(f"field {name!r} is missing", "missing_field")
        if not isinstance(body[name], str):
            raise reject(f"field {name!r} must be a string, not {type(body[name]).__name__}", "wrong_type")
    lab_id = body.get("lab_id")
    if lab_id is not None and not isinstance(lab_id, str):
        raise reject(f"field 'lab_id' must be a string or null, not {type(lab_id).__name__}", "wrong_type")
    if body["status"] not in _STATUSES:
        raise reject(f"status {show(body['status'])} is not one of final, corrected, preliminary", "unsupported_status")
    header_id = _header(headers, MSG_ID_HEADER)
    if header_id is not None and header_id != message_id:
        raise reject(
            f"header {MSG_ID_HEADER} {show(header_id)} does not match message_id {show(message_id)}",
            "message_id_mismatch",
        )
    result = IncomingResult(
        message_id=body["message_id"],
        subject_id=body["subject_id"],
        lab_id=lab_id or None,
        source="broker",
        loinc=body["loinc"].strip(),
        value=_number(body.get("value"), reject),
        unit=body["unit"],
        collected_at=_timestamp(body["collected_at"], reject),
        status=body["status"],
        result_id=body["result_id"],
        raw=text,
    )
    measure(result)
    return result


def _decode(data: bytes) -> str:
    if len(data) > MAX_PAYLOAD_BYTES:
        raise LabRejection(
            f"payload is {len(data)} bytes; the limit is {MAX_PAYLOAD_BYTES}", "payload_too_large"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LabRejection(
            f"payload is not valid UTF-8 (byte {data[error.start]:#04x} at offset {error.start})", "bad_encoding"
        ) from None


def _load_object(text: str) -> dict[str, Any]:
    try:
        body = json.loads(text)
    except json.JSONDecodeError as error:
        raise LabRejection(f"malformed JSON: {error.msg} at line {error.lineno} column {error.colno}",
                           "malformed_json", raw=text) from None
    except RecursionError:
        raise json_too_deep("JSON body", text) from None
    if not isinstance(body, dict):
        raise LabRejection(f"JSON body must be an object, not {type(body).__name__}", "wrong_type", raw=text)
    return body


def _header(headers: Mapping[str, Any] | None, name: str) -> str | None:
    for key, value in (headers or {}).items():
        if isinstance(key, str) and key.lower() == name.lower():
            return value if isinstance(value, str) else str(value)
    return None


def _number(value: Any, reject: Reject) -> float:
    """A JSON number as float. ``bool`` is refused although Python treats it as an int, and an
    integer too large for a float is reported instead of overflowing. NaN/Infinity (which
    Python's json accepts) pass through here and are refused by :func:`measure` as non-finite."""
    if value is None:
        raise reject("field 'value' is missing", "missing_field")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise reject(f"field 'value' must be a number, not {type(value).__name__}", "wrong_type")
    try:
        return float(value)
    except OverflowError:
        raise reject(f"value {show(value)} is too large", "non_finite_value") from None


def _timestamp(text: str, reject: Reject) -> datetime:
    """ISO 8601 date-time with a zone (``Z`` or an offset); a zone-less time is refused because
    we cannot know which zone the lab meant."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise reject(f"collected_at {show(text)} is not an ISO 8601 date-time", "bad_datetime") from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise reject(f"collected_at {show(text)} has no time zone (use Z or an offset)", "bad_datetime")
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise reject(f"collected_at {show(text)} is out of range", "bad_datetime") from None
