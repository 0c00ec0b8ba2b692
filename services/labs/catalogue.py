"""The catalogue of results labs accepts: analytes and their LOINC codes (from the contract), the
spellings of their units, the plausible ranges, the id shapes and clinical dates, and the checks
(:func:`measure`, :func:`validate_result`) every parser and the decider apply.

Pure: no I/O; the clock-dependent check takes ``now`` from its caller.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from contracts.labs import ACCEPTED_CODES, EGFR_UNIT, Analyte
from services.labs.inputs import IncomingResult, LabRejection, rejection_for, show
from shared.clinical_dates import EARLIEST_CLINICAL_DATE, before_earliest
from shared.personal_data import personal_data_kind

CanonicalUnit = Literal["mg/dL", "mL/min/1.73m2", "g/g", "g/day", "mg/g"]
"""The unit each analyte is kept in: creatinine mg/dL, eGFR mL/min/1.73m², and the urine
analytes' units of the contract (``URINE_UNITS``: UPCR g/g, 24-hour protein g/day, UACR mg/g)."""

CREATININE_UMOL_PER_MG_DL = 88.4
"""µmol/L per mg/dL of creatinine, KDIGO's factor (µmol/L ÷ 88.4 = mg/dL): creatinine's molar mass
is 113.12 g/mol, so 1 mg/dL = 10 mg/L = 10 / 113.12 mmol/L = 0.08840 mmol/L = 88.40 µmol/L."""

CREATININE_MG_PER_MMOL = 113.12
"""Creatinine's molar mass: a urine ratio per mmol of creatinine is per 113.12 mg of it, so
1 g/g = 113.12 mg/mmol (the contract's factor) and 1 mg/g = 0.11312 mg/mmol."""

FUTURE_TOLERANCE = timedelta(minutes=5)
"""A lab's clock may run a little ahead of ours; only a collection time further ahead than this
is refused as "in the future" (a seconds-level skew must not bounce a real result)."""

MAX_CREATININE_MG_DL = 30.0
MAX_EGFR = 200.0
_MAX_VALUE: dict[Analyte, float] = {
    "creatinine": MAX_CREATININE_MG_DL, "egfr": MAX_EGFR, "upcr": 50.0, "protein_24h": 50.0, "uacr": 30000.0,
}
"""The highest plausible value of each analyte in its kept unit. Urine bounds are far beyond
any nephrotic range (UPCR and 24-hour protein above 50 g, UACR above 30 g/g are entry errors,
typically mg sent as g), so a real result is never refused."""

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


_CANONICAL_UNIT: dict[Analyte, CanonicalUnit] = {
    "creatinine": "mg/dL", "egfr": EGFR_UNIT, "upcr": "g/g", "protein_24h": "g/day", "uacr": "mg/g",
}
_PER_CANONICAL: dict[tuple[str, CanonicalUnit], float] = {
    ("mg/dL", "mg/dL"): 1.0,
    ("umol/L", "mg/dL"): CREATININE_UMOL_PER_MG_DL,
    (EGFR_UNIT, EGFR_UNIT): 1.0,
    ("g/g", "g/g"): 1.0,
    ("mg/mg", "g/g"): 1.0,
    ("mg/g", "g/g"): 1000.0,
    ("mg/mmol", "g/g"): CREATININE_MG_PER_MMOL,
    ("g/mmol", "g/g"): CREATININE_MG_PER_MMOL / 1000,
    ("g/(24.h)", "g/day"): 1.0,
    ("mg/(24.h)", "g/day"): 1000.0,
    ("mg/g", "mg/g"): 1.0,
    ("ug/mg", "mg/g"): 1.0,
    ("g/g", "mg/g"): 0.001,
    ("mg/mmol", "mg/g"): CREATININE_MG_PER_MMOL / 1000,
}
"""How many of each accepted unit make one of the kept unit: a value is divided by it, as the
contract writes the conversions (µmol/L ÷ 88.4; mg/mmol ÷ 113.12), so 88.4 µmol/L is exactly
1 mg/dL and 113.12 mg/mmol exactly 1 g/g."""
_UNIT_SPELLINGS = {
    "mg/dl": "mg/dL", "umol/l": "umol/L", "ml/min/1.73m2": EGFR_UNIT,
    "g/g": "g/g", "mg/mg": "mg/mg", "mg/g": "mg/g", "ug/mg": "ug/mg", "mg/mmol": "mg/mmol", "g/mmol": "g/mmol",
    **{f"g/{day}": "g/(24.h)" for day in ("(24.h)", "24h", "24hr", "d", "day")},
    **{f"mg/{day}": "mg/(24.h)" for day in ("(24.h)", "24h", "24hr", "d", "day")},
}


