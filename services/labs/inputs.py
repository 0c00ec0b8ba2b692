"""What every channel's parser hands the labs service: one :class:`IncomingResult` per result, or a
:class:`LabRejection` with a specific reason; and the helpers a refusal's report needs.

Pure: no I/O, no clock. The broker (:mod:`services.labs.broker_messages`), HL7
(:mod:`services.labs.hl7_messages`) and FHIR (:mod:`services.labs.fhir_observations`) parsers
produce these; the catalogue (:mod:`services.labs.catalogue`) checks them; the decider
(:mod:`services.labs.domain`) records them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from contracts.labs import LabResultRejected, Source, Status
from shared.errors import Invalid


class LabRejection(Invalid):
    """An input that is not accepted. ``reason`` is specific and safe to show to the sender;
    ``code`` is a stable machine label (metrics, OperationOutcome, ACK error codes).

    The optional ``message_id``/``subject_id``/``raw`` carry what the parser already knew, so
    the adapter can publish a complete :class:`LabResultRejected` without re-parsing.
    """

    def __init__(
        self,
        reason: str,
        code: str,
        *,
        message_id: str | None = None,
        subject_id: str | None = None,
        raw: str | None = None,
    ) -> None:
        super().__init__(reason, code=code)
        self.message_id = message_id
        self.subject_id = subject_id
        self.raw = raw


def show(value: object, limit: int = 60) -> str:
    """``ascii()`` of untrusted input, shortened, for use inside a rejection reason: quoted so
    blanks and empty strings are visible, ASCII-only so the reason is safe in any charset (HL7
    ACKs, logs), and short so a 1 MB garbage field does not turn into a 1 MB reason."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."




class IncomingResult(BaseModel):
    """One lab result, whichever channel it came by, before any domain check.

    ``value`` and ``unit`` are as the lab sent them; ``raw`` is the payload it came in (whole
    HL7 message, broker body, FHIR resource JSON) so that a later rejection can report it.
    ``collected_at`` must be timezone-aware and is stored in UTC.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    message_id: str
    subject_id: str
    lab_id: str | None = None
    source: Source
    loinc: str
    value: float
    unit: str
    collected_at: datetime
    status: Status
    result_id: str
    raw: str

    @field_validator("collected_at")
    @classmethod
    def _aware_utc(cls, value: datetime) -> datetime:
        if value.tzinfo is UTC:  # what every parser hands in: nothing to convert
            return value
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("collected_at must be timezone-aware")
        return value.astimezone(UTC)


def rejection_for(incoming: IncomingResult, reason: str, code: str) -> LabRejection:
    """The refusal of ``incoming``, carrying its ids and raw payload for the report."""
    return LabRejection(
        reason, code, message_id=incoming.message_id, subject_id=incoming.subject_id, raw=incoming.raw
    )


def rejection_event(error: LabRejection, *, source: Source, raw: str | None = None) -> LabResultRejected:
    """The :class:`LabResultRejected` to publish on ``labs.rejected`` for a refusal.

    ``raw`` overrides what the refusal carries (e.g. when the parser failed before it could
    decode the payload, the adapter passes ``raw_for_report(data)``).
    """
    return LabResultRejected(
        source=source,
        reason=error.reason,
        code=error.code,
        raw=raw if raw is not None else (error.raw or ""),
        message_id=error.message_id,
        subject_id=error.subject_id,
    )


MAX_JSON_DEPTH = 64
"""Objects and arrays nested in one JSON input (a broker message, a FHIR resource or Bundle). A lab
result is 5-6 levels deep. fhir.resources validates nested elements recursively in Python: a
chain of 130 extensions exhausted the interpreter's recursion limit (an HTTP 500 that took a
whole Bundle down). At 64 levels the validation stays far from that limit."""


def nested_too_deeply(value: Any) -> bool:
    """Whether a decoded JSON ``value`` nests objects and arrays deeper than :data:`MAX_JSON_DEPTH`.
    Walked level by level, without recursion, so the check itself cannot run out of stack."""
    level = [value] if isinstance(value, dict | list) else []
    for _ in range(MAX_JSON_DEPTH):
        level = [
            child for node in level for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


def json_too_deep(
    what: str, raw: str | None = None, *, message_id: str | None = None, subject_id: str | None = None
) -> LabRejection:
    """The refusal (``too_deep``) of JSON nested deeper than :data:`MAX_JSON_DEPTH` (also when the
    decoder itself gave up on the nesting)."""
    return LabRejection(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep (objects and arrays)",
                        "too_deep", message_id=message_id, subject_id=subject_id, raw=raw)


def raw_for_report(data: bytes, limit: int = 1 << 20) -> str:
    """Undecodable or oversized bytes as text for a rejection report: invalid UTF-8 bytes are
    kept visible as ``\\xNN`` escapes (never silently replaced), and the text is cut at ``limit``."""
    text = data[:limit].decode("utf-8", errors="backslashreplace")
    return text if len(data) <= limit else text + f"... [{len(data) - limit} more bytes]"
