"""The v2 answers about a group (contract, "Outcome statistics (v2)"), from projection rows:
the cohort row's v2 keys, ``GET /v1/cohorts/{group}/biopsies``, ``/safety``, ``/endpoints`` and
``/slopes``.

Why from rows and not from the log: each patient's v2 values are computed when the projection
records the facts (``domain.compute_outcome``), so the cohort row, the biopsy counts and the
endpoint curves read one outcome per patient; safety and slopes read the patient's facts (the
adverse events' latest reports, the counted eGFRs) — O(patients + their results), never a replay.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from services.outcomes import endpoints, evidence, slopes
from services.outcomes.domain import PatientFacts, PatientOutcome
from services.outcomes.endpoints import TimeToEvent


def patient_evidence(outcome: PatientOutcome) -> evidence.PatientEvidence:
    """The v2 values of one patient's outcome row, as ``evidence.cohort_evidence`` reads them."""
    return evidence.PatientEvidence(
        proteinuria=evidence.Proteinuria(outcome.baseline_upcr, outcome.post_upcr, outcome.upcr_change_pct,
                                         outcome.complete_remission, outcome.partial_remission),
        decline_40_on=outcome.decline_40_on,
        composite=_composite(outcome),
        safety=evidence.PatientSafety(outcome.adverse_events, outcome.highest_ae_grade, outcome.any_serious_ae,
                                      outcome.any_significant_related_ae),
    )


def cohort_keys(members: Iterable[PatientOutcome]) -> dict[str, Any]:
    """The v2 keys of a ``GET /v1/cohorts`` row (means and counts over the group's patients)."""
    return evidence.cohort_evidence(patient_evidence(o) for o in members)


def _composite(outcome: PatientOutcome) -> TimeToEvent | None:
    """``None``: never at risk (no treatment start, or kidney failure or death before it)."""
    if outcome.composite_endpoint_days is None:
        return None
    return TimeToEvent(outcome.composite_endpoint_days, outcome.composite_endpoint)


def _competing(outcome: PatientOutcome) -> TimeToEvent | None:
    if outcome.kidney_failure_competing_days is None:
        return None
    return TimeToEvent(outcome.kidney_failure_competing_days, outcome.kidney_failure_competing)


def biopsies(members: Iterable[PatientOutcome]) -> dict[str, int]:
    """Patients with paired biopsies and, among them, those with each change."""
    return evidence.biopsy_summary(
        evidence.BiopsyChanges(**{name: bool(getattr(o, name)) for name in evidence.BIOPSY_CHANGES})
        if o.paired_biopsies else None
        for o in members
    )


def kidney_endpoints(members: Iterable[PatientOutcome]) -> dict[str, dict[str, list[Any]]]:
    """Kaplan–Meier composite-endpoint-free survival and the Aalen–Johansen cumulative incidence
    of kidney failure with death competing; patients never at risk are left out of both."""
    members = list(members)
    return {
        "composite": endpoints.kaplan_meier_curve(_composite(o) for o in members),
        "kidney_failure": endpoints.cumulative_incidence_curve(_competing(o) for o in members),
    }


def safety(members: Iterable[PatientFacts]) -> dict[str, Any]:
    """AEs by term, grade, seriousness and relatedness, from each AE's latest report."""
    return evidence.safety_summary(f.adverse_events.values() for f in members)


def group_slopes(members: Iterable[PatientFacts]) -> dict[str, dict[str, Any]]:
    """Total and chronic mixed-model slopes of the patients with a treatment start."""
    return slopes.group_slopes(
        slopes.PatientEgfr(f.subject_id, start, tuple(p.measurement for p in f.counted_points()))
        for f in members if (start := f.treatment_start) is not None
    )
