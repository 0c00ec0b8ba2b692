"""Lab ingestion domain: normalising results, CKD-EPI 2021, and the per-result-id decider.

Pure functions only (no I/O, no clock, no asyncio): the caller passes ``now`` in. The three
channels (broker JSON, HL7 v2 over MLLP, FHIR R4) are parsed by their own modules into one
:class:`IncomingResult`; everything after that is channel-agnostic and lives here.

The flow an adapter follows::

    incoming = parse_...(payload)                 # raises LabRejection (specific reason)
    state = fold_result(events of stream_id(incoming.result_id))
    new_events = decide_result(state, incoming, patient, now=now)   # may raise LabRejection
    append new_events to stream_id(incoming.result_id)

and, on any :class:`LabRejection`, publishes :func:`rejection_event` on ``labs.rejected``.

Why one stream per result id: the result id is what a lab uses to say "this replaces that"
(a correction carries the id of the result it corrects), so the result id is the consistency
boundary that decides which value is *effective*.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from contracts.enrollment import PatientEnrolled, Sex
from contracts.labs import (
    ACCEPTED_CODES,
    EGFR_UNIT,
    Analyte,
    EgfrComputed,
    LabResultCorrected,
    LabResultRejected,
    Source,
    Status,
)
from services.labs.events import LabResultRecorded
from shared.clinical_dates import EARLIEST_CLINICAL_DATE, before_earliest
from shared.errors import Invalid
from shared.events import DomainEvent
from shared.personal_data import personal_data_kind

CanonicalUnit = Literal["mg/dL", "mL/min/1.73m2"]

EQUATION = "CKD-EPI 2021"
CREATININE_UMOL_PER_MG_DL = 88.4
"""µmol/L per mg/dL of creatinine, KDIGO's factor (µmol/L ÷ 88.4 = mg/dL): creatinine's molar mass
is 113.12 g/mol, so 1 mg/dL = 10 mg/L = 10 / 113.12 mmol/L = 0.08840 mmol/L = 88.40 µmol/L."""

FUTURE_TOLERANCE = timedelta(minutes=5)
"""A lab's clock may run a little ahead of ours; only a collection time further ahead than this
is refused as "in the future" (a seconds-level skew must not bounce a real result)."""

MAX_CREATININE_MG_DL = 30.0
MAX_EGFR = 200.0

SUBJECT_ID_SHAPE = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""The enrollment service's pseudonym shape (ASCII letters, digits, '-', '_', '.'); anything
else cannot name an enrolled patient, so it is refused here with a reason instead of parked."""

MAX_ID_CHARS = 128
"""Result and message ids fit the columns that hold them (stream names, the result index, parked
rows: 200 characters) with room to spare; a longer id is refused rather than cut or hashed, so
the lab's own id stays what identifies its result and its duplicates."""

OPAQUE_ID = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9._:/@+=#-]{{0,{MAX_ID_CHARS - 1}}}")
"""Result, message and lab ids are chosen by the labs, so they are allowed more punctuation
(':', '/', '@', '+', '=', '#'), but never whitespace, quotes or ';': those only ever come from
broken or hostile input, and ids end up in stream names, logs and ACKs."""

_LOINC_SHAPE = re.compile(r"\d{1,7}-\d")


# --------------------------------------------------------------------------- refusals


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


# --------------------------------------------------------------------------- input model


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


# --------------------------------------------------------------------------- analytes


_CANONICAL_UNIT: dict[Analyte, CanonicalUnit] = {"creatinine": "mg/dL", "egfr": "mL/min/1.73m2"}
_PER_CANONICAL = {"mg/dL": 1.0, "umol/L": CREATININE_UMOL_PER_MG_DL, EGFR_UNIT: 1.0}
"""Each accepted unit per canonical unit: a value is divided by it, as the contract writes the
conversion (µmol/L ÷ 88.4), so 88.4 µmol/L is exactly 1 mg/dL."""
_UNIT_SPELLINGS = {"mg/dl": "mg/dL", "umol/l": "umol/L", "ml/min/1.73m2": EGFR_UNIT}


