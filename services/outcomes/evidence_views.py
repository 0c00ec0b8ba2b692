"""Response shapes of the v2 group routes (``/v1/cohorts/{group}/biopsies``, ``/safety``,
``/endpoints``, ``/slopes``), which are also their OpenAPI documentation. Keys and their order
follow the dicts of :mod:`services.outcomes.evidence`, ``endpoints`` and ``slopes``."""

from __future__ import annotations

from pydantic import BaseModel, Field


class BiopsySummary(BaseModel):
    """Patients of the group with paired biopsies (diagnostic on or before treatment start,
    follow-up after it) and, among them, those with each change (a finding missing on either side
    is no change)."""

    paired: int
    deposits_cleared: int = Field(description="mesangial deposits true → false")
    iga_cleared: int = Field(description="IgA immunofluorescence not negative → negative")
    proliferation_resolved: int = Field(description="mesangial proliferation true → false")
    foot_process_improved: int = Field(description="foot process effacement true → false")
    lee_grade_improved: int = Field(description="a lower Lee grade after")


class TermRow(BaseModel):
    term: str = Field(description="as reported (no MedDRA coding)")
    events: int
    patients: int
    max_grade: int
    serious: int
    related: int
    significant_related: int


class RelatedByIntervention(BaseModel):
    mp_pulse: int
    cell_infusion: int
    fat_harvest: int


class SafetySummary(BaseModel):
    """Adverse events of the group from each AE's latest report: ``patients*`` count patients,
    every other number AEs. Related: an intervention named and causality possible, probable or
    definite; significant: grade ≥ 3 or serious."""

    patients: int = Field(description="enrolled patients in the group")
    patients_with_ae: int
    patients_with_serious_ae: int
    patients_with_significant_related_ae: int
    events: int
    serious: int
    related: int
    significant_related: int
    by_grade: dict[str, int] = Field(description="AEs per CTCAE v5 grade, '1'..'5', zeros included")
    related_by_intervention: RelatedByIntervention = Field(
        description="treatment-related AEs naming each intervention (an AE naming two counts under both)")
    by_term: list[TermRow] = Field(description="sorted by term")


class SurvivalTable(BaseModel):
    times: list[float] = Field(description="years from treatment start, one per distinct event or censoring time")
    survival: list[float] = Field(description="Kaplan–Meier composite-endpoint-free survival just after each time")
    at_risk: list[int] = Field(description="patients at risk just before each time")
    events: list[int] = Field(description="composite endpoints at each time")


class IncidenceTable(BaseModel):
    times: list[float]
    cumulative_incidence: list[float] = Field(
        description="Aalen–Johansen cumulative incidence of kidney failure, death competing")
    at_risk: list[int]
    events: list[int] = Field(description="kidney failures at each time")


class KidneyEndpoints(BaseModel):
    """Patients without a treatment start, or with kidney failure or death before it, are never at
    risk and left out."""

    composite: SurvivalTable
    kidney_failure: IncidenceTable


class SlopeFit(BaseModel):
    slope: float | None = Field(description="fixed-effect slope, mL/min/1.73m² per year; null when not fitted")
    ci_low: float | None = Field(description="95 % Wald interval (model-based SE)")
    ci_high: float | None
    patients: int = Field(description="patients with at least one counted eGFR in the window")
    measurements: int
    reason: str | None = Field(description="why the model could not be fitted (null when it was)")


class GroupSlopes(BaseModel):
    """Linear mixed model (random intercept and slope per patient, REML) of counted eGFRs against
    years since treatment start: all after it (total), from day 91 on (chronic)."""

    total: SlopeFit
    chronic: SlopeFit
