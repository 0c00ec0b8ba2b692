"""Cohort statistics over per-patient outcomes: the contract's means plus what analysts read next.

Why ``math.fsum`` for means: it sums exactly, so a mean does not depend on the order the
patients are listed in and the published means (28.0, 39.0, …) come out as the exact values
of the data rather than within one rounding step of them. Values are never rounded here;
presentation rounds.
"""

from __future__ import annotations

import math
import statistics as pystats
from collections.abc import Iterable, Sequence
from datetime import date
from typing import Any

from contracts.enrollment import Group
from services.outcomes import group_evidence
from services.outcomes.domain import EgfrPoint, PatientFacts, PatientOutcome, compute_outcome
from services.outcomes.measurements import mean, years_between

GROUPS: tuple[Group, ...] = ("A", "B", "control")

# summary key stem -> PatientOutcome attribute; the stem "age" keeps the contract's "mean_age".
_SUMMARISED: dict[str, str] = {
    "age": "age_years",
    "baseline_egfr": "baseline_egfr",
    "post_egfr": "post_egfr",
    "followup_years": "followup_years",
    "egfr_slope": "egfr_slope",
    "egfr_change": "egfr_change",
    "egfr_change_pct": "egfr_change_pct",
}


def median(values: Sequence[float]) -> float | None:
    return float(pystats.median(values)) if values else None


def sample_sd(values: Sequence[float]) -> float | None:
    """Sample standard deviation (n − 1); ``None`` below two values, where it is undefined."""
    return float(pystats.stdev(values)) if len(values) >= 2 else None


def _defined(outcomes: Iterable[PatientOutcome], attribute: str) -> list[float]:
    return [float(v) for o in outcomes if (v := getattr(o, attribute)) is not None]


def _of_group(outcomes: Iterable[PatientOutcome], group: Group) -> list[PatientOutcome]:
    return [o for o in outcomes if o.group == group]


def cohort_summary(outcomes: Iterable[PatientOutcome], group: Group) -> dict[str, Any]:
    """One row of ``GET /v1/cohorts``: the contract keys first, then medians, SDs and counts.

    Every ``mean_*``/``median_*``/``sd_*`` is over the patients of the group where that value
    is defined (e.g. follow-up needs a post-therapy eGFR), unrounded, ``None`` when no patient
    defines it. Counts are of patients.
    """
    members = _of_group(outcomes, group)
    row: dict[str, Any] = {"group": group, "n": len(members)}
    for stem, attribute in _SUMMARISED.items():
        row[f"mean_{stem}"] = mean(_defined(members, attribute))
    row["kidney_failure_count"] = sum(o.kidney_failure for o in members)
    for stem, attribute in _SUMMARISED.items():
        values = _defined(members, attribute)
        row[f"median_{stem}"] = median(values)
        row[f"sd_{stem}"] = sample_sd(values)
    row["decline_40pct_count"] = sum(o.decline_40pct is True for o in members)
    row["deaths"] = sum(o.died_on is not None for o in members)
    row["withdrawals"] = sum(o.withdrawn_on is not None for o in members)
    row["n_with_post_egfr"] = sum(o.post_egfr is not None for o in members)
    row["n_with_egfr_slope"] = sum(o.egfr_slope is not None for o in members)
    row.update(group_evidence.cohort_keys(members))
    return row


def all_cohorts(outcomes: Iterable[PatientOutcome]) -> list[dict[str, Any]]:
    """Summaries in the order A, B, control, for the groups that have at least one patient:
    a row of ``n = 0`` with every mean ``None`` says nothing a missing row does not."""
    outcomes = list(outcomes)
    present = {o.group for o in outcomes}
    return [cohort_summary(outcomes, g) for g in GROUPS if g in present]


# --- kidney-failure-free survival -------------------------------------------------------------

