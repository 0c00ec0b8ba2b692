"""Confirmed eGFR decline, the composite kidney endpoint, kidney failure with death competing,
and their group curves — worked by hand, then as properties of generated patients and groups."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, time, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.outcomes.endpoints import (
    KidneyCourse,
    TimeToEvent,
    composite_endpoint,
    confirmed_decline,
    cumulative_incidence_curve,
    kaplan_meier_curve,
    kidney_failure_competing,
)
from services.outcomes.measurements import Measurement, at_most_percent

START = date(2015, 1, 1)
Y = 365.25


def day(n: int) -> date:
    return START + timedelta(days=n)


def egfr(n: int, value: float, rid: str | None = None, at: time = time(8)) -> Measurement:
    """A counted eGFR collected on day ``n`` after treatment start (UTC)."""
    return Measurement(rid or f"r{n}-{at.hour}", value, datetime.combine(day(n), at, UTC))


def decline(*points: Measurement, baseline: float = 50.0, percent: int = 40) -> date | None:
    return confirmed_decline(baseline, START, points, percent)  # type: ignore[arg-type]


# --- confirmed decline (baseline 50: low means ≤ 30) ------------------------------------------

def test_a_low_value_confirmed_28_days_later_is_the_decline():
    assert decline(egfr(100, 30.0), egfr(128, 29.0)) == day(100)


def test_a_value_27_days_later_is_not_the_confirmation_the_next_one_from_day_28_is():
    assert decline(egfr(100, 30.0), egfr(127, 29.0), egfr(128, 29.5)) == day(100)
    # the confirmation (day 128) is high; day 127's own confirmation would be from day 155: none
    assert decline(egfr(100, 30.0), egfr(127, 29.0), egfr(128, 31.0)) is None
    assert decline(egfr(100, 30.0), egfr(127, 29.0)) is None


def test_a_single_low_value_at_the_end_is_not_confirmed():
    assert decline(egfr(100, 45.0), egfr(200, 40.0), egfr(300, 20.0)) is None


def test_a_low_value_refuted_by_its_confirmation_then_a_later_confirmed_one():
    assert decline(egfr(100, 28.0), egfr(130, 40.0), egfr(200, 29.0), egfr(228, 30.0)) == day(200)


def test_only_values_after_treatment_start_count():
    assert decline(egfr(-30, 20.0), egfr(0, 20.0), egfr(28, 20.0)) is None
    assert decline(egfr(0, 20.0), egfr(1, 20.0), egfr(29, 20.0)) == day(1)


def test_boundaries_are_the_written_percentages():
    # 0.6 × 12.0 is 7.199999999999999 in floating point: 7.2 must still count as 60 %
    assert confirmed_decline(12.0, START, [egfr(10, 7.2), egfr(40, 7.2)]) == day(10)
    assert confirmed_decline(12.0, START, [egfr(10, 7.2), egfr(40, 7.21)]) is None
    assert decline(egfr(10, 21.5), egfr(40, 21.5), percent=57) == day(10)
    assert decline(egfr(10, 21.5), egfr(40, 21.6), percent=57) is None
    assert decline(egfr(10, 25.0), egfr(40, 25.0), percent=57) is None


def test_order_within_a_day_is_collection_time_then_result_id():
    # the first of day 128 confirms: at 08:00 it is high, so day 100 is not confirmed
    assert decline(egfr(100, 29.0), egfr(128, 45.0, at=time(8)), egfr(128, 29.0, at=time(9))) is None
    assert decline(egfr(100, 29.0), egfr(128, 29.0, at=time(8)), egfr(128, 45.0, at=time(9))) == day(100)
    # same collection time: result id "a" comes before "b", whatever order they are given in
    tied = [egfr(128, 45.0, rid="b"), egfr(128, 29.0, rid="a"), egfr(100, 29.0)]
    assert decline(*tied) == decline(*reversed(tied)) == day(100)


def test_the_day_is_the_utc_calendar_date():
    late = Measurement("x", 29.0, datetime(2015, 4, 10, 23, 30, tzinfo=UTC))  # day 99
    next_utc_day = Measurement("y", 29.0, datetime(2015, 5, 8, 0, 30, tzinfo=UTC))  # day 127: 28 days later
    assert decline(late, next_utc_day) == day(99)


def test_no_baseline_or_no_start_means_no_decline():
    assert confirmed_decline(None, START, [egfr(10, 1.0), egfr(40, 1.0)]) is None
    assert confirmed_decline(50.0, None, [egfr(10, 1.0), egfr(40, 1.0)]) is None


# --- composite endpoint and kidney failure with death competing -------------------------------

def course(*points: Measurement, failure: int | None = None, death: int | None = None,
           start: date | None = START, baseline: float | None = 50.0) -> KidneyCourse:
    return KidneyCourse(start, baseline, points, None if failure is None else day(failure),
                        None if death is None else day(death))


def test_composite_is_the_earliest_endpoint():
    low = (egfr(100, 25.0), egfr(200, 25.0), egfr(400, 20.0))
    assert composite_endpoint(course(*low, failure=300, death=500)) == TimeToEvent(100, "decline_40")
    assert composite_endpoint(course(*low, failure=50, death=500)) == TimeToEvent(50, "kidney_failure")
    assert composite_endpoint(course(*low, death=60)) == TimeToEvent(60, "death")
    result = composite_endpoint(course(*low))
    assert (result.years, result.observed, result.cnsr) == (100 / Y, True, 0)


def test_composite_is_censored_at_the_latest_counted_egfr_after_start():
    result = composite_endpoint(course(egfr(-5, 20.0), egfr(100, 45.0), egfr(700, 44.0)))
    assert result == TimeToEvent(700, None)
    assert (result.years, result.observed, result.cnsr) == (700 / Y, False, 1)
    assert composite_endpoint(course(egfr(-5, 20.0))) == TimeToEvent(0, None)
    # an unconfirmed low value is no event
    assert composite_endpoint(course(egfr(100, 45.0), egfr(700, 20.0))) == TimeToEvent(700, None)


def test_same_day_endpoints_name_kidney_failure_then_death():
    low = (egfr(100, 25.0), egfr(200, 25.0))
    assert composite_endpoint(course(*low, failure=100, death=100)).event == "kidney_failure"
    assert composite_endpoint(course(*low, death=100)).event == "death"
    assert composite_endpoint(course(failure=0)) == TimeToEvent(0, "kidney_failure")


def test_patients_never_at_risk_are_left_out():
    assert composite_endpoint(course(failure=-1)) is None
    assert composite_endpoint(course(death=-1)) is None
    assert composite_endpoint(course(egfr(10, 40.0), start=None)) is None
    assert kidney_failure_competing(course(failure=-1, death=200)) is None
    # without a baseline there is no decline, but the other endpoints still count
    assert composite_endpoint(course(egfr(10, 5.0), egfr(40, 5.0), baseline=None, death=90)) == TimeToEvent(90, "death")


def test_kidney_failure_with_death_competing():
    assert kidney_failure_competing(course(egfr(50, 40.0), failure=300, death=400)) \
        == TimeToEvent(300, "kidney_failure")
    assert kidney_failure_competing(course(failure=400, death=300)) == TimeToEvent(300, "death")
    assert kidney_failure_competing(course(failure=300, death=300)).competing_state == 1
    assert kidney_failure_competing(course(failure=400, death=300)).competing_state == 2
    # a confirmed decline is not an event here: censored as the composite, at the latest eGFR
    censored = kidney_failure_competing(course(egfr(100, 20.0), egfr(200, 20.0), egfr(500, 20.0)))
    assert (censored, censored.competing_state) == (TimeToEvent(500, None), 0)


# --- group curves -----------------------------------------------------------------------------

def test_kaplan_meier_curve_worked_by_hand():
    times = [TimeToEvent(100, "death"), TimeToEvent(200, None), TimeToEvent(200, "decline_40"),
             TimeToEvent(300, "kidney_failure"), None]
    assert kaplan_meier_curve(times) == {
        "times": [100 / Y, 200 / Y, 300 / Y],
        "survival": pytest.approx([3 / 4, 3 / 4 * 2 / 3, 0.0]),
        "at_risk": [4, 3, 1],
        "events": [1, 1, 1],
    }


def test_kaplan_meier_curve_has_a_time_0_row_only_for_a_patient_at_time_0():
    curve = kaplan_meier_curve([TimeToEvent(0, None), TimeToEvent(0, "death"), TimeToEvent(10, None)])
    assert curve == {"times": [0.0, 10 / Y], "survival": pytest.approx([2 / 3, 2 / 3]), "at_risk": [3, 1],
                     "events": [1, 0]}


def test_empty_groups_have_empty_curves():
    assert kaplan_meier_curve([]) == {"times": [], "survival": [], "at_risk": [], "events": []}
    assert kaplan_meier_curve([None]) == kaplan_meier_curve([])
    assert cumulative_incidence_curve([None]) == {"times": [], "cumulative_incidence": [], "at_risk": [],
                                                  "events": []}


def test_cumulative_incidence_worked_by_hand_with_ties():
    times = [TimeToEvent(100, "kidney_failure"), TimeToEvent(100, "kidney_failure"), TimeToEvent(100, "death"),
             TimeToEvent(200, None), TimeToEvent(300, "kidney_failure")]
    # day 100: 5 at risk, 2 failures, 1 death: CIF 2/5, S 2/5; day 200: censoring only;
    # day 300: 1 at risk, 1 failure: CIF 2/5 + 2/5 · 1/1
    assert cumulative_incidence_curve(times) == {
        "times": [100 / Y, 200 / Y, 300 / Y],
        "cumulative_incidence": pytest.approx([0.4, 0.4, 0.8]),
        "at_risk": [5, 2, 1],
        "events": [2, 0, 1],
    }


def test_cumulative_incidence_agrees_with_lifelines_without_ties():
    from lifelines import AalenJohansenFitter

    kinds = [None, "kidney_failure", "death"]
    times = [TimeToEvent(days, kinds[(days * 7) % 3]) for days in range(30, 3000, 97)]  # type: ignore[arg-type]
    ours = cumulative_incidence_curve(times)
    ajf = AalenJohansenFitter(calculate_variance=False).fit(
        [t.years for t in times], [t.competing_state for t in times], event_of_interest=1)
    theirs = ajf.cumulative_density_.iloc[:, 0]
    assert sum(ours["events"]) == 10
    assert ours["cumulative_incidence"] == pytest.approx([float(theirs.loc[t]) for t in ours["times"]], abs=1e-12)


# --- properties -------------------------------------------------------------------------------

measurements = st.lists(
    st.builds(
        lambda n, minute, value: Measurement(f"r{n}-{minute}", value,
                                             datetime.combine(START, datetime.min.time(), UTC)
                                             + timedelta(days=n, minutes=minute)),
        st.integers(-60, 400), st.integers(0, 1439), st.floats(5, 80).map(lambda v: round(v, 1))),
    max_size=12, unique_by=lambda m: m.result_id)
baselines = st.floats(10, 80).map(lambda v: round(v, 1))
optional_day = st.none() | st.integers(-30, 400).map(lambda n: START + timedelta(days=n))


@given(measurements, baselines, st.randoms(use_true_random=False))
def test_a_confirmed_decline_is_a_low_value_after_start_whatever_the_order(points, baseline, rnd):
    found = confirmed_decline(baseline, START, points, 40)
    assert found == confirmed_decline(baseline, START, rnd.sample(points, len(points)), 40)
    if found is not None:
        assert found > START
        assert any(m.collected_on == found and at_most_percent(m.value, baseline, 60) for m in points)
        assert any((m.collected_on - found).days >= 28 for m in points)


@given(measurements, baselines)
def test_a_57_percent_decline_is_also_a_40_percent_decline_no_earlier(points, baseline):
    steep = confirmed_decline(baseline, START, points, 57)
    if steep is not None:
        assert confirmed_decline(baseline, START, points, 40) <= steep


@given(measurements, baselines, optional_day, optional_day)
def test_the_composite_comes_no_later_than_kidney_failure_or_death(points, baseline, failure, death):
    course = KidneyCourse(START, baseline, tuple(points), failure, death)
    composite, competing = composite_endpoint(course), kidney_failure_competing(course)
    assert (composite is None) == (competing is None)
    if composite is None:
        return
    assert composite.days >= 0
    if competing.observed:
        assert composite.observed and composite.days <= competing.days
    if not composite.observed:
        assert composite == competing


time_groups = st.lists(
    st.builds(TimeToEvent, st.integers(0, 40), st.sampled_from([None, "decline_40", "kidney_failure", "death"])),
    max_size=30)


@settings(deadline=None)  # the first call imports lifelines
@given(time_groups)
def test_kaplan_meier_survival_falls_from_at_most_one_and_counts_every_patient(group):
    curve = kaplan_meier_curve(group)
    assert curve["times"] == sorted(set(curve["times"]))
    assert all(0 <= s <= 1 for s in curve["survival"])
    assert all(a >= b for a, b in itertools.pairwise(curve["survival"]))
    assert all(a >= b for a, b in itertools.pairwise(curve["at_risk"]))
    assert curve["at_risk"][:1] == ([len(group)] if group else [])
    assert sum(curve["events"]) == sum(t.observed for t in group)


@settings(deadline=None)
@given(time_groups, st.randoms(use_true_random=False))
def test_aalen_johansen_incidence_rises_and_stays_within_one_minus_survival(group, rnd):
    incidence = cumulative_incidence_curve(group)
    competing = cumulative_incidence_curve(group, "death")
    declines = cumulative_incidence_curve(group, "decline_40")
    survival = kaplan_meier_curve(group)
    assert incidence["times"] == survival["times"] and incidence["at_risk"] == survival["at_risk"]
    cif = incidence["cumulative_incidence"]
    assert all(0 <= a <= b for a, b in itertools.pairwise(cif))
    for i, s in enumerate(survival["survival"]):
        assert cif[i] <= 1 - s + 1e-12
        # every patient is event-free, or had one of the three events: the incidences add up
        assert cif[i] + competing["cumulative_incidence"][i] + declines["cumulative_incidence"][i] \
            == pytest.approx(1 - s, abs=1e-12)
    assert cumulative_incidence_curve(rnd.sample(group, len(group))) == incidence
