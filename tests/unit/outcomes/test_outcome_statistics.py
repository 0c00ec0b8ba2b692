"""Cohort rows, Kaplan–Meier kidney-failure-free survival and eGFR trajectories."""

from __future__ import annotations

import io
from datetime import date, timedelta

import pyarrow.parquet as pq
import pytest
from outcome_events import dialysis, died, dose, egfr, enrolled, upcr, withdrawn

from services.outcomes.domain import PatientFacts, compute_outcome, fold
from services.outcomes.exports import patients_csv, patients_parquet
from services.outcomes.statistics import (
    all_cohorts,
    cohort_summary,
    egfr_trajectories,
    kaplan_meier,
    survival_time,
    upcr_trajectories,
)

START = date(2014, 1, 1)


def on(days: int) -> str:
    return (START + timedelta(days=days)).isoformat()


def patient(sid: str, *events, group: str = "A", first_dose: date | None = START) -> PatientFacts:
    base = [enrolled(group=group, sid=sid, enrolled_on=START - timedelta(days=14))]
    if first_dose is not None:
        base.append(dose(first_dose, sid=sid))
    return fold(sid, [*base, *(e.model_copy(update={"subject_id": sid}) for e in events)])


def test_contract_keys_come_first_and_unrounded():
    facts = [patient("P1", egfr("a", 30.0, on(0)), egfr("b", 40.0, on(1000))),
             patient("P2", egfr("a", 20.0, on(0)), egfr("b", 25.0, on(2000)))]
    row = cohort_summary([compute_outcome(f) for f in facts], "A")
    assert list(row)[:8] == ["group", "n", "mean_age", "mean_baseline_egfr", "mean_post_egfr",
                             "mean_followup_years", "mean_egfr_slope", "mean_egfr_change"]
    assert row["mean_followup_years"] == (1000 / 365.25 + 2000 / 365.25) / 2
    assert row["mean_egfr_slope"] is None  # nobody has two results after start
    assert row["sd_post_egfr"] == pytest.approx(10.606601717798213)


def test_all_cohorts_lists_present_groups_in_contract_order():
    outcomes = [compute_outcome(patient(s, group=g)) for s, g in (("C", "control"), ("A1", "A"), ("A2", "A"))]
    assert [(r["group"], r["n"]) for r in all_cohorts(outcomes)] == [("A", 2), ("control", 1)]
    assert all_cohorts([]) == []


def test_survival_time_is_failure_or_the_last_date_known_free_of_it():
    failed = compute_outcome(patient("F", egfr("a", 20.0, on(100)), dialysis(START + timedelta(days=400))))
    assert survival_time(failed) == (400 / 365.25, True)
    followed = compute_outcome(patient("W", egfr("a", 30.0, on(700)), withdrawn(START + timedelta(days=900)),
                                       egfr("p", 31.0, on(1200), status="preliminary")))
    assert survival_time(followed) == (900 / 365.25, False)
    dead = compute_outcome(patient("D", egfr("a", 30.0, on(700)), died(START + timedelta(days=500))))
    assert survival_time(dead) == (700 / 365.25, False)
    assert survival_time(compute_outcome(patient("N"))) == (0.0, False)
    assert survival_time(compute_outcome(patient("U", first_dose=None))) is None
    prevalent = compute_outcome(patient("X", dialysis(START - timedelta(days=1))))
    assert survival_time(prevalent) is None


def test_kaplan_meier_of_a_small_group():
    facts = [patient("P1", dialysis(START + timedelta(days=365))),
             patient("P2", egfr("a", 30.0, on(730))),
             patient("P3", dialysis(START + timedelta(days=1096)))]
    km = kaplan_meier([compute_outcome(f) for f in facts], "A")
    assert (km["n"], km["events"]) == (3, 2)
    steps = km["steps"]
    assert [s["time"] for s in steps] == [0.0, 365 / 365.25, 730 / 365.25, 1096 / 365.25]
    assert [s["survival"] for s in steps] == pytest.approx([1.0, 2 / 3, 2 / 3, 0.0])
    assert [(s["at_risk"], s["events"], s["censored"]) for s in steps] == [(3, 0, 0), (3, 1, 0), (2, 0, 1), (1, 1, 0)]
    assert steps[1]["ci_lower"] < 2 / 3 < steps[1]["ci_upper"]
    assert km["at_risk_by_year"] == [{"years": 0, "at_risk": 3}, {"years": 1, "at_risk": 2},
                                     {"years": 2, "at_risk": 1}, {"years": 3, "at_risk": 1}]