def normalise_unit(unit: str) -> str | None:
    """The canonical spelling of a unit we accept, or ``None``.

    Labs spell the same unit many ways: UCUM ``mL/min/{1.73_m2}``, ``mL/min/1.73 m2``,
    ``ml/min/1.73m²``, ``µmol/L`` with either micro sign (U+00B5 or Greek U+03BC), ``umol/L``,
    upper-case ``MG/DL`` from older HL7 systems. Matching ignores case, blanks, UCUM
    annotation braces, ``_`` and ``^`` and maps both micro signs to ``u``. Case-insensitivity
    is safe here because no accepted unit collides with another when case is dropped.
    """
    squashed = unit.strip().replace("\u00b5", "u").replace("\u03bc", "u").replace("²", "2")
    squashed = re.sub(r"[\s{}_^]", "", squashed).lower()
    return _UNIT_SPELLINGS.get(squashed)


@dataclass(frozen=True)
class Measurement:
    """A statically valid result: its analyte and value in the analyte's canonical unit."""

    analyte: Analyte
    canonical_value: float
    canonical_unit: CanonicalUnit


def measure(incoming: IncomingResult) -> Measurement:
    """Every check that does not depend on the clock; raises :class:`LabRejection`.

    Parsers call this so that a bad code or unit is reported per result (per OBX, per bundle
    entry) at parse time; :func:`validate_result` adds the clock-dependent check.
    """
    _check_ids(incoming)
    accepted = ACCEPTED_CODES.get(incoming.loinc)
    if accepted is None:
        raise _rejection(incoming, f"LOINC {show(incoming.loinc)} is not an accepted analyte "
                         "(creatinine 2160-0/14682-9 or an eGFR code)", "unknown_loinc")
    unit = normalise_unit(incoming.unit)
    if unit != accepted.unit:
        raise _rejection(
            incoming,
            f"unit {show(incoming.unit)} is not valid for LOINC {accepted.loinc} "
            f"({accepted.analyte}); expected {accepted.unit}",
            "unit_mismatch",
        )
    if not math.isfinite(incoming.value):
        raise _rejection(incoming, f"value {incoming.value} is not a finite number", "non_finite_value")
    canonical = incoming.value / _PER_CANONICAL[unit]
    _check_range(incoming, accepted.analyte, canonical)
    if incoming.collected_at.date() < EARLIEST_CLINICAL_DATE:  # UTC, like every clinical date
        raise _rejection(
            incoming, before_earliest("collected_at", incoming.collected_at.isoformat()), "collected_too_early"
        )
    return Measurement(accepted.analyte, canonical, _CANONICAL_UNIT[accepted.analyte])


def validate_result(incoming: IncomingResult, now: datetime) -> Measurement:
    """:func:`measure` plus the refusal of collection times in the future (relative to ``now``,
    an aware datetime the caller reads from its clock, so this stays pure)."""
    measurement = measure(incoming)
    if incoming.collected_at > now + FUTURE_TOLERANCE:
        raise _rejection(
            incoming,
            f"collected_at {incoming.collected_at.isoformat()} is in the future (now {now.astimezone(UTC).isoformat()})",
            "collected_in_future",
        )
    return measurement


