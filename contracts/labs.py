"""What lab ingestion publishes: the effective eGFR of each result, corrections and refusals, and
the LOINC catalogue of what it accepts (the codes other services and exports name results by).

Every accepted result is recorded on the stream ``labresult-<result_id>``. ``EgfrComputed``
is emitted whenever the *effective* eGFR of a result id changes (first arrival, a correction,
a preliminary superseded by a final): readers keep, per result id, the latest ``EgfrComputed``
by stream version, and count it only when ``counted`` is true.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from shared.events import DomainEvent

Source = Literal["broker", "mllp", "fhir"]
Status = Literal["final", "corrected", "preliminary"]


class EgfrComputed(DomainEvent):
    """The effective eGFR of one result id, measured or computed from creatinine."""

    result_id: str
    subject_id: str
    egfr: float
    collected_at: datetime
    status: Status
    counted: bool
    source: Source
    derived_from: Literal["creatinine", "reported"]
    creatinine_mg_dl: float | None = None
    equation: Literal["CKD-EPI 2021"] | None = None
    sex: Literal["F", "M"] | None = None
    age_years: int | None = None
    loinc: str | None = None
    """The LOINC code the lab sent the result under (a creatinine code when ``derived_from`` is
    ``creatinine``), so exports can name each result by it; ``None`` on events recorded before
    the code was carried."""


UrineAnalyte = Literal["upcr", "protein_24h", "uacr"]
"""Urine protein/creatinine ratio, 24-hour urine protein, urine albumin/creatinine ratio."""
UrineUnit = Literal["g/g", "g/day", "mg/g"]
"""The unit each urine analyte is kept in: UPCR g/g, 24-hour protein g/day, UACR mg/g."""
URINE_UNITS: dict[str, str] = {"upcr": "g/g", "protein_24h": "g/day", "uacr": "mg/g"}


class UrineResultMeasured(DomainEvent):
    """The effective value of one urine protein result id (UPCR, 24-hour protein or UACR), in
    the analyte's kept unit, whatever unit the lab sent. As with :class:`EgfrComputed`, readers
    keep per result id the latest by stream version, and count it only when ``counted``."""

    result_id: str
    subject_id: str
    analyte: UrineAnalyte
    value: float
    unit: UrineUnit
    loinc: str
    collected_at: datetime
    status: Status
    counted: bool
    source: Source


class LabResultCorrected(DomainEvent):
    """A ``corrected`` result replaced the value of an earlier one with the same result id."""

    result_id: str
    subject_id: str
    previous_value: float
    new_value: float
    canonical_unit: str


class LabResultRejected(DomainEvent):
    """An input that was not accepted, with its raw payload; also published on ``labs.rejected``."""

    source: Source
    reason: str
    raw: str
    message_id: str | None = None
    subject_id: str | None = None
    code: str | None = None
    """Stable machine label of the reason (e.g. ``unknown_loinc``), for metrics and alerts."""


EVENTS: tuple[type[DomainEvent], ...] = (EgfrComputed, UrineResultMeasured, LabResultCorrected, LabResultRejected)


# --------------------------------------------------------------------------- the LOINC catalogue

Analyte = Literal["creatinine", "egfr", "upcr", "protein_24h", "uacr"]


@dataclass(frozen=True)
class AcceptedCode:
    """A LOINC code we accept, what it means, and which (normalised) units it may come in:
    ``unit``, the one its LOINC property implies, and any ``other_units`` of the same dimension
    that labs send under it (a urine ratio in mg/g or g/g)."""

    loinc: str
    analyte: Analyte
    unit: str
    meaning: str
    other_units: tuple[str, ...] = ()

    @property
    def units(self) -> tuple[str, ...]:
        return (self.unit, *self.other_units)


_CREATININE = (
    AcceptedCode("2160-0", "creatinine", "mg/dL", "Creatinine [Mass/volume] in Serum or Plasma"),
    AcceptedCode("14682-9", "creatinine", "umol/L", "Creatinine [Moles/volume] in Serum or Plasma"),
)
EGFR_UNIT = "mL/min/1.73m2"
_EGFR = (
    AcceptedCode(
        "98979-8", "egfr", EGFR_UNIT,
        "GFR/1.73 sq M.predicted, Serum/Plasma/Blood, creatinine-based formula (CKD-EPI 2021, race-free)",
    ),
    AcceptedCode(
        "98980-6", "egfr", EGFR_UNIT,
        "GFR/1.73 sq M.predicted, Serum/Plasma/Blood, creatinine and cystatin C-based formula (CKD-EPI 2021)",
    ),
    AcceptedCode(
        "33914-3", "egfr", EGFR_UNIT,
        "GFR/1.73 sq M.predicted, Serum or Plasma, creatinine-based formula (MDRD)",
    ),
    AcceptedCode(
        "48642-3", "egfr", EGFR_UNIT,
        "GFR/1.73 sq M.predicted among non-blacks, creatinine-based formula (MDRD)",
    ),
    AcceptedCode(
        "48643-1", "egfr", EGFR_UNIT,
        "GFR/1.73 sq M.predicted among blacks, creatinine-based formula (MDRD)",
    ),
    AcceptedCode(
        "50044-7", "egfr", EGFR_UNIT,
        "GFR/1.73 sq M.predicted among females, creatinine-based formula (MDRD)",
    ),
    AcceptedCode(
        "77147-7", "egfr", EGFR_UNIT,
        "GFR/1.73 sq M.predicted, Serum/Plasma/Blood, creatinine-based formula (MDRD)",
    ),
    AcceptedCode(
        "62238-1", "egfr", EGFR_UNIT,
        "GFR/1.73 sq M.predicted, Serum/Plasma/Blood, creatinine-based formula (CKD-EPI 2009)",
    ),
    AcceptedCode(
        "88293-6", "egfr", EGFR_UNIT,
        "GFR/1.73 sq M.predicted among blacks, creatinine-based formula (CKD-EPI 2009)",
    ),
    AcceptedCode(
        "88294-4", "egfr", EGFR_UNIT,
        "GFR/1.73 sq M.predicted among non-blacks, creatinine-based formula (CKD-EPI 2009)",
    ),
    AcceptedCode(
        "94677-2", "egfr", EGFR_UNIT,
        "GFR/1.73 sq M.predicted, creatinine and cystatin C-based formula (CKD-EPI 2012)",
    ),
    AcceptedCode(
        "69405-9", "egfr", EGFR_UNIT,
        "GFR/1.73 sq M.predicted, Serum/Plasma/Blood, formula not specified",
    ),
)
_URINE = (
    AcceptedCode("2890-2", "upcr", "mg/g", "Protein/Creatinine [Mass Ratio] in Urine", ("mg/mg", "g/g")),
    AcceptedCode("34366-5", "upcr", "mg/mmol", "Protein/Creatinine [Ratio] in Urine (SI)", ("g/mmol",)),
    AcceptedCode(
        "2889-4", "protein_24h", "g/(24.h)", "Protein [Mass/time] in 24 hour Urine", ("mg/(24.h)",),
    ),
    AcceptedCode("9318-7", "uacr", "mg/g", "Albumin/Creatinine [Mass Ratio] in Urine", ("ug/mg", "g/g")),
    AcceptedCode("14959-1", "uacr", "mg/g", "Microalbumin/Creatinine [Mass Ratio] in Urine", ("ug/mg",)),
    AcceptedCode("14585-4", "uacr", "mg/mmol", "Albumin/Creatinine [Molar ratio] in Urine (SI)"),
)
ACCEPTED_CODES: dict[str, AcceptedCode] = {code.loinc: code for code in (*_CREATININE, *_EGFR, *_URINE)}
"""Every LOINC code we accept. Creatinine arrives as 2160-0 (mg/dL) or 14682-9 (µmol/L) and is
turned into a CKD-EPI 2021 eGFR here. A reported eGFR is taken as the lab computed it, whatever
its equation: 98979-8 is the current race-free CKD-EPI 2021 code and 98980-6 its creatinine +
cystatin C form; the others are the older codes labs still send (MDRD, CKD-EPI 2009 with or
without race, cystatin-based 2012, unspecified). All eGFRs are in mL/min/1.73m². Urine protein
comes as UPCR (2890-2 in mg/g, mg/mg or g/g; 34366-5, the SI form, in mg/mmol or g/mmol),
24-hour protein (2889-4, g or mg per 24 h) and UACR (9318-7 and 14959-1 in mg/g or µg/mg;
14585-4, the SI form, in mg/mmol), each kept in its unit of ``URINE_UNITS``. The code's meaning
is kept on each entry for documentation."""