def normalise_unit(unit: str) -> str | None:
    """The canonical spelling of a unit we accept, or ``None``.

    Labs spell the same unit many ways: UCUM ``mL/min/{1.73_m2}``, ``mL/min/1.73 m2``,
    ``ml/min/1.73m²``, ``µmol/L`` with either micro sign (U+00B5 or Greek U+03BC), ``umol/L``,
    upper-case ``MG/DL`` from older HL7 systems; a 24-hour amount as UCUM ``g/(24.h)`` or as
    ``g/24h``, ``g/24 h``, ``g/d``, ``g/day``; a urine ratio with its UCUM annotation
    ``mg/g{creat}``. Matching ignores case, blanks, a word-only annotation (``{creat}``), the
    braces of others, ``_`` and ``^``
    and maps both micro signs to ``u``. Case-insensitivity is safe here because no accepted
    unit collides with another when case is dropped.
    """
    squashed = unit.strip().replace("\u00b5", "u").replace("\u03bc", "u").replace("²", "2")
    squashed = re.sub(r"\{[a-z]+}|[\s{}_^]", "", squashed, flags=re.IGNORECASE).lower()
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
        raise rejection_for(incoming, f"LOINC {show(incoming.loinc)} is not an accepted analyte "
                         "(creatinine 2160-0/14682-9, an eGFR code, or urine protein: UPCR 2890-2/34366-5, "
                         "24-hour protein 2889-4, UACR 9318-7/14959-1/14585-4)", "unknown_loinc")
    unit = normalise_unit(incoming.unit)
    if unit not in accepted.units:
        raise rejection_for(
            incoming,
            f"unit {show(incoming.unit)} is not valid for LOINC {accepted.loinc} "
            f"({accepted.analyte}); expected {' or '.join(accepted.units)}",
            "unit_mismatch",
        )
    if not math.isfinite(incoming.value):
        raise rejection_for(incoming, f"value {incoming.value} is not a finite number", "non_finite_value")
    kept_unit = _CANONICAL_UNIT[accepted.analyte]
    canonical = convert(incoming.value, unit, kept_unit)
    _check_range(incoming, accepted.analyte, canonical)
    if incoming.collected_at.date() < EARLIEST_CLINICAL_DATE:  # UTC, like every clinical date
        raise rejection_for(
            incoming, before_earliest("collected_at", incoming.collected_at.isoformat()), "collected_too_early"
        )
    return Measurement(accepted.analyte, canonical, kept_unit)


def convert(value: float, unit: str, kept_unit: CanonicalUnit) -> float:
    """``value`` in ``unit`` (a canonical spelling, see :func:`normalise_unit`) expressed in the
    analyte's kept unit. Raises ``KeyError`` for a pair the catalogue never converts."""
    return value / _PER_CANONICAL[(unit, kept_unit)]


def validate_result(incoming: IncomingResult, now: datetime) -> Measurement:
    """:func:`measure` plus the refusal of collection times in the future (relative to ``now``,
    an aware datetime the caller reads from its clock, so this stays pure)."""
    measurement = measure(incoming)
    if incoming.collected_at > now + FUTURE_TOLERANCE:
        raise rejection_for(
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
        raise rejection_for(
            incoming,
            f"subject id {show(incoming.subject_id)} is empty or not a study pseudonym "
            "(1-64 ASCII letters, digits, '-', '_', '.')",
            "bad_subject_id",
        )
    for name in ("result_id", "message_id"):
        value = getattr(incoming, name)
        if len(value) > MAX_ID_CHARS:
            raise rejection_for(
                incoming, f"{name} is {len(value)} characters long; the limit is {MAX_ID_CHARS}", f"bad_{name}"
            )
        if not OPAQUE_ID.fullmatch(value):
            raise rejection_for(
                incoming,
                f"{name} {show(value)} is empty or malformed (1-128 characters: letters, digits, ._:/@+=#-)",
                f"bad_{name}",
            )
    lab_id = incoming.lab_id
    if lab_id is not None and not (0 < len(lab_id) <= 128 and lab_id.isprintable()):
        # Only informational (a lab's name may contain blanks or accents), but never control
        # characters or unbounded length.
        raise rejection_for(incoming, f"lab id {show(lab_id)} is empty, too long or has control characters", "bad_lab_id")
    if not _LOINC_SHAPE.fullmatch(incoming.loinc):
        raise rejection_for(incoming, f"LOINC {show(incoming.loinc)} is not a LOINC code (like 2160-0)", "unknown_loinc")


def _check_range(incoming: IncomingResult, analyte: Analyte, canonical: float) -> None:
    limit = _MAX_VALUE[analyte]
    unit = _CANONICAL_UNIT[analyte]
    if not 0 < canonical <= limit:
        raise rejection_for(
            incoming,
            f"{analyte} {canonical:g} {unit} is outside the plausible range (0, {limit:g}]",
            "value_out_of_range",
        )