def _check_ids(incoming: IncomingResult) -> None:
    kind = personal_data_kind(incoming.subject_id)
    if kind is not None:
        # Enrollment refuses such ids, so no enrollment can ever make this result's subject known:
        # refused at once (never parked), and neither the reason nor the refusal repeats the value.
        raise LabRejection(
            f"subject id looks like {kind}: only study pseudonyms (such as IGA-A-001) are accepted; "
            "the value is not recorded",
            "personal_identifier", message_id=incoming.message_id, subject_id=None, raw=incoming.raw,
        )
    if not SUBJECT_ID_SHAPE.fullmatch(incoming.subject_id):
        raise _rejection(
            incoming,
            f"subject id {show(incoming.subject_id)} is empty or not a study pseudonym "
            "(1-64 ASCII letters, digits, '-', '_', '.')",
            "bad_subject_id",
        )
    for name in ("result_id", "message_id"):
        value = getattr(incoming, name)
        if len(value) > MAX_ID_CHARS:
            raise _rejection(
                incoming, f"{name} is {len(value)} characters long; the limit is {MAX_ID_CHARS}", f"bad_{name}"
            )
        if not OPAQUE_ID.fullmatch(value):
            raise _rejection(
                incoming,
                f"{name} {show(value)} is empty or malformed (1-128 characters: letters, digits, ._:/@+=#-)",
                f"bad_{name}",
            )
    lab_id = incoming.lab_id
    if lab_id is not None and not (0 < len(lab_id) <= 128 and lab_id.isprintable()):
        # Only informational (a lab's name may contain blanks or accents), but never control
        # characters or unbounded length.
        raise _rejection(incoming, f"lab id {show(lab_id)} is empty, too long or has control characters", "bad_lab_id")
    if not _LOINC_SHAPE.fullmatch(incoming.loinc):
        raise _rejection(incoming, f"LOINC {show(incoming.loinc)} is not a LOINC code (like 2160-0)", "unknown_loinc")


def _check_range(incoming: IncomingResult, analyte: Analyte, canonical: float) -> None:
    limit = MAX_CREATININE_MG_DL if analyte == "creatinine" else MAX_EGFR
    unit = _CANONICAL_UNIT[analyte]
    if not 0 < canonical <= limit:
        raise _rejection(
            incoming,
            f"{analyte} {canonical:g} {unit} is outside the plausible range (0, {limit:g}]",
            "value_out_of_range",
        )


def _rejection(incoming: IncomingResult, reason: str, code: str) -> LabRejection:
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


# --------------------------------------------------------------------------- CKD-EPI 2021

_CKD_EPI_2021: dict[str, tuple[float, float, float]] = {
    # sex: (kappa, alpha, sex factor)
    "F": (0.7, -0.241, 1.012),
    "M": (0.9, -0.302, 1.0),
}


def ckd_epi_2021(creatinine_mg_dl: float, age_years: float, sex: Sex) -> float:
    """Race-free CKD-EPI 2021 creatinine equation (Inker LA et al., N Engl J Med
    2021;385:1737-49), in mL/min/1.73m², unrounded:

        eGFR = 142 × min(Scr/κ, 1)^α × max(Scr/κ, 1)^−1.200 × 0.9938^age × 1.012 [if female]

    κ = 0.7 (F) / 0.9 (M); α = −0.241 (F) / −0.302 (M); Scr in mg/dL (IDMS-traceable).
    Unrounded because outcomes average and regress these values; rounding is for display.
    Raises ``ValueError`` for inputs the equation is not defined for.
    """
    if sex not in _CKD_EPI_2021:
        raise ValueError(f"sex must be 'F' or 'M', not {sex!r}")
    if not (math.isfinite(creatinine_mg_dl) and creatinine_mg_dl > 0):
        raise ValueError(f"creatinine must be a positive finite mg/dL value, not {creatinine_mg_dl!r}")
    if not (math.isfinite(age_years) and age_years >= 0):
        raise ValueError(f"age must be a non-negative number of years, not {age_years!r}")
    kappa, alpha, sex_factor = _CKD_EPI_2021[sex]
    ratio = creatinine_mg_dl / kappa
    return 142.0 * min(ratio, 1.0) ** alpha * max(ratio, 1.0) ** -1.200 * 0.9938**age_years * sex_factor


# --------------------------------------------------------------------------- age


def anniversary(start: date, years: int) -> date:
    """``start`` moved by whole calendar years. A 29 February start falls on 28 February in a
    non-leap year: the last day that is still "in February", so the anniversary is never
    pushed into March (and a person enrolled on 29 Feb ages on 28 Feb in common years)."""
    try:
        return start.replace(year=start.year + years)
    except ValueError:  # 29 February in a common year
        return date(start.year + years, 2, 28)


