"""Properties: outcomes do not depend on arrival order; cohort numbers are plain means."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from uuid import uuid4

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from outcome_events import (
    SID,
    adverse_event,
    biopsy,
    deviation,
    dialysis,
    died,
    dose,
    enrolled,
    infused,
    transplant,
    withdrawn,
)

from contracts.enrollment import AdverseEventReported, AdverseEventUpdated
from contracts.labs import EgfrComputed, UrineResultMeasured
from services.outcomes.domain import EgfrPoint, PatientFacts, PatientOutcome, compute_outcome, fold, keep_counted
from services.outcomes.projector import ProjectedPatient
from services.outcomes.statistics import all_cohorts, cohort_summary
from services.outcomes.wire import Meta

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
def upcr_versions(draw, result_id: str) -> list[UrineResultMeasured]:
    """One urine result id's UrineResultMeasured events (UPCR, g/g) in labs stream order."""
    collected = datetime.combine(draw(days), datetime.min.time(), draw(offsets))
    statuses = draw(st.lists(st.sampled_from(["final", "corrected", "preliminary"]), min_size=1, max_size=3))
    return [
        UrineResultMeasured(result_id=result_id, subject_id=SID, analyte="upcr", value=draw(st.floats(0.01, 8)),
                            unit="g/g", loinc="2890-2", collected_at=collected, status=status,
                            counted=status != "preliminary", source="broker")
        for status in statuses
    ]


@st.composite
def ae_reports(draw, ae_id: str) -> list:
    """One adverse event's reports in the patient's stream order: the first, then follow-ups."""
    onset = draw(days)
    return [
        adverse_event(ae_id, draw(st.sampled_from(["insomnia", "pneumonia"])), onset, grade=draw(st.integers(1, 4)),
                      serious=draw(st.booleans()), related_to=draw(st.sampled_from([(), ("mp_pulse",)])),
                      causality=draw(st.sampled_from(["unrelated", "possible"])), follow_up=n > 0)
        for n in range(draw(st.integers(1, 3)))
    ]


findings = st.none() | st.booleans()


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
    for n in range(draw(st.integers(0, 4))):
        events += draw(upcr_versions(f"u{n}"))
    for n in range(draw(st.integers(0, 3))):
        events += draw(ae_reports(f"AE-{n}"))
    events += [biopsy(d, deposits=draw(findings), iga=draw(st.none() | st.sampled_from(["negative", "2+"])),
                      proliferation=draw(findings), foot=draw(findings),
                      lee=draw(st.none() | st.sampled_from(["II", "IV"])))
               for d in draw(st.lists(days, max_size=3, unique=True))]
    return events


def version_key(event: object) -> tuple[str, str] | None:
    """Events of which the newest version counts, by what identifies them; None for the others."""
    if isinstance(event, EgfrComputed | UrineResultMeasured):
        return type(event).__name__, event.result_id
    if isinstance(event, AdverseEventReported | AdverseEventUpdated):
        return "adverse_event", event.ae_id
    return None


def interleave(events: list, order: list[int]) -> list:
    """``events`` in the order ``order`` — except that each result id's (and AE's) versions keep
    their stream order, which the adapter guarantees (it applies only newer stream versions)."""
    shuffled = [events[i] for i in order]
    versions: dict[tuple[str, str], list] = {}
    for e in events:
        if (key := version_key(e)) is not None:
            versions.setdefault(key, []).append(e)
    return [versions[key].pop(0) if (key := version_key(e)) is not None else e for e in shuffled]


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


def stream_versions(events: list) -> list[int]:
    """Each event's version in its stream, as the services number them: per result id or AE in
    order (1, 2, …); the others 1 (the adapter guards only the versioned kinds)."""
    seen: dict[tuple[str, str], int] = {}
    numbered = []
    for e in events:
        key = version_key(e)
        if key is not None:
            seen[key] = seen.get(key, 0) + 1
        numbered.append(seen[key] if key is not None else 1)
    return numbered


@settings(max_examples=100, deadline=None)
@given(patient_events().flatmap(lambda events: st.tuples(st.just(events), st.permutations(range(len(events))))))
def test_a_projected_patient_keeps_the_newest_versions_whatever_the_order(pair):
    """In any order at all (an older version redelivered after a newer one included), the stream
    versions decide: the patient's row is the one the stream order gives."""
    events, order = pair
    versions = stream_versions(events)
    moment = datetime(2026, 1, 1, tzinfo=UTC)

    def projected(indices) -> ProjectedPatient:
        patient = ProjectedPatient.new(SID)
        for i in indices:
            meta = Meta(uuid4(), type(events[i]).__name__, "s", 1, versions[i], moment, moment)
            patient.apply(meta, events[i])
        return patient

    assert projected(order).row() == projected(range(len(events))).row()


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


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["r1", "r2", "r3", "r4", "r5"]), days,
                          st.integers(min_value=0, max_value=23), offsets, st.booleans()), max_size=40))
def test_counted_points_kept_between_batches_are_those_sorted_afresh(updates) -> None:
    """``keep_counted``, one result's new point at a time (a first point, a correction that moves
    it in time or stops it counting), leaves the list ``counted_points`` would sort afresh."""
    points: dict[str, EgfrPoint] = {}
    counted: list[EgfrPoint] = []
    for result_id, day, hour, offset, is_counted in updates:
        collected = datetime(day.year, day.month, day.day, hour, tzinfo=offset)
        new = EgfrPoint(result_id=result_id, egfr=40.0, collected_at=collected, status="final",
                        counted=is_counted, source="broker", derived_from="creatinine")
        keep_counted(counted, points.get(result_id), new)
        points[result_id] = new
        assert counted == PatientFacts(subject_id=SID, egfr=points).counted_points()
