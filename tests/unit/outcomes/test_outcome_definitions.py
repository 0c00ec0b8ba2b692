"""The contract's per-patient definitions ("Outcome statistics") on hand-made facts."""

from __future__ import annotations

from datetime import date, datetime

import pytest
from outcome_events import (
    SID,
    deviation,
    dialysis,
    died,
    dose,
    egfr,
    enrolled,
    infused,
    transplant,
    withdrawn,
)

from contracts.enrollment import PatientEnrolled
from contracts.labs import EgfrComputed, LabResultRejected
from services.outcomes.domain import (
    PatientFacts,
    PatientNotEnrolled,
    apply,
    compute_outcome,
    fold,
)

START = date(2014, 3, 10)


def outcome(*events):
    return compute_outcome(fold(SID, events))


def test_baseline_falls_back_to_enrollment_without_a_counted_result_before_start():
    o = outcome(enrolled(baseline=27.0), dose(START),
                egfr("pre", 20.0, "2014-03-01", status="preliminary"), egfr("post", 30.0, "2015-03-10"))
    assert (o.baseline_egfr, o.baseline_source) == (27.0, "enrollment")
    assert o.post_egfr == 30.0


def test_baseline_is_the_latest_counted_result_on_or_before_the_start_date():
    o = outcome(enrolled(baseline=27.0), dose(START),
                egfr("old", 22.0, "2014-01-05"),
                egfr("same-day-late", 25.5, "2014-03-10T21:00:00+00:00"),
                egfr("next-day", 31.0, "2014-03-11T00:10:00+00:00"))
    assert (o.baseline_egfr, o.baseline_source) == (25.5, "lab")
    assert o.post_egfr == 31.0


def test_dates_are_utc_calendar_dates():
    # 23:30 at UTC−5 on the start date is the next UTC day: after start, not baseline.
    # 01:00 at UTC+2 the day after start is still the start date in UTC: baseline.
    o = outcome(enrolled(baseline=27.0), dose(START),
                egfr("local-late", 33.0, "2014-03-10T23:30:00-05:00"),
                egfr("local-early", 24.0, "2014-03-11T01:00:00+02:00"))
    assert o.baseline_egfr == 24.0
    assert o.post_egfr == 33.0
    assert o.followup_years == 1 / 365.25


def test_preliminary_results_never_count():
    o = outcome(enrolled(), dose(START), egfr("final", 30.0, "2015-03-10"),
                egfr("prelim", 10.0, "2016-03-10", status="preliminary"))
    assert o.post_egfr == 30.0
    assert o.post_egfr_on == date(2015, 3, 10)
    assert o.counted_egfr_n == 1


def test_a_corrected_result_replaces_the_wrong_final_of_the_same_result_id():
    o = outcome(enrolled(), dose(START), egfr("r1", 4.4, "2016-03-10"),
                egfr("r1", 44.0, "2016-03-10", status="corrected"))
    assert o.post_egfr == 44.0
    assert o.counted_egfr_n == 1


def test_a_superseding_preliminary_stops_the_result_counting():
    # Labs decides what counts; the newest EgfrComputed of a result id is its effective value.
    o = outcome(enrolled(), dose(START), egfr("r1", 30.0, "2016-03-10"),
                egfr("r1", 31.0, "2016-03-10", status="preliminary"))
    assert o.post_egfr is None


def test_control_treatment_starts_at_enrollment_even_with_doses():
    enrolled_on = date(2013, 4, 1)
    o = outcome(enrolled(group="control", enrolled_on=enrolled_on, baseline=33.0), dose(date(2013, 6, 1)),
                egfr("r1", 33.0, "2013-04-01"), egfr("r2", 26.0, "2014-05-26"), dialysis(date(2015, 1, 21)))
    assert o.treatment_start == enrolled_on
    assert (o.baseline_egfr, o.baseline_source) == (33.0, "lab")
    assert o.post_egfr == 26.0
    assert o.followup_years == (date(2014, 5, 26) - enrolled_on).days / 365.25
    assert o.kidney_failure and o.kidney_failure_years == 660 / 365.25


def test_a_treated_patient_without_doses_has_no_start_and_no_post_values():
    o = outcome(enrolled(baseline=27.0), egfr("r1", 25.0, "2014-03-01"), egfr("r2", 30.0, "2015-03-01"),
                dialysis(date(2016, 1, 1)))
    assert o.treatment_start is None
    assert (o.baseline_egfr, o.baseline_source) == (27.0, "enrollment")
    assert o.post_egfr is o.followup_years is o.egfr_slope is o.egfr_change is None
    assert o.kidney_failure and o.kidney_failure_years is None


def test_treatment_start_is_the_earliest_dose_whatever_the_order():
    o = outcome(enrolled(), dose(date(2014, 4, 7), cycle=2), dose(START), dose(date(2014, 3, 11), day=2))
    assert o.treatment_start == START
    assert o.pulse_cycles == 2


def test_slope_of_two_points_is_their_rise_over_run_in_years():
    o = outcome(enrolled(), dose(date(2014, 1, 1)), egfr("a", 30.0, "2015-01-01"), egfr("b", 32.0, "2016-01-01"))
    assert o.egfr_slope == pytest.approx(2.0 / (365 / 365.25), rel=1e-12)