def whole_years_between(start: date, end: date) -> int:
    """Whole calendar years from ``start`` to ``end`` by anniversary, truncated toward zero
    (negative when ``end`` is before ``start``: a result collected before enrollment)."""
    years = end.year - start.year
    if end >= start:
        return years - 1 if anniversary(start, years) > end else years
    return years + 1 if anniversary(start, years) < end else years


def age_on(age_years_at_enrollment: int, enrolled_on: date, collected_on: date) -> int:
    """Age on the collection date per the contract: the enrollment age plus the whole years, by
    calendar anniversary, from ``enrolled_on`` to ``collected_on``. No birth date exists in the
    system (pseudonymised), so the enrollment date stands in for the birthday."""
    return age_years_at_enrollment + whole_years_between(enrolled_on, collected_on)


# --------------------------------------------------------------------------- decider


@dataclass(frozen=True)
class KnownPatient:
    """What lab ingestion needs to know about an enrolled patient, learnt from
    ``PatientEnrolled`` (enrollment's published event)."""

    subject_id: str
    sex: Sex
    age_years: int
    enrolled_on: date


@dataclass(frozen=True)
class ResultState:
    """The fold of one ``labresult-<result_id>`` stream.

    ``effective`` is the latest :class:`EgfrComputed` (the value readers use); it is ``None``
    only between the first ``LabResultRecorded`` and its ``EgfrComputed``.
    """

    result_id: str
    subject_id: str
    analyte: Analyte
    seen_message_ids: frozenset[str] = field(default_factory=frozenset)
    effective: EgfrComputed | None = None

    @property
    def effective_egfr(self) -> float | None:
        return self.effective.egfr if self.effective else None

    @property
    def status(self) -> Status | None:
        return self.effective.status if self.effective else None


def stream_id(result_id: str) -> str:
    return f"labresult-{result_id}"


_RANK: dict[str, int] = {"preliminary": 0, "final": 1, "corrected": 2}


def decide_result(
    state: ResultState | None,
    incoming: IncomingResult,
    patient: KnownPatient | None,
    *,
    now: datetime,
) -> list[DomainEvent]:
    """Decide what one incoming result means for its result id. Raises :class:`LabRejection`.

    - A message id this result id has already seen: no events (a redelivery has one effect).
    - The result id belongs to another subject, or to the other analyte: refused.
    - Otherwise the result is always recorded (``LabResultRecorded``: the fact that it came), and
      it becomes the *effective* value when it ranks at least as high as the current one:

          corrected > final > preliminary; within the same rank the later arrival wins.

      So a correction replaces the value whatever the arrival order (a ``final`` arriving after
      a ``corrected`` is recorded but changes nothing), a later correction replaces an earlier
      one, a ``final`` supersedes a ``preliminary``, and a ``preliminary`` never displaces a
      final or corrected value (it is effective, uncounted, only while nothing better exists;
      a newer preliminary replaces an older one by the same-rank rule).
    - When the effective value changes: ``EgfrComputed`` (``counted`` = not preliminary),
      preceded by ``LabResultCorrected`` when a ``corrected`` result replaced an earlier value.
      An arrival that would leave the effective eGFR exactly as it is emits no ``EgfrComputed``.

    Creatinine becomes an eGFR with CKD-EPI 2021 from the patient's sex and age on the UTC
    collection date. ``patient`` must be known: the adapter parks results for subjects it has not
    seen enrolled yet, so ``None`` here is refused (``unknown_subject``) rather than guessed.
    """
    if state is not None and incoming.message_id in state.seen_message_ids:
        return []
    measurement = validate_result(incoming, now)
    _check_belongs(state, incoming, measurement)
    if patient is None or patient.subject_id != incoming.subject_id:
        raise _rejection(incoming, f"subject {incoming.subject_id} is not enrolled", "unknown_subject")
    recorded = _recorded(incoming, measurement)
    candidate = _egfr_computed(incoming, measurement, patient)
    current = state.effective if state else None
    if not _supersedes(candidate, current):
        return [recorded]
    events: list[DomainEvent] = [recorded]
    if incoming.status == "corrected" and current is not None:
        events.append(
            LabResultCorrected(
                result_id=incoming.result_id,
                subject_id=incoming.subject_id,
                previous_value=_canonical_value(current),
                new_value=measurement.canonical_value,
                canonical_unit=measurement.canonical_unit,
            )
        )
    events.append(candidate)
    return events


