"""HL7 v2.x ORU^R01 lab results parsed into :class:`IncomingResult` items.

Pure: the MLLP server (:mod:`services.labs.mllp`) frames, decodes
(:func:`services.labs.hl7_charsets.decode_hl7_bytes`), calls :func:`parse_oru`, ingests, and
answers (:func:`services.labs.hl7_acks.build_ack`):

- :class:`Hl7MessageError` (a :class:`LabRejection`) for a message we cannot take at all (not
  HL7, no MSH, not ORU^R01, no PID, no OBX, unparseable): answer ``AR``;
- otherwise a :class:`ParsedOru` whose items are, per OBX, an :class:`IncomingResult` (passed
  the static checks of :func:`measure`) or an :class:`ObxError` with a specific reason: answer
  ``AA`` when every OBX was accepted, else ``AE`` listing each bad OBX in an ERR segment.

Mapping (contract): message id MSH-10; lab id MSH-4 (first component: HD namespace id, else
universal id); subject id PID-3 (first repetition, first component); result id OBX-21 when
present, else OBR-3 (filler order number, first component) suffixed ``-<LOINC>`` so that several
OBX under one order get distinct result ids that stay the same when the lab resends or corrects
the order (the OBX set id is positional and may be renumbered in a corrected message; the LOINC
is what the result *is*). Two OBX of one message that end up with the same result id are an
error for the second (``duplicate_result_id``) rather than a silent duplicate. Analyte OBX-3,
value OBX-5, unit OBX-6, status OBX-11 (F final, C corrected, P preliminary; anything else is
refused for that OBX), collection time OBX-14, else OBR-7 of the OBX's order.

One message may carry several patients (repeated PID groups); each OBX takes the PID and OBR
that precede it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Literal

import hl7

from services.labs.catalogue import OPAQUE_ID, measure
from services.labs.hl7_escapes import EscapeError, unescape
from services.labs.inputs import IncomingResult, LabRejection, show

MAX_MESSAGE_CHARS = 1 << 20
"""A lab result message is a few kB; a megabyte is garbage or an attack, refused before parsing."""

_STATUSES = {"F": "final", "C": "corrected", "P": "preliminary"}
_NUMERIC_TYPES = {"", "NM", "SN", "ST"}
_HEADER_FIELDS = ((4, 1), (4, 2), (9, 1), (9, 2), (10, 1), (12, 1))
"""The MSH fields labs reads (lab id, message type, control id, version), as (field, component)."""
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_CENSORED = re.compile(r"\s*(?:<=|>=|<|>)\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)\s*")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
VERSION = re.compile(r"2\.\d+(?:\.\d+)?")
"""An HL7 v2.x version id (MSH-12)."""
_TS = re.compile(
    r"(?P<date>\d{8})(?:(?P<hh>\d{2})(?:(?P<mm>\d{2})(?:(?P<ss>\d{2})(?:\.(?P<frac>\d{1,6}))?)?)?)?"
    r"(?P<zone>[+-]\d{4})?"
)


# --------------------------------------------------------------------------- results


class Hl7MessageError(LabRejection):
    """The message as a whole is refused (answer ``AR``). ``message_id`` is MSH-10 when it could
    be read; ``raw`` is the message text."""


_Refuse = Callable[[str, str], Hl7MessageError]


@dataclass(frozen=True)
class ObxError:
    """One OBX that was not accepted. ``obx_index`` is its 1-based position among the message's
    OBX segments (what ERR-2 reports), ``field`` the OBX field at fault when one is (e.g. 5 for
    the value), ``code`` a stable label as in :class:`LabRejection`."""

    obx_index: int
    set_id: str
    reason: str
    code: str
    field: int | None = None
    subject_id: str | None = None
    result_id: str | None = None


@dataclass(frozen=True)
class ParsedOru:
    """An ORU^R01 taken apart. ``items`` holds, in OBX order, a result or an error per OBX."""

    control_id: str
    version: str
    lab_id: str | None
    sending_application: tuple[str, ...]
    sending_facility: tuple[str, ...]
    receiving_application: tuple[str, ...]
    receiving_facility: tuple[str, ...]
    processing_id: str
    items: tuple[IncomingResult | ObxError, ...]
    raw: str

    @property
    def results(self) -> list[IncomingResult]:
        return [item for item in self.items if isinstance(item, IncomingResult)]

    @property
    def errors(self) -> list[ObxError]:
        return [item for item in self.items if isinstance(item, ObxError)]

    def rejections(self) -> list[LabRejection]:
        """The errors as refusals to publish on ``labs.rejected`` (raw = the whole message)."""
        return [
            LabRejection(f"OBX {error.obx_index}: {error.reason}", error.code,
                         message_id=self.control_id, subject_id=error.subject_id, raw=self.raw)
            for error in self.errors
        ]

    def error_for(self, result: IncomingResult, rejection: LabRejection) -> ObxError:
        """An :class:`ObxError` locating a refusal that came later (from the decider, e.g. a
        collection time in the future) on the OBX the result came from, for the ACK."""
        index = next(position for position, item in enumerate(self.items, 1) if item is result)
        return ObxError(index, str(index), rejection.reason, rejection.code,
                        subject_id=result.subject_id, result_id=result.result_id)


class _ObxProblem(Exception):
    """Internal: one OBX cannot be taken; becomes an :class:`ObxError`."""

    def __init__(self, reason: str, code: str, field: int | None = None) -> None:
        super().__init__(reason)
        self.reason, self.code, self.field = reason, code, field


# --------------------------------------------------------------------------- parsing


def parse_oru(text: str) -> ParsedOru:
    """Parse one ORU^R01 message. Raises only :class:`Hl7MessageError`.

    Segment separators CR (the standard), LF or CRLF are all accepted; MLLP framing bytes
    (VT ... FS CR) left on the text are stripped. Collection times are HL7 TS/DTM
    ``YYYYMMDD[HH[MM[SS[.S…]]]][+/-ZZZZ]`` (at least a day: a month is not a collection date);
    a time without offset is taken as UTC, because HL7 leaves it to "the sender's local zone",
    which we cannot know, and the study asks labs to send UTC or an offset.
    """
    text = _normalise(text)
    message = _parse_message(text)
    msh = message.segment("MSH")
    control_id = _field(msh, 10)

    def refuse(reason: str, code: str) -> Hl7MessageError:
        return Hl7MessageError(reason, code, message_id=control_id or None, raw=text)

    _check_header(msh, control_id, refuse)
    items = _results(message, control_id, _lab_id(msh), text, refuse)
    return ParsedOru(
        control_id=control_id,
        version=_field(msh, 12),
        lab_id=_lab_id(msh),
        sending_application=_components(msh, 3),
        sending_facility=_components(msh, 4),
        receiving_application=_components(msh, 5),
        receiving_facility=_components(msh, 6),
        processing_id=_field(msh, 11),
        items=tuple(items),
        raw=text,
    )


def _normalise(text: str) -> str:
    if len(text) > MAX_MESSAGE_CHARS:
        raise Hl7MessageError(
            f"message is {len(text)} characters; the limit is {MAX_MESSAGE_CHARS}", "message_too_large",
            raw=text[:4096],
        )
    if _SURROGATE.search(text):
        # Only possible for text that did not come from decode_hl7_bytes; it could not be
        # stored or published as JSON, so it is refused with a readable copy as raw.
        raise Hl7MessageError("message text contains unpaired surrogate characters", "bad_encoding",
                              raw=_SURROGATE.sub("\ufffd", text[:4096]))
    text = text.strip("\x0b\x1c\r\n\t ").replace("\r\n", "\r").replace("\n", "\r")
    return "\r".join(segment for segment in text.split("\r") if segment.strip())


def _parse_message(text: str) -> hl7.Message:
    """Structural checks python-hl7 does not do, then ``hl7.parse``.

    python-hl7 raises assorted exception types on malformed input (``ParseException``,
    ``IndexError``, ``AssertionError`` …), so this single boundary catches ``Exception`` and
    turns it into a refusal; nothing else in this module catches broadly.
    """
    if not text.startswith("MSH"):
        raise Hl7MessageError("not an HL7 v2 message: it does not start with an MSH segment", "not_hl7", raw=text)
    separator = text[3:4]
    end = text.find(separator, 4) if separator else -1
    encoding = text[4:end] if end > 0 else ""
    delimiters = separator + encoding
    if (
        not 4 <= len(encoding) <= 5
        or "\r" in delimiters
        or any(ch.isalnum() or ch.isspace() for ch in delimiters)
        or len(set(delimiters)) != len(delimiters)
    ):
        raise Hl7MessageError(
            "MSH-1/MSH-2 delimiters are missing or malformed (expected e.g. MSH|^~\\&|)", "bad_delimiters", raw=text
        )
    for number, segment in enumerate(text.split("\r"), 1):
        if not _SEGMENT_ID.fullmatch(segment[:3]) or (len(segment) > 3 and segment[3] != separator):
            raise Hl7MessageError(f"segment {number} {show(segment[:8])} is not an HL7 segment", "malformed_segment",
                                  raw=text)
        if number > 1 and segment.startswith("MSH"):
            raise Hl7MessageError("several messages in one: send one ORU^R01 per MLLP frame", "batch_not_supported",
                                  raw=text)
    try:
        return hl7.parse(text)
    except Exception as error:  # noqa: BLE001 - the documented parse boundary (see docstring)
        raise Hl7MessageError(f"unparseable HL7: {show(str(error))}", "unparseable", raw=text) from None


def _check_header(msh: hl7.Segment, control_id: str, refuse: _Refuse) -> None:
    for field, component in _HEADER_FIELDS:  # read leniently (as empty) below: refused here first
        try:
            _text(msh, field, component)
        except _ObxProblem as problem:
            raise refuse(problem.reason, problem.code) from None
    message_type = (_field(msh, 9, 1), _field(msh, 9, 2))
    if message_type != ("ORU", "R01"):
        shown = "^".join(part for part in message_type if part) or "(empty)"
        raise refuse(f"message type {shown} is not ORU^R01", "not_oru_r01")
    if not control_id:
        raise refuse("MSH-10 message control id is empty", "missing_control_id")
    if not OPAQUE_ID.fullmatch(control_id):
        raise refuse(f"MSH-10 message control id {show(control_id)} is malformed", "bad_control_id")
    version = _field(msh, 12)
    if not VERSION.fullmatch(version):
        raise refuse(f"MSH-12 version {show(version)} is not an HL7 v2.x version", "bad_version")


def _results(
    message: hl7.Message, control_id: str, lab_id: str | None, text: str, refuse: _Refuse
) -> list[IncomingResult | ObxError]:
    """Walk the segments in order, so each OBX takes the PID and OBR above it."""
    items: list[IncomingResult | ObxError] = []
    subject: str | None = None
    order: hl7.Segment | None = None
    seen_pid = False
    result_ids: set[str] = set()
    for segment in message:
        name = str(segment[0])
        if name == "PID":
            seen_pid, subject, order = True, _subject(segment, refuse), None
        elif name == "OBR":
            order = segment
        elif name == "OBX":
            index, set_id = len(items) + 1, _field(segment, 1)
            try:
                if not seen_pid:
                    raise _ObxProblem("OBX comes before any PID segment", "no_pid")
                result = _obx_result(segment, order, subject, control_id, lab_id, text)
            except _ObxProblem as problem:
                items.append(ObxError(index, set_id, problem.reason, problem.code, problem.field, subject))
                continue
            if result.result_id in result_ids:
                items.append(ObxError(index, set_id, f"result id {result.result_id} appears twice in this message",
                                      "duplicate_result_id", 21, subject, result.result_id))
                continue
            result_ids.add(result.result_id)
            items.append(result)
    if not seen_pid:
        raise refuse("no PID segment: results cannot be attributed to a subject", "no_pid")
    if not items:
        raise refuse("no OBX segment: the message carries no result", "no_obx")
    return items


def _subject(pid: hl7.Segment, refuse: _Refuse) -> str | None:
    """PID-3; an escape labs does not decode refuses the whole message: no OBX can be attributed."""
    try:
        return _text(pid, 3) or None
    except _ObxProblem as problem:
        raise refuse(problem.reason, problem.code) from None


def _obx_result(
    obx: hl7.Segment, order: hl7.Segment | None, subject: str | None, control_id: str, lab_id: str | None, text: str
) -> IncomingResult:
    if subject is None:
        raise _ObxProblem("PID-3 (subject id) of this OBX's patient is empty or unreadable", "bad_subject_id")
    loinc = _loinc(obx)
    unit = _text(obx, 6) or _text(obx, 6, 2, text=True)
    if not unit:
        raise _ObxProblem("OBX-6 unit is empty", "missing_unit", 6)
    result = IncomingResult(
        message_id=control_id,
        subject_id=subject,
        lab_id=lab_id,
        source="mllp",
        loinc=loinc,
        value=_value(obx),
        unit=unit,
        collected_at=_collected_at(obx, order),
        status=_status(obx),
        result_id=_result_id(obx, order, loinc),
        raw=text,
    )
    try:
        measure(result)
    except LabRejection as rejection:
        raise _ObxProblem(rejection.reason, rejection.code, _FIELD_OF_CODE.get(rejection.code)) from None
    return result


_FIELD_OF_CODE = {
    "unknown_loinc": 3, "unit_mismatch": 6, "non_finite_value": 5, "value_out_of_range": 5,
    "collected_too_early": 14, "bad_result_id": 21,
}


def _loinc(obx: hl7.Segment) -> str:
    """OBX-3 as LOINC: the identifier when the coding system (component 3) is ``LN`` or blank,
    else the alternate identifier when the alternate system (component 6) is ``LN``. An
    explicit other system (a lab's local code) is refused even if it looks like a LOINC code:
    a local code that happens to share the shape would be silently misread."""
    code, system = _text(obx, 3), _text(obx, 3, 3).upper()
    if system in ("", "LN"):
        if not code:
            raise _ObxProblem("OBX-3 observation identifier is empty", "unknown_loinc", 3)
        return code
    if _text(obx, 3, 6).upper() == "LN" and _text(obx, 3, 4):
        return _text(obx, 3, 4)
    raise _ObxProblem(f"OBX-3 code {show(code)} is in coding system {show(system)}, not LOINC (LN)",
                      "unknown_loinc", 3)


def _value(obx: hl7.Segment) -> float:
    value_type = _text(obx, 2).upper()
    if value_type not in _NUMERIC_TYPES:
        raise _ObxProblem(f"OBX-2 value type {show(value_type)} is not numeric (NM, SN or ST)", "not_a_number", 2)
    raw = _structured_number(obx) if value_type == "SN" else _text(obx, 5)
    if not raw:
        raise _ObxProblem("OBX-5 value is empty", "missing_value", 5)
    if _CENSORED.fullmatch(raw):
        raise _ObxProblem(f"OBX-5 value {show(raw)} is censored (a bound, not a measurement)", "censored_value", 5)
    if not _NUMBER.fullmatch(raw):
        raise _ObxProblem(f"OBX-5 value {show(raw)} is not a number", "not_a_number", 5)
    return float(raw)


def _structured_number(obx: hl7.Segment) -> str:
    """SN is ``comparator^num1^separator^num2``; only a plain ``[=]^num1`` is a measurement."""
    comparator, number = _text(obx, 5, 1), _text(obx, 5, 2)
    if _text(obx, 5, 3) or _text(obx, 5, 4) or comparator not in ("", "="):
        return f"{comparator}{number}{_text(obx, 5, 3)}{_text(obx, 5, 4)}"
    return number


def _status(obx: hl7.Segment) -> Literal["final", "corrected", "preliminary"]:
    code = _text(obx, 11).upper()
    if code not in _STATUSES:
        raise _ObxProblem(f"OBX-11 result status {show(code)} is not accepted (F, C or P)", "unsupported_status", 11)
    return _STATUSES[code]  # type: ignore[return-value]


def _collected_at(obx: hl7.Segment, order: hl7.Segment | None) -> datetime:
    own = _text(obx, 14)
    if own:
        return _timestamp(own, "OBX-14", 14)
    fallback = _text(order, 7) if order is not None else ""
    if not fallback:
        raise _ObxProblem("no collection time: OBX-14 and OBR-7 are empty", "missing_collected_at", 14)
    return _timestamp(fallback, "OBR-7", None)


def _timestamp(value: str, where: str, field: int | None) -> datetime:
    match = _TS.fullmatch(value)
    if match is None:
        raise _ObxProblem(f"{where} {show(value)} is not an HL7 date-time (YYYYMMDD[HHMM[SS]][+/-ZZZZ])",
                          "bad_datetime", field)
    parts = match.groupdict()
    try:
        zone = UTC
        if parts["zone"]:
            sign = -1 if parts["zone"][0] == "-" else 1
            zone = timezone(sign * timedelta(hours=int(parts["zone"][1:3]), minutes=int(parts["zone"][3:5])))
        moment = datetime(
            int(parts["date"][:4]), int(parts["date"][4:6]), int(parts["date"][6:8]),
            int(parts["hh"] or 0), int(parts["mm"] or 0), int(parts["ss"] or 0),
            int((parts["frac"] or "0").ljust(6, "0")), tzinfo=zone,
        )
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise _ObxProblem(f"{where} {show(value)} is not a valid date-time", "bad_datetime", field) from None


def _result_id(obx: hl7.Segment, order: hl7.Segment | None, loinc: str) -> str:
    instance = _text(obx, 21)
    if instance:
        return instance
    filler = _text(order, 3) if order is not None else ""
    if not filler:
        raise _ObxProblem("no result id: OBX-21 and OBR-3 (filler order number) are empty", "missing_result_id", 21)
    return f"{filler}-{loinc}"


def _lab_id(msh: hl7.Segment) -> str | None:
    return _field(msh, 4, 1) or _field(msh, 4, 2) or None


# --------------------------------------------------------------------------- field access


def _text(segment: hl7.Segment, field: int, component: int = 1, *, text: bool = False) -> str:
    """First repetition's component of a field, unescaped and stripped; ``""`` when absent or
    the HL7 explicit null ``""``. An escape sequence labs does not decode (:mod:`hl7_escapes`;
    ``text``: a free-text field) is a problem of that field (located when it is an OBX's)."""
    try:
        value = unescape(_raw(segment, field, component), segment.separators, segment.esc, text=text).strip()
    except EscapeError as error:
        name = str(segment[0])
        raise _ObxProblem(f"{name}-{field} has {error}", "bad_escape", field if name == "OBX" else None) from None
    return "" if value == hl7.NULL else value


def _raw(segment: hl7.Segment, field: int, component: int) -> str:
    """What python-hl7's ``extract_field(1, field, 1, component, 1)`` reaches, before the
    library's own unescaping, which drops unknown sequences (see :mod:`hl7_escapes`)."""
    if field >= len(segment):
        return ""
    value = segment(field)(1)
    if not isinstance(value, hl7.Repetition):
        return str(value) if component == 1 else ""
    if component > len(value):
        return ""
    value = value(component)
    return str(value(1) if isinstance(value, hl7.Component) else value)


def _field(segment: hl7.Segment, field: int, component: int = 1) -> str:
    """:func:`_text` for header fields, where an unreadable value is simply treated as empty
    (the header checks then refuse the message with their own specific reason)."""
    try:
        return _text(segment, field, component)
    except _ObxProblem:
        return ""


def _components(segment: hl7.Segment, field: int) -> tuple[str, ...]:
    parts = [_field(segment, field, component) for component in (1, 2, 3)]
    while parts and not parts[-1]:
        parts.pop()
    return tuple(parts)