def test_slope_is_least_squares_and_needs_two_points_after_start():
    start = date(2014, 1, 1)
    one = outcome(enrolled(), dose(start), egfr("pre", 20.0, "2013-12-01"), egfr("a", 30.0, "2015-01-01"))
    assert one.egfr_slope is None
    dates = ("2015-01-01", "2016-01-01", "2017-01-01")
    ys = [32.0, 34.0, 37.0]
    three = outcome(enrolled(), dose(start), *[egfr(f"r{k}", y, d) for k, (y, d) in enumerate(zip(ys, dates, strict=True))])
    xs = [365 / 365.25, 730 / 365.25, 1096 / 365.25]
    mx, my = sum(xs) / 3, sum(ys) / 3
    expected = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    assert three.egfr_slope == pytest.approx(expected, rel=1e-12)


def test_followup_years_are_calendar_days_over_365_25():
    o = outcome(enrolled(), dose(START), egfr("a", 30.0, "2015-01-01T23:59:00+00:00"), egfr("b", 38.0, "2020-11-30"))
    assert o.followup_years == (date(2020, 11, 30) - START).days / 365.25


def test_change_percent_and_40pct_decline():
    o = outcome(enrolled(baseline=50.0), dose(START), egfr("a", 30.0, "2016-01-01"))
    assert o.egfr_change == -20.0
    assert o.egfr_change_pct == -40.0
    assert o.decline_40pct is True
    assert outcome(enrolled(baseline=50.0), dose(START), egfr("a", 30.1, "2016-01-01")).decline_40pct is False
    assert outcome(enrolled(baseline=50.0), dose(START)).decline_40pct is None


def test_ties_on_collection_time_are_broken_by_result_id():
    events = [enrolled(), dose(START), egfr("r-b", 40.0, "2016-01-01"), egfr("r-a", 35.0, "2016-01-01")]
    assert outcome(*events).post_egfr == 40.0
    assert outcome(*reversed(events)).post_egfr == 40.0


def test_kidney_failure_is_the_first_of_dialysis_and_transplant():
    o = outcome(enrolled(), dose(START), transplant(date(2018, 3, 10)), dialysis(date(2017, 3, 10)),
                dialysis(date(2017, 9, 1)))
    assert o.kidney_failure is True
    assert o.kidney_failure_on == date(2017, 3, 10)
    assert o.kidney_failure_years == (date(2017, 3, 10) - START).days / 365.25
    assert outcome(enrolled(), dose(START)).kidney_failure is False


def test_counts_of_cycles_infusions_deviations_and_life_events():
    o = outcome(enrolled(), dose(START), dose(date(2014, 3, 11), day=2), dose(date(2014, 4, 7), cycle=2),
                infused("L1", date(2014, 6, 1)), infused("L2", date(2014, 8, 1), cells=3.1e7, number=2),
                deviation(START), died(date(2020, 1, 1)), withdrawn(date(2019, 1, 1)), withdrawn(date(2019, 6, 1)))
    assert (o.pulse_cycles, o.infusions, o.cells_infused, o.deviations) == (2, 2, 6.1e7, 1)
    assert (o.died_on, o.withdrawn_on) == (date(2020, 1, 1), date(2019, 1, 1))


def test_a_redelivered_event_is_recorded_once():
    events = [enrolled(), dose(START), dose(START), infused("L1", date(2014, 6, 1)), infused("L1", date(2014, 6, 1)),
              deviation(START), deviation(START)]
    o = outcome(*events)
    assert (o.pulse_cycles, o.infusions, o.cells_infused, o.deviations) == (1, 1, 3.0e7, 1)


def test_results_may_arrive_before_the_enrollment_and_the_first_dose():
    later = [egfr("post", 30.0, "2015-03-10"), egfr("pre", 26.0, "2014-03-09"), dose(START), enrolled()]
    o = outcome(*later)
    assert (o.baseline_egfr, o.post_egfr) == (26.0, 30.0)


def test_facts_without_enrollment_have_no_outcome():
    with pytest.raises(PatientNotEnrolled):
        compute_outcome(fold(SID, [dose(START)]))


def test_apply_ignores_other_events_and_refuses_another_patients():
    facts = PatientFacts(subject_id=SID)
    rejected = LabResultRejected(source="broker", reason="unknown LOINC", raw="{}")
    assert apply(facts, rejected) is facts
    with pytest.raises(ValueError, match="IGA-X"):
        apply(facts, enrolled(sid="IGA-X"))


def test_apply_does_not_change_its_input():
    facts = fold(SID, [enrolled()])
    apply(facts, egfr("r1", 30.0, "2015-01-01"))
    assert facts.egfr == {}


def test_naive_collection_times_are_read_as_utc():
    naive = EgfrComputed(result_id="n", subject_id=SID, egfr=30.0, collected_at=datetime(2015, 1, 1, 23, 0),
                         status="final", counted=True, source="mllp", derived_from="reported")
    facts = fold(SID, [enrolled(), dose(START), naive])
    assert facts.egfr["n"].collected_on == date(2015, 1, 1)


def test_facts_survive_a_json_round_trip():
    facts = fold(SID, [enrolled(), dose(START), egfr("r1", 30.0, "2015-01-01"), infused("L1", date(2014, 6, 1)),
                       deviation(START), dialysis(date(2019, 1, 1))])
    again = PatientFacts.model_validate_json(facts.model_dump_json())
    assert again == facts
    assert compute_outcome(again) == compute_outcome(facts)


def test_enrollment_fields_come_through():
    o = outcome(PatientEnrolled(subject_id=SID, sex="M", age_years=64, weight_kg=49.0, group="B",
                                enrolled_on=date(2010, 3, 8), lee_grade="V"))
    assert (o.group, o.sex, o.age_years, o.enrolled_on) == ("B", "M", 64, date(2010, 3, 8))
    assert o.baseline_egfr is None and o.baseline_source is None
