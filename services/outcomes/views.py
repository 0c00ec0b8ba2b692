"""Response shapes of the analyst API (they are also its OpenAPI documentation).

The statistics functions return plain dicts; these models name and describe every key so the
``/docs`` page tells an analyst what each number is. Field order follows the dicts, so the JSON
reads the same as the contract's example (contract keys first).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts.enrollment import Group, LeeGrade
from services.outcomes.domain import PatientOutcome
from services.outcomes.queries import Freshness, PatientRecord, TimelineEntry

_MEANS = "over the group's patients where the value is defined; unrounded; null when none defines it"


class CohortRow(BaseModel):
    """One group of ``GET /v1/cohorts`` (contract keys first, then medians, SDs and counts)."""

    group: Group
    n: int = Field(description="enrolled patients in the group")
    mean_age: float | None = Field(description=f"age at enrollment, {_MEANS}")
    mean_baseline_egfr: float | None = Field(description=f"mL/min/1.73m², {_MEANS}")
    mean_post_egfr: float | None = Field(description=f"latest counted eGFR after treatment start, {_MEANS}")
    mean_followup_years: float | None = Field(description=f"treatment start to that eGFR, {_MEANS}")
    mean_egfr_slope: float | None = Field(description=f"least-squares slope per year after treatment start, {_MEANS}")
    mean_egfr_change: float | None = Field(description=f"post − baseline eGFR, {_MEANS}")
    mean_egfr_change_pct: float | None = Field(description=f"(post − baseline) / baseline × 100, {_MEANS}")
    kidney_failure_count: int = Field(description="patients with dialysis or a kidney transplant")
    median_age: float | None
    sd_age: float | None = Field(description="sample SD (n − 1); null below two values")
    median_baseline_egfr: float | None
    sd_baseline_egfr: float | None
    median_post_egfr: float | None
    sd_post_egfr: float | None
    median_followup_years: float | None
    sd_followup_years: float | None
    median_egfr_slope: float | None
    sd_egfr_slope: float | None
    median_egfr_change: float | None
    sd_egfr_change: float | None
    median_egfr_change_pct: float | None
    sd_egfr_change_pct: float | None
    decline_40pct_count: int = Field(description="patients whose post-therapy eGFR is ≤ 60 % of baseline")
    deaths: int
    withdrawals: int
    n_with_post_egfr: int
    n_with_egfr_slope: int
    mean_baseline_upcr: float | None = Field(description=f"g/g, latest counted UPCR on or before treatment start, {_MEANS}")
    mean_post_upcr: float | None = Field(description=f"g/g, latest counted UPCR after treatment start, {_MEANS}")
    complete_remission_count: int = Field(description="patients with post UPCR < 0.3 g/g")
    partial_remission_count: int = Field(description="patients not in complete remission with post UPCR < 1.0 g/g "
                                         "and ≤ 50 % of baseline")
    decline_40_count: int = Field(description="patients with a confirmed ≥ 40 % eGFR decline (confirmed ≥ 28 days later)")
    composite_endpoint_count: int = Field(description="patients reaching the composite kidney endpoint (confirmed "
                                          "40 % decline, kidney failure or death)")
    patients_with_ae: int = Field(description="patients with at least one adverse event")
    patients_with_serious_ae: int = Field(description="patients with a serious adverse event")
    patients_with_significant_related_ae: int = Field(
        description="patients with a treatment-related (possible, probable, definite) adverse event of grade ≥ 3 "
        "or serious")


class SurvivalStep(BaseModel):
    time: float = Field(description="years since treatment start")
    survival: float = Field(description="kidney-failure-free survival just after this time")
    ci_lower: float | None = Field(description="95 % confidence interval (null where undefined)")
    ci_upper: float | None
    at_risk: int
    events: int
    censored: int


class AtRisk(BaseModel):
    years: int
    at_risk: int = Field(description="patients still followed at this many years")


class SurvivalCurve(BaseModel):
    """Kaplan–Meier kidney-failure-free survival of one group, with the numbers behind the plot."""

    group: Group
    n: int = Field(description="patients with a time zero (treatment start) who were at risk")
    events: int = Field(description="kidney failures observed")
    steps: list[SurvivalStep]
    at_risk_by_year: list[AtRisk]


class TrajectoryPoint(BaseModel):
    result_id: str
    collected_on: date
    years: float = Field(description="years since treatment start (≤ 0: before it)")
    egfr: float
    status: Literal["final", "corrected", "preliminary"]
    corrected: bool
    derived_from: Literal["creatinine", "reported"]


class PatientTrajectory(BaseModel):
    subject_id: str
    treatment_start: date
    points: list[TrajectoryPoint]


class MeanCurvePoint(BaseModel):
    year: int = Field(description="0: baseline; k ≥ 1: results in (k − 1, k] years")
    mean_egfr: float | None
    n: int = Field(description="patients contributing to this year")


class EgfrTrajectories(BaseModel):
    """Counted eGFRs against years since treatment start, per patient, and the group's mean."""

    group: Group
    patients: list[PatientTrajectory]
    mean_curve: list[MeanCurvePoint]


class UpcrPoint(BaseModel):
    result_id: str
    collected_on: date
    years: float = Field(description="years since treatment start (≤ 0: before it)")
    upcr: float = Field(description="g/g")
    status: Literal["final", "corrected", "preliminary"]
    corrected: bool