def _check_belongs(state: ResultState | None, incoming: IncomingResult, measurement: Measurement) -> None:
    if state is None:
        return
    if state.subject_id != incoming.subject_id:
        raise _rejection(
            incoming,
            f"result id {incoming.result_id} already belongs to another subject",
            "result_id_conflict",
        )
    if state.analyte != measurement.analyte:
        raise _rejection(
            incoming,
            f"result id {incoming.result_id} holds a {state.analyte} result; it cannot become {measurement.analyte}",
            "analyte_mismatch",
        )


def _supersedes(candidate: EgfrComputed, current: EgfrComputed | None) -> bool:
    if current is None:
        return True
    if _RANK[candidate.status] < _RANK[current.status]:
        return False
    return candidate.model_dump(exclude={"source"}) != current.model_dump(exclude={"source"})


def _canonical_value(computed: EgfrComputed) -> float:
    return computed.creatinine_mg_dl if computed.creatinine_mg_dl is not None else computed.egfr


def _recorded(incoming: IncomingResult, measurement: Measurement) -> LabResultRecorded:
    return LabResultRecorded(
        result_id=incoming.result_id,
        message_id=incoming.message_id,
        subject_id=incoming.subject_id,
        lab_id=incoming.lab_id,
        source=incoming.source,
        loinc=incoming.loinc,
        analyte=measurement.analyte,
        value=incoming.value,
        unit=incoming.unit,
        canonical_value=measurement.canonical_value,
        canonical_unit=measurement.canonical_unit,
        status=incoming.status,
        collected_at=incoming.collected_at,
    )


def _egfr_computed(incoming: IncomingResult, measurement: Measurement, patient: KnownPatient) -> EgfrComputed:
    common = dict(
        result_id=incoming.result_id,
        subject_id=incoming.subject_id,
        collected_at=incoming.collected_at,
        status=incoming.status,
        counted=incoming.status != "preliminary",
        source=incoming.source,
        loinc=incoming.loinc,
    )
    if measurement.analyte == "egfr":
        return EgfrComputed(egfr=measurement.canonical_value, derived_from="reported", **common)
    age = age_on(patient.age_years, patient.enrolled_on, incoming.collected_at.date())
    return EgfrComputed(
        egfr=ckd_epi_2021(measurement.canonical_value, age, patient.sex),
        derived_from="creatinine",
        creatinine_mg_dl=measurement.canonical_value,
        equation=EQUATION,
        sex=patient.sex,
        age_years=age,
        **common,
    )


def evolve(state: ResultState | None, event: DomainEvent) -> ResultState | None:
    """Apply one event of a ``labresult-<result_id>`` stream. Events this stream never holds
    leave the state unchanged, so a reader can fold a mixed sequence safely."""
    if isinstance(event, LabResultRecorded):
        if state is None:
            return ResultState(event.result_id, event.subject_id, event.analyte, frozenset({event.message_id}))
        return replace(state, seen_message_ids=state.seen_message_ids | {event.message_id})
    if isinstance(event, EgfrComputed):
        if state is None:
            raise ValueError(f"EgfrComputed for {event.result_id} before any LabResultRecorded")
        return replace(state, effective=event)
    return state


def fold_result(events: Iterable[DomainEvent]) -> ResultState | None:
    state: ResultState | None = None
    for event in events:
        state = evolve(state, event)
    return state


def known_patient(enrolled: PatientEnrolled) -> KnownPatient:
    """The :class:`KnownPatient` that enrollment's published ``PatientEnrolled`` implies."""
    return KnownPatient(enrolled.subject_id, enrolled.sex, enrolled.age_years, enrolled.enrolled_on)
