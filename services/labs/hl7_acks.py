"""HL7 ACKs for the MLLP listener: ``AA``, ``AE`` with one ERR per refused OBX, ``AR`` for a message
refused as a whole (:func:`build_ack`), for a parsed message or for bytes that could not be parsed."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from services.labs.hl7_charsets import decode_hl7_bytes
from services.labs.hl7_messages import VERSION, ObxError, ParsedOru
from services.labs.hl7_msh import sniff_msh

AckCode = Literal["AA", "AE", "AR"]
ACK_APPLICATION = "NEPHROTRACK"

_HL7_ERROR = {
    # our code -> HL7 table 0357 (message error condition codes)
    "not_hl7": ("100", "Segment sequence error"),
    "bad_delimiters": ("100", "Segment sequence error"),
    "malformed_segment": ("100", "Segment sequence error"),
    "unparseable": ("100", "Segment sequence error"),
    "batch_not_supported": ("100", "Segment sequence error"),
    "no_pid": ("100", "Segment sequence error"),
    "no_obx": ("100", "Segment sequence error"),
    "missing_control_id": ("101", "Required field missing"),
    "missing_unit": ("101", "Required field missing"),
    "missing_value": ("101", "Required field missing"),
    "missing_collected_at": ("101", "Required field missing"),
    "missing_result_id": ("101", "Required field missing"),
    "bad_subject_id": ("101", "Required field missing"),
    "not_a_number": ("102", "Data type error"),
    "censored_value": ("102", "Data type error"),
    "non_finite_value": ("102", "Data type error"),
    "bad_datetime": ("102", "Data type error"),
    "bad_escape": ("102", "Data type error"),
    "bad_control_id": ("102", "Data type error"),
    "unknown_loinc": ("103", "Table value not found"),
    "unit_mismatch": ("103", "Table value not found"),
    "unsupported_status": ("103", "Table value not found"),
    "not_oru_r01": ("200", "Unsupported message type"),
    "bad_version": ("203", "Unsupported version id"),
    "unknown_subject": ("204", "Unknown key identifier"),
    "duplicate_result_id": ("205", "Duplicate key identifier"),
    "result_id_conflict": ("205", "Duplicate key identifier"),
}
_DEFAULT_HL7_ERROR = ("207", "Application internal error")
_MSA_TEXT_LIMIT = 200


def build_ack(
    source: ParsedOru | str | bytes | None,
    code: AckCode,
    error_text: str | None = None,
    *,
    error_code: str | None = None,
    errors: Sequence[ObxError] = (),
    control_id: str | None = None,
    now: datetime | None = None,
) -> str:
    """An HL7 ACK for ``source``: a :class:`ParsedOru`, or the raw text/bytes of a message that
    could not be parsed (its MSH is then read best-effort; missing values fall back to control
    id ``UNKNOWN`` and version ``2.5``), or ``None``. Returns the ACK text, segments separated
    by CR, for the server to encode and frame.

    - MSH: delimiters ``|^~\\&``; sending/receiving application and facility swapped from the
      original (``NEPHROTRACK`` when the original named no receiver); MSH-9 ``ACK^R01^ACK``;
      MSH-10 ``control_id`` or a new random 20-character id; processing id and version copied.
    - MSA: ``code``, the original control id, and a summary text (MSA-3; at most 200 chars).
    - ERR, one per error: ``error_text`` (message level, HL7 code from ``error_code``), then one
      per ``errors`` item (located at its OBX). Version 2.5 and later use ERR-2 location
      (``OBX^<n>^<field>``), ERR-3 HL7 table 0357 code, ERR-4 severity ``E``, ERR-5 our stable
      code and ERR-8 the full reason; earlier versions (2.1–2.4) only have ERR-1
      (``OBX^<n>^<field>^<0357 code>&<text>&HL70357``), so the reason is in MSA-3 only.

    The ACK is plain ASCII (other characters become ``?``) so that it is valid whatever charset
    the sender declared. Pass ``control_id`` and ``now`` for a deterministic ACK.
    """
    if code not in ("AA", "AE", "AR"):
        raise ValueError(f"ACK code must be AA, AE or AR, not {code!r}")
    header = source if isinstance(source, ParsedOru) else _fallback_header(source)
    version = header.version if VERSION.fullmatch(header.version) else "2.5"
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    msh = "|".join([
        "MSH", "^~\\&",
        _join(header.receiving_application) or ACK_APPLICATION, _join(header.receiving_facility),
        _join(header.sending_application), _join(header.sending_facility),
        moment.strftime("%Y%m%d%H%M%S+0000"), "", "ACK^R01^ACK",
        _escape(control_id or uuid.uuid4().hex[:20].upper()),
        _escape(header.processing_id or "P"), version,
    ])
    summaries = ([error_text] if error_text else []) + [f"OBX {e.obx_index}: {e.reason}" for e in errors]
    summary = "; ".join(summaries)
    if len(summary) > _MSA_TEXT_LIMIT:
        summary = summary[: _MSA_TEXT_LIMIT - 3] + "..."
    msa = "|".join(["MSA", code, _escape(header.control_id or "UNKNOWN"), _escape(summary)]).rstrip("|")
    segments = [msh, msa]
    if error_text:
        segments.append(_err(version, None, error_text, error_code))
    segments.extend(_err(version, error, error.reason, error.code) for error in errors)
    return "\r".join(segments) + "\r"


def _err(version: str, error: ObxError | None, reason: str, code: str | None) -> str:
    hl7_code, hl7_text = _HL7_ERROR.get(code or "", _DEFAULT_HL7_ERROR)
    location = ["OBX", str(error.obx_index), str(error.field or "")] if error else []
    if _version_tuple(version) < (2, 5):
        eld = "^".join(location + [f"{hl7_code}&{hl7_text}&HL70357"]) if error else f"^^^{hl7_code}&{hl7_text}&HL70357"
        return f"ERR|{eld}"
    fields = [
        "ERR", "", "^".join(location).rstrip("^"), f"{hl7_code}^{hl7_text}^HL70357", "E",
        _escape(code or ""), "", "", _escape(reason),
    ]
    return "|".join(fields)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _escape(value: str) -> str:
    """HL7 escape sequences for the delimiters; control characters become blanks and anything
    outside ASCII ``?`` (see :func:`build_ack`)."""
    escaped = (
        value.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
        .replace("&", "\\T\\").replace("~", "\\R\\")
    )
    return "".join(" " if ord(ch) < 32 or ord(ch) == 127 else ch if ord(ch) < 128 else "?" for ch in escaped)


def _join(components: tuple[str, ...]) -> str:
    return "^".join(_escape(part) for part in components)


@dataclass(frozen=True)
class _Header:
    control_id: str = ""
    version: str = ""
    processing_id: str = ""
    sending_application: tuple[str, ...] = ()
    sending_facility: tuple[str, ...] = ()
    receiving_application: tuple[str, ...] = ()
    receiving_facility: tuple[str, ...] = ()


def _fallback_header(source: str | bytes | None) -> _Header:
    """Best-effort MSH fields of a message that could not be parsed (:func:`sniff_msh`);
    missing parts stay empty."""
    text = decode_hl7_bytes(source) if isinstance(source, bytes) else source
    msh = sniff_msh(text) if text is not None else None
    if msh is None:
        return _Header()
    return _Header(
        control_id=msh.first(10), version=msh.first(12), processing_id=msh.first(11),
        sending_application=msh.components(3), sending_facility=msh.components(4),
        receiving_application=msh.components(5), receiving_facility=msh.components(6),
    )