class PatientUpcr(BaseModel):
    subject_id: str
    treatment_start: date
    points: list[UpcrPoint]


class UpcrTrajectories(BaseModel):
    """Counted UPCRs against years since treatment start, per patient (v2)."""

    group: Group
    patients: list[PatientUpcr]


class FactsSummary(BaseModel):
    weight_kg: float | None
    lee_grade: LeeGrade | None
    enrollment_baseline_egfr: float | None = Field(description="the baseline eGFR given at enrollment")
    first_dose_on: date | None
    egfr_results: int = Field(description="lab result ids with an eGFR (counted or not)")
    preliminary_egfr_results: int = Field(description="results whose effective eGFR is not counted")
    urine_results: int = Field(description="urine result ids (UPCR, 24-hour protein, UACR; counted or not)")


class TimelineItem(BaseModel):
    event_id: str
    occurred_on: date = Field(description="the date it happened (UTC calendar date)")
    recorded_at: datetime
    kind: str = Field(
        description="enrolled, pulse_dose, infusion, egfr, urine_result, lab_correction, protocol_deviation, biopsy, "
        "adverse_event (first report), adverse_event_follow_up, dialysis_started, kidney_transplant, death or "
        "withdrawn"
    )
    source: str = Field(description="the service that published it")
    detail: dict[str, Any] = Field(
        description="the event's fields; an egfr or urine_result item also says whether it is the effective "
        "value of its result id (``effective``) or was superseded by a later version, an adverse_event or "
        "adverse_event_follow_up item whether it is the adverse event's current report"
    )


class PatientDetail(PatientOutcome):
    """``GET /v1/patients/{subject_id}``: the contract values, a summary of the facts, the timeline."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    facts: FactsSummary
    timeline: list[TimelineItem]


def patient_detail(record: PatientRecord, outcome: PatientOutcome) -> PatientDetail:
    facts = record.patient.facts
    timeline = []
    for entry in record.timeline:
        detail = entry.detail
        effective = _effective(record, entry)
        if effective is not None:
            detail = {**detail, "effective": effective}
        timeline.append(TimelineItem(
            event_id=entry.event_id, occurred_on=entry.occurred_on, recorded_at=entry.recorded_at,
            kind=entry.kind, source=entry.source, detail=detail,
        ))
    return PatientDetail(
        **outcome.model_dump(),
        facts=FactsSummary(
            weight_kg=facts.weight_kg, lee_grade=facts.lee_grade, enrollment_baseline_egfr=facts.baseline_egfr,
            first_dose_on=facts.first_dose_on, egfr_results=len(facts.egfr),
            preliminary_egfr_results=sum(not p.counted for p in facts.egfr.values()),
            urine_results=len(facts.urine),
        ),
        timeline=timeline,
    )


def _effective(record: PatientRecord, entry: TimelineEntry) -> bool | None:
    """Whether a versioned timeline item (a lab value, an AE report) is the one that counts now;
    ``None`` for the other kinds."""
    patient, detail = record.patient, entry.detail
    match entry.kind:
        case "egfr":
            return patient.egfr_versions.get(detail["result_id"]) == detail.get("lab_stream_version")
        case "urine_result":
            return patient.report_versions.get("urine", {}).get(detail["result_id"]) == detail.get("lab_stream_version")
        case "adverse_event" | "adverse_event_follow_up":
            return patient.report_versions.get("adverse_event", {}).get(detail["ae_id"]) == detail.get("report_version")
    return None


class SourceStatus(BaseModel):
    source: str
    stream: str
    last_sequence: int = Field(description="JetStream sequence of the last message applied")
    last_event_recorded_at: datetime | None
    stream_last_sequence: int | None = Field(description="the stream's head now (null if the broker is unreachable)")
    pending: int | None = Field(description="messages in the stream not yet applied")


class FreshnessView(BaseModel):
    """How fresh the projection is (the same as the X-Projection-* headers, per source)."""

    generation: int
    position: str
    updated_at: datetime | None = Field(description="when the newest applied event was recorded")
    sources: list[SourceStatus]


def freshness_view(freshness: Freshness, heads: dict[str, int | None]) -> FreshnessView:
    sources = []
    for s in freshness.sources:
        head = heads.get(s.stream)
        sources.append(SourceStatus(
            source=s.source, stream=s.stream, last_sequence=s.last_sequence,
            last_event_recorded_at=s.last_event_recorded_at, stream_last_sequence=head,
            pending=max(head - s.last_sequence, 0) if head is not None else None,
        ))
    return FreshnessView(
        generation=freshness.generation, position=freshness.position, updated_at=freshness.updated_at, sources=sources
    )


class RebuildProgressView(BaseModel):
    phase: str
    generation: int
    applied: int
    total: int
    elapsed_seconds: float
    events_per_second: float
    eta_seconds: float | None
    resumed: bool
    error: str | None
    skipped_erased: int = Field(0, description="messages about erased patients, skipped: their key is deleted")


class RebuildStatus(BaseModel):
    """The rebuild this process runs (``progress``) and the projection's state in the database,
    which also shows a rebuild run by ``nephrotrack rebuild`` from another process."""

    running_here: bool
    progress: RebuildProgressView | None
    active_generation: int
    rebuilding_generation: int | None
    rebuild_started_at: datetime | None
    rebuild_heartbeat_at: datetime | None
    swapped_at: datetime | None
