"""Properties: outcomes do not depend on arrival order; cohort numbers are plain means."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from outcome_events import SID, deviation, dialysis, died, dose, enrolled, infused, transplant, withdrawn

from contracts.labs import EgfrComputed
from services.outcomes.domain import PatientOutcome, compute_outcome, fold
from services.outcomes.statistics import all_cohorts, cohort_summary

DAY0 = date(2012, 1, 1)
days = st.integers(min_value=0, max_value=4000).map(lambda n: DAY0 + timedelta(days=n))
offsets = st.integers(min_value=-12, max_value=14).map(lambda h: timezone(timedelta(hours=h)))


@st.composite
def egfr_versions(draw, result_id: str) -> list[EgfrComputed]:
    """One result id's EgfrComputed events in labs stream order (first arrival, corrections)."""
    midnight = datetime.combine(draw(days), datetime.min.time(), draw(offsets))
    collected = midnight + timedelta(minutes=draw(st.integers(0, 1439)))
    statuses = draw(st.lists(st.sampled_from(["final", "corrected", "preliminary"]), min_size=1, max_size=3))
    return [
        EgfrComputed(result_id=result_id, subject_id=SID, egfr=draw(st.floats(5, 130)), collected_at=collected,
                     status=status, counted=status != "preliminary", source="broker", derived_from="reported")
        for status in statuses
    ]


@st.composite
def patient_events(draw) -> list:
    events = [enrolled(group=draw(st.sampled_from(["A", "B", "control"])), enrolled_on=draw(days),
                       baseline=draw(st.none() | st.floats(5, 130)))]
    events += [dose(d, cycle=c) for d, c in draw(st.lists(st.tuples(days, st.integers(1, 17)), max_size=6))]
    for n in range(draw(st.integers(0, 6))):
        events += draw(egfr_versions(f"r{n}"))
    for make in (dialysis, transplant, died, withdrawn, deviation):
        events += [make(d) for d in draw(st.lists(days, max_size=2))]
    events += [infused(f"L{n}", d, number=n + 1) for n, d in enumerate(draw(st.lists(days, max_size=4)))]
    return events


def interleave(events: list, order: list[int]) -> list:
    """``events`` in the order ``order`` — except that each result id's versions keep their
    stream order, which the adapter guarantees (it applies only newer stream versions)."""
    shuffled = [events[i] for i in order]
    versions: dict[str, list] = {}
    for e in events:
        if isinstance(e, EgfrComputed):
            versions.setdefault(e.result_id, []).append(e)
    return [versions[e.result_id].pop(0) if isinstance(e, EgfrComputed) else e for e in shuffled]


@st.composite
def shuffled_patient(draw) -> tuple[list, list]:
    events = draw(patient_events())
    order = draw(st.permutations(range(len(events))))
    return events, interleave(events, order)


@settings(max_examples=200, deadline=None)
@given(shuffled_patient())
def test_outcome_is_independent_of_arrival_order(pair):
    events, shuffled = pair
    facts, again = fold(SID, events), fold(SID, shuffled)
    assert again == facts
    assert compute_outcome(again) == compute_outcome(facts)


maybe = st.none() | st.floats(-50, 150)


@st.composite
def outcomes(draw) -> PatientOutcome:
    baseline, post = draw(maybe), draw(maybe)
    return PatientOutcome(
        subject_id=f"S{draw(st.integers(0, 10**6))}", group=draw(st.sampled_from(["A", "B", "control"])),
        sex=draw(st.sampled_from(["F", "M"])), age_years=draw(st.integers(18, 90)), enrolled_on=DAY0,
        treatment_start=DAY0, baseline_egfr=baseline, baseline_source=None, post_egfr=post, post_egfr_on=None,
        followup_years=draw(st.none() | st.floats(0, 20)), egfr_slope=draw(maybe), egfr_change=draw(maybe),
        egfr_change_pct=draw(maybe), decline_40pct=draw(st.none() | st.booleans()),
        kidney_failure=draw(st.booleans()), kidney_failure_on=None, kidney_failure_years=None,
        died_on=draw(st.none() | days), withdrawn_on=draw(st.none() | days), pulse_cycles=0, infusions=0,
        cells_infused=0.0, deviations=0, biopsies=0, counted_egfr_n=0,
    )


SUMMARISED = {"age": "age_years", "baseline_egfr": "baseline_egfr", "post_egfr": "post_egfr",
              "followup_years": "followup_years", "egfr_slope": "egfr_slope", "egfr_change": "egfr_change",
              "egfr_change_pct": "egfr_change_pct"}


@settings(max_examples=100, deadline=None)
@given(st.lists(outcomes(), max_size=12), st.sampled_from(["A", "B", "control"]))
def test_cohort_numbers_are_numpy_statistics_of_the_defined_values(patients, group):
    row = cohort_summary(patients, group)
    members = [o for o in patients if o.group == group]
    assert row["group"] == group and row["n"] == len(members)
    for stem, attribute in SUMMARISED.items():
        values = np.array([getattr(o, attribute) for o in members if getattr(o, attribute) is not None], dtype=float)
        if len(values) == 0:
            assert row[f"mean_{stem}"] is None and row[f"median_{stem}"] is None
        else:
            assert row[f"mean_{stem}"] == pytest.approx(np.mean(values), rel=1e-9, abs=1e-9)
            assert row[f"median_{stem}"] == pytest.approx(np.median(values), rel=1e-9, abs=1e-9)
        if len(values) < 2:
            assert row[f"sd_{stem}"] is None
        else:
            assert row[f"sd_{stem}"] == pytest.approx(np.std(values, ddof=1), rel=1e-7, abs=1e-7)
    assert row["kidney_failure_count"] == sum(o.kidney_failure for o in members)
    assert row["decline_40pct_count"] == sum(o.decline_40pct is True for o in members)
    assert row["deaths"] == sum(o.died_on is not None for o in members)
    assert row["withdrawals"] == sum(o.withdrawn_on is not None for o in members)
    assert row["n_with_post_egfr"] == sum(o.post_egfr is not None for o in members)


@settings(max_examples=50, deadline=None)
@given(st.lists(outcomes(), max_size=12).flatmap(lambda xs: st.tuples(st.just(xs), st.permutations(xs))))
def test_cohort_numbers_do_not_depend_on_patient_order(pair):
    patients, shuffled = pair
    assert all_cohorts(shuffled) == all_cohorts(patients)