def test_kaplan_meier_degenerate_groups():
    empty = kaplan_meier([], "B")
    assert (empty["n"], empty["steps"], empty["at_risk_by_year"]) == (0, [], [])
    one = kaplan_meier([compute_outcome(patient("P", egfr("a", 30.0, on(500))))], "A")
    assert [s["survival"] for s in one["steps"]] == [1.0, 1.0]
    censored = [compute_outcome(patient(f"P{n}", egfr("a", 30.0, on(300 * n)))) for n in range(1, 4)]
    km = kaplan_meier(censored, "A")
    assert km["events"] == 0
    assert [(s["time"], s["survival"], s["ci_lower"], s["censored"]) for s in km["steps"]] == [
        (0.0, 1.0, 1.0, 0), *((300 * n / 365.25, 1.0, 1.0, 1) for n in range(1, 4))]


def test_trajectories_start_from_the_baseline_and_bin_by_year():
    p1 = patient("P1", egfr("pre", 20.0, on(-10)), egfr("a", 30.0, on(100)), egfr("b", 34.0, on(300)),
                 egfr("c", 5.0, on(400)), egfr("c", 50.0, on(400), status="corrected"),
                 egfr("d", 99.0, on(500), status="preliminary"))
    p2 = patient("P2", egfr("a", 40.0, on(200)))
    untreated = patient("P3", egfr("a", 40.0, on(200)), first_dose=None)
    other = patient("P4", egfr("a", 40.0, on(200)), group="B")
    t = egfr_trajectories([p2, untreated, other, p1], "A")
    assert [p["subject_id"] for p in t["patients"]] == ["P1", "P2"]
    points = t["patients"][0]["points"]
    assert [(p["years"], p["egfr"], p["corrected"]) for p in points] == [
        (-10 / 365.25, 20.0, False), (100 / 365.25, 30.0, False),
        (300 / 365.25, 34.0, False), (400 / 365.25, 50.0, True)]
    # Year 0: baselines 20 (P1 lab) and 27 (P2 enrollment); year 1: P1 mean(30, 34) with P2 40;
    # year 2: P1 50 only.
    assert t["mean_curve"] == [{"year": 0, "mean_egfr": 23.5, "n": 2}, {"year": 1, "mean_egfr": 36.0, "n": 2},
                               {"year": 2, "mean_egfr": 50.0, "n": 1}]


def test_upcr_trajectories_hold_the_counted_upcrs_of_patients_with_a_treatment_start():
    uacr = upcr("u", 30.0, on(50)).model_copy(update={"analyte": "uacr", "unit": "mg/g"})
    p1 = patient("P1", upcr("b", 0.8, on(365)), upcr("a", 2.0, on(-5)), upcr("c", 8.0, on(100)),
                 upcr("c", 0.9, on(100), status="corrected"), upcr("d", 0.1, on(400), status="preliminary"), uacr)
    untreated = patient("P2", upcr("a", 1.0, on(10)), first_dose=None)
    no_upcr = patient("P3", egfr("a", 40.0, on(200)))
    other = patient("P4", upcr("a", 1.0, on(10)), group="B")
    t = upcr_trajectories([no_upcr, untreated, other, p1], "A")
    assert t["group"] == "A" and [p["subject_id"] for p in t["patients"]] == ["P1"]
    assert [(p["result_id"], p["years"], p["upcr"], p["corrected"]) for p in t["patients"][0]["points"]] == [
        ("a", -5 / 365.25, 2.0, False), ("c", 100 / 365.25, 0.9, True), ("b", 365 / 365.25, 0.8, False)]


def test_dates_recorded_before_the_clinical_bounds_existed_are_read_as_they_are():
    # Enrollment, pulse and labs now refuse such dates (shared.clinical_dates); events already
    # recorded keep them, and every answer built from them must still be computed.
    ancient = patient("OLD-1", egfr("a", 30.0, "0001-06-01"), egfr("b", 35.0, "9999-12-30"),
                      died(date(3005, 1, 1)), group="A", first_dose=date(1, 1, 1))
    far = patient("OLD-2", dialysis(date(2016, 1, 1)), egfr("c", 20.0, "2015-01-01"),
                  group="A", first_dose=date(9999, 12, 31))
    control = fold("OLD-3", [enrolled(group="control", sid="OLD-3", enrolled_on=date(1, 1, 1), baseline=33.0),
                             dialysis(date(9999, 12, 31), sid="OLD-3")])
    outcomes = [compute_outcome(f) for f in (ancient, far, control)]
    assert outcomes[0].followup_years == (date(9999, 12, 30) - date(1, 1, 1)).days / 365.25
    assert outcomes[1].kidney_failure_years == (date(2016, 1, 1) - date(9999, 12, 31)).days / 365.25
    assert [row["n"] for row in all_cohorts(outcomes)] == [2, 1]
    assert kaplan_meier(outcomes, "control")["events"] == 1
    assert kaplan_meier(outcomes, "A")["n"] == 1  # OLD-2's kidney failure precedes its start: never at risk
    assert len(egfr_trajectories([ancient, far], "A")["patients"]) == 2
    csv_rows = patients_csv(outcomes).splitlines()
    assert csv_rows[1].startswith("OLD-1,A,F,58,2013-12-18,0001-01-01,")
    assert pq.read_table(io.BytesIO(patients_parquet(outcomes))).num_rows == 3
