"""The v2 group answers from projection rows (services/outcomes/group_evidence.py), on outcomes and
facts folded from events: who enters each curve and count, and the cohort row's v2 keys."""

from __future__ import annotations

from datetime import date

from services.outcomes import group_evidence
from services.outcomes.domain import PatientFacts, compute_outcome, fold
from services.outcomes.statistics import cohort_summary
from tests.unit.outcomes.outcome_events import adverse_event, biopsy, dialysis, dose, egfr, enrolled, upcr

START = date(2014, 3, 10)


def patient(sid: str, *events: object) -> PatientFacts:
    return fold(sid, [enrolled(sid=sid), dose(START, sid=sid), *events])


def cohort() -> list[PatientFacts]:
    return [
        # kidney failure before the first dose: never at risk, left out of both curves
        patient("IGA-A-1", dialysis(date(2014, 3, 5), sid="IGA-A-1"), egfr("R1", 12.0, "2015-01-01", sid="IGA-A-1")),
        # censored at the last eGFR, a year after the start; paired biopsies, deposits cleared
        patient("IGA-A-2", egfr("R2", 30.0, "2015-03-10", sid="IGA-A-2"),
                biopsy(date(2014, 3, 1), deposits=True, sid="IGA-A-2"),
                biopsy(date(2015, 3, 1), deposits=False, sid="IGA-A-2"),
                upcr("U1", 1.5, "2014-03-01", sid="IGA-A-2"), upcr("U2", 0.2, "2015-03-01", sid="IGA-A-2")),
        # dialysis 200 days after the start; a grade 3 AE related to the pulse
        patient("IGA-A-3", dialysis(date(2014, 9, 26), sid="IGA-A-3"),
                adverse_event("AE-1", "pneumonia", date(2014, 4, 1), grade=3, related_to=("mp_pulse",),
                              causality="definite", sid="IGA-A-3")),
    ]


def test_patients_never_at_risk_are_left_out_of_the_curves_but_not_of_the_group() -> None:
    outcomes = [compute_outcome(f) for f in cohort()]
    curves = group_evidence.kidney_endpoints(outcomes)
    assert curves["composite"] == {"times": [200 / 365.25, 365 / 365.25], "survival": [0.5, 0.5],
                                   "at_risk": [2, 1], "events": [1, 0]}
    assert curves["kidney_failure"]["cumulative_incidence"] == [0.5, 0.5]
    assert group_evidence.biopsies(outcomes) == {"paired": 1, "deposits_cleared": 1, "iga_cleared": 0,
                                                 "proliferation_resolved": 0, "foot_process_improved": 0,
                                                 "lee_grade_improved": 0}
    safety = group_evidence.safety(cohort())
    assert (safety["patients"], safety["patients_with_ae"], safety["patients_with_significant_related_ae"]) == (3, 1, 1)


def test_the_cohort_row_counts_v2_values_of_its_patients() -> None:
    row = cohort_summary([compute_outcome(f) for f in cohort()], "A")
    assert {k: row[k] for k in ("mean_baseline_upcr", "mean_post_upcr", "complete_remission_count",
                                "composite_endpoint_count", "patients_with_ae",
                                "patients_with_significant_related_ae")} == {
        "mean_baseline_upcr": 1.5, "mean_post_upcr": 0.2, "complete_remission_count": 1,
        "composite_endpoint_count": 1,  # IGA-A-3's dialysis; IGA-A-1's came before the start
        "patients_with_ae": 1, "patients_with_significant_related_ae": 1,
    }


def test_slopes_take_the_patients_with_a_treatment_start() -> None:
    unstarted = fold("IGA-C-9", [enrolled(sid="IGA-C-9", group="B"), egfr("R9", 40.0, "2015-01-01", sid="IGA-C-9")])
    slopes = group_evidence.group_slopes([*cohort(), unstarted])
    assert (slopes["total"]["patients"], slopes["total"]["measurements"]) == (2, 2)  # IGA-A-1 and IGA-A-2
    assert slopes["total"]["slope"] is None and slopes["total"]["reason"].startswith("too few patients")
