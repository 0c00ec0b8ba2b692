"""Events enrollment publishes, and the vocabulary they share (sex, group, Lee grade, MEST-C)."""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.events import DomainEvent

Sex = Literal["F", "M"]
Group = Literal["A", "B", "control"]
LeeGrade = Literal["I", "II", "III", "IV", "V"]


class OxfordMestC(BaseModel):
    """Oxford classification (MEST-C) of the diagnostic biopsy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    M: Literal[0, 1] | None = None
    E: Literal[0, 1] | None = None
    S: Literal[0, 1] | None = None
    T: Literal[0, 1, 2] | None = None
    C: Literal[0, 1, 2] | None = None


class PatientEnrolled(DomainEvent):
    subject_id: str
    sex: Sex
    age_years: int = Field(description="age at enrollment, whole years")
    weight_kg: float
    group: Group
    enrolled_on: date
    baseline_egfr: float | None = None
    lee_grade: LeeGrade | None = None
    mest_c: OxfordMestC | None = None


class DialysisStarted(DomainEvent):
    subject_id: str
    on: date


class KidneyTransplanted(DomainEvent):
    subject_id: str
    on: date


class PatientDied(DomainEvent):
    subject_id: str
    on: date


class PatientWithdrawn(DomainEvent):
    subject_id: str
    on: date


class BiopsyRecorded(DomainEvent):
    """Follow-up biopsy findings, so the abstract's biopsy outcomes can be counted."""

    subject_id: str
    performed_on: date
    mesangial_deposits: bool | None = None
    iga_immunofluorescence: Literal["negative", "trace", "1+", "2+", "3+"] | None = None
    mesangial_proliferation: bool | None = None
    foot_process_effacement: bool | None = None
    lee_grade: LeeGrade | None = None


Intervention = Literal["mp_pulse", "cell_infusion", "fat_harvest"]
"""What an adverse event may be related to: the protocol's three interventions."""
Causality = Literal["unrelated", "unlikely", "possible", "probable", "definite"]
TREATMENT_RELATED_CAUSALITIES: frozenset[str] = frozenset({"possible", "probable", "definite"})
"""An adverse event is treatment-related when it names an intervention (``related_to``) with one
of these causalities (contract: "Clinical evidence (v2)")."""
AdverseEventOutcome = Literal["recovered", "recovering", "not_recovered", "recovered_with_sequelae", "fatal", "unknown"]
CtcaeGrade = Literal[1, 2, 3, 4, 5]
"""CTCAE v5: 1 mild, 2 moderate, 3 severe, 4 life-threatening, 5 death related to the AE."""


class AdverseEventReported(DomainEvent):
    """The first report of an adverse event (``ae_id`` is the site's own id for it)."""

    subject_id: str
    ae_id: str
    term: str
    onset_on: date
    grade: CtcaeGrade
    serious: bool
    related_to: tuple[Intervention, ...] = ()
    causality: Causality
    outcome: AdverseEventOutcome
    resolved_on: date | None = None


class AdverseEventUpdated(DomainEvent):
    """A follow-up report of an adverse event: the whole report as it now stands, which replaces
    the earlier one (the latest report is the adverse event's state)."""

    subject_id: str
    ae_id: str
    term: str
    onset_on: date
    grade: CtcaeGrade
    serious: bool
    related_to: tuple[Intervention, ...] = ()
    causality: Causality
    outcome: AdverseEventOutcome
    resolved_on: date | None = None


class PatientDataErased(DomainEvent):
    """The patient withdrew consent and their data were erased: their data key is deleted, so
    every payload about them, in every store and stream, is unreadable from now on
    (docs/erasure.md). Recorded in clear — only the pseudonymous subject id and the date — on its
    own stream ``erasure-<subject_id>``, so every service can act on it: drop the patient from its
    register, its parked results and its projections."""

    subject_id: str
    erased_on: date


EVENTS: tuple[type[DomainEvent], ...] = (
    PatientEnrolled,
    DialysisStarted,
    KidneyTransplanted,
    PatientDied,
    PatientWithdrawn,
    BiopsyRecorded,
    AdverseEventReported,
    AdverseEventUpdated,
    PatientDataErased,
)