def survival_time(outcome: PatientOutcome) -> tuple[float, bool] | None:
    """(years from treatment start, kidney failure observed) for Kaplan–Meier.

    Time zero is treatment start (control: enrollment). A kidney failure is an event at its
    first onset. Everyone else is censored at the last date they were known free of kidney
    failure: the latest of their last post-treatment counted eGFR, death and withdrawal (no
    such date: censored at 0). Excluded (``None``): patients without a treatment start (no
    time zero) and patients whose kidney failure precedes it (never at risk).
    """
    start = outcome.treatment_start
    if start is None:
        return None
    if outcome.kidney_failure_on is not None:
        if outcome.kidney_failure_on < start:
            return None
        return years_between(start, outcome.kidney_failure_on), True
    known = [d for d in (outcome.post_egfr_on, outcome.died_on, outcome.withdrawn_on) if d is not None and d >= start]
    return years_between(start, max(known, default=start)), False


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def kaplan_meier(outcomes: Iterable[PatientOutcome], group: Group) -> dict[str, Any]:
    """Kidney-failure-free survival of one group (lifelines ``KaplanMeierFitter``, 95 % CI).

    Returns ``steps``: one row per distinct time (time 0 first) with the survival estimate just
    after it, its confidence interval (``None`` where undefined), and the numbers at risk,
    with events and censored at that time; and ``at_risk_by_year``: patients still followed
    (time ≥ t) at t = 0, 1, … up to the longest time. An empty group yields empty tables.
    """
    # Imported here: lifelines pulls in pandas and matplotlib machinery, seconds of start-up
    # that every outcomes process would pay before serving its first request.
    from lifelines import KaplanMeierFitter

    times = [t for o in _of_group(outcomes, group) if (t := survival_time(o)) is not None]
    result: dict[str, Any] = {
        "group": group,
        "n": len(times),
        "events": sum(observed for _, observed in times),
        "steps": [],
        "at_risk_by_year": [],
    }
    if not times:
        return result
    durations = [t for t, _ in times]
    kmf = KaplanMeierFitter().fit(durations, [observed for _, observed in times])
    table = kmf.event_table.join(kmf.survival_function_).join(kmf.confidence_interval_)
    lower, upper = kmf.confidence_interval_.columns
    result["steps"] = [
        {
            "time": float(t),
            "survival": float(row["KM_estimate"]),
            "ci_lower": _finite_or_none(row[lower]),
            "ci_upper": _finite_or_none(row[upper]),
            "at_risk": int(row["at_risk"]),
            "events": int(row["observed"]),
            "censored": int(row["censored"]),
        }
        for t, row in table.iterrows()
    ]
    result["at_risk_by_year"] = [
        {"years": year, "at_risk": sum(d >= year for d in durations)}
        for year in range(math.floor(max(durations)) + 1)
    ]
    return result


# --- eGFR trajectories ------------------------------------------------------------------------

def _trajectory_point(start: date, p: EgfrPoint) -> dict[str, Any]:
    return {
        "result_id": p.result_id,
        "collected_on": p.collected_on.isoformat(),
        "years": years_between(start, p.collected_on),
        "egfr": p.egfr,
        "status": p.status,
        "corrected": p.status == "corrected",
        "derived_from": p.derived_from,
    }


def _year_bin(years: float) -> int:
    """Year k holds (k − 1, k]: a result 2.3 years in belongs to year 3, "by the end of year 3"."""
    return math.ceil(years)


def _mean_curve(patients: list[tuple[PatientOutcome, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Year 0 is each patient's contract baseline eGFR, so the curve starts at the cohort's
    mean baseline; year k ≥ 1 averages results in (k − 1, k]. Each patient's results in a year
    are averaged first so a patient measured monthly weighs no more than one measured once."""
    per_year: dict[int, list[float]] = {}
    for outcome, points in patients:
        if outcome.baseline_egfr is not None:
            per_year.setdefault(0, []).append(outcome.baseline_egfr)
        mine: dict[int, list[float]] = {}
        for point in points:
            if point["years"] > 0:
                mine.setdefault(_year_bin(point["years"]), []).append(point["egfr"])
        for year, values in mine.items():
            per_year.setdefault(year, []).append(math.fsum(values) / len(values))
    return [{"year": y, "mean_egfr": mean(v), "n": len(v)} for y, v in sorted(per_year.items())]


def upcr_trajectories(facts_list: Iterable[PatientFacts], group: Group) -> dict[str, Any]:
    """Per-patient counted UPCRs (g/g) against years since treatment start: one group answer for
    the plots, so a reader never fetches every patient for them. Patients without a treatment
    start or without a counted UPCR are left out."""
    patients = []
    for facts in sorted(facts_list, key=lambda f: f.subject_id):
        start = facts.treatment_start
        if facts.group != group or start is None:
            continue
        counted = sorted((u for u in facts.urine.values() if u.analyte == "upcr" and u.counted),
                         key=lambda u: (u.collected_at, u.result_id))
        points = [{"result_id": u.result_id, "collected_on": u.collected_at.date().isoformat(),
                   "years": years_between(start, u.collected_at.date()), "upcr": u.value, "status": u.status,
                   "corrected": u.status == "corrected"} for u in counted]
        if points:
            patients.append({"subject_id": facts.subject_id, "treatment_start": start.isoformat(), "points": points})
    return {"group": group, "patients": patients}


def egfr_trajectories(facts_list: Iterable[PatientFacts], group: Group) -> dict[str, Any]:
    """Per-patient counted eGFRs against years since treatment start, and the group mean curve.

    Patients without a treatment start have no time axis and are left out. Points include
    those before treatment start (negative or zero years) so the plot shows the baseline.
    """
    patients = []
    for facts in sorted(facts_list, key=lambda f: f.subject_id):
        start = facts.treatment_start
        if facts.group != group or start is None:
            continue
        points = [_trajectory_point(start, p) for p in facts.counted_points()]
        patients.append((compute_outcome(facts), start, points))
    return {
        "group": group,
        "patients": [
            {"subject_id": o.subject_id, "treatment_start": start.isoformat(), "points": points}
            for o, start, points in patients
        ],
        "mean_curve": _mean_curve([(o, points) for o, _, points in patients]),
    }
