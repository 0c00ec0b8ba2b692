"""Proteinuria remission, paired biopsies, adverse events and the cohort row's v2 keys — by hand."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.outcomes.endpoints import TimeToEvent
from services.outcomes.evidence import (
    AdverseEventReport,
    Biopsy,
    BiopsyChanges,
    PatientEvidence,
    PatientSafety,
    Proteinuria,
    biopsy_changes,
    biopsy_summary,
    cohort_evidence,
    paired_biopsies,
    patient_safety,
    proteinuria,
    safety_summary,
)
from services.outcomes.measurements import Measurement

START = date(2015, 1, 1)


def day(n: int) -> date:
    return START + timedelta(days=n)


def upcr(n: int, value: float, rid: str | None = None) -> Measurement:
    return Measurement(rid or f"u{n}", value, datetime.combine(day(n), time(8), UTC))


# --- proteinuria ------------------------------------------------------------------------------

def test_baseline_is_the_latest_on_or_before_start_and_post_the_latest_after():
    result = proteinuria(START, [upcr(-40, 9.0), upcr(0, 2.0), upcr(30, 1.5), upcr(400, 0.8)])
    assert result == Proteinuria(2.0, 0.8, (0.8 - 2.0) / 2.0 * 100, False, True)


def test_remission_boundaries():
    def remission(post: float, baseline: float | None = 2.0) -> tuple[bool | None, bool | None]:
        points = [upcr(90, post)] + ([] if baseline is None else [upcr(0, baseline)])
        result = proteinuria(START, points)
        return result.complete_remission, result.partial_remission

    assert remission(0.3) == (False, True)  # 0.3 exactly is not complete
    assert remission(0.29) == (True, False)  # complete is never also partial
    assert remission(1.0) == (False, False)  # 1.0 exactly is not partial
    assert remission(0.99) == (False, True)
    assert remission(0.5, baseline=1.0) == (False, True)  # exactly 50 % of baseline is partial
    assert remission(0.5, baseline=0.99) == (False, False)
    assert remission(0.7, baseline=1.4) == (False, True)


def test_undefined_pieces_stay_none():
    assert proteinuria(START, []) == Proteinuria(None, None, None, None, None)
    assert proteinuria(START, [upcr(-1, 3.0)]) == Proteinuria(3.0, None, None, None, None)
    # no baseline: complete remission still decided, partial only when it already fails otherwise
    assert proteinuria(START, [upcr(10, 0.5)]) == Proteinuria(None, 0.5, None, False, None)
    assert proteinuria(START, [upcr(10, 0.2)]) == Proteinuria(None, 0.2, None, True, False)
    assert proteinuria(START, [upcr(10, 1.2)]) == Proteinuria(None, 1.2, None, False, False)
    assert proteinuria(None, [upcr(10, 0.2)]) == Proteinuria(None, None, None, None, None)


def test_a_zero_baseline_has_no_change_percentage():
    assert proteinuria(START, [upcr(0, 0.0), upcr(10, 0.5)]) == Proteinuria(0.0, 0.5, None, False, False)


# --- biopsies ---------------------------------------------------------------------------------

DIAGNOSTIC = Biopsy(day(-20), mesangial_deposits=True, iga_immunofluorescence="2+", mesangial_proliferation=True,
                    foot_process_effacement=True, lee_grade="IV")


def test_every_change_from_the_diagnostic_to_the_follow_up_biopsy():
    follow_up = Biopsy(day(400), mesangial_deposits=False, iga_immunofluorescence="negative",
                       mesangial_proliferation=False, foot_process_effacement=False, lee_grade="II")
    assert biopsy_changes(START, [follow_up, DIAGNOSTIC]) == BiopsyChanges(True, True, True, True, True)
    unchanged = Biopsy(day(400), mesangial_deposits=True, iga_immunofluorescence="trace",
                       mesangial_proliferation=True, foot_process_effacement=True, lee_grade="IV")
    assert biopsy_changes(START, [DIAGNOSTIC, unchanged]) == BiopsyChanges(False, False, False, False, False)


def test_a_missing_finding_is_not_a_change():
    assert biopsy_changes(START, [DIAGNOSTIC, Biopsy(day(400))]) == BiopsyChanges(False, False, False, False, False)
    assert biopsy_changes(START, [Biopsy(day(-1)), Biopsy(day(400), mesangial_deposits=False,
                                                           iga_immunofluorescence="negative", lee_grade="I")]) \
        == BiopsyChanges(False, False, False, False, False)
    negative_before = Biopsy(day(-1), iga_immunofluorescence="negative", lee_grade="II")
    worse = Biopsy(day(400), iga_immunofluorescence="negative", lee_grade="III")
    assert biopsy_changes(START, [negative_before, worse]) == BiopsyChanges(False, False, False, False, False)


def test_pairing_takes_the_latest_on_or_before_start_and_the_latest_after():
    on_start = Biopsy(START, lee_grade="V")
    early, late = Biopsy(day(100), lee_grade="II"), Biopsy(day(700), lee_grade="III")
    assert paired_biopsies(START, [late, DIAGNOSTIC, early, on_start]) == (on_start, late)
    assert paired_biopsies(START, [DIAGNOSTIC]) is None
    assert paired_biopsies(START, [early]) is None
    assert paired_biopsies(None, [DIAGNOSTIC, early]) is None
    assert biopsy_changes(START, [early, late]) is None


def test_same_day_biopsies_the_fuller_report_is_the_latest_whatever_the_order():
    partial = Biopsy(day(400), lee_grade="IV")
    full = Biopsy(day(400), mesangial_deposits=False, lee_grade="IV")
    assert paired_biopsies(START, [DIAGNOSTIC, full, partial])[1] == full
    assert paired_biopsies(START, [partial, DIAGNOSTIC, full])[1] == full
    one, other = Biopsy(day(400), lee_grade="II"), Biopsy(day(400), lee_grade="III")
    assert paired_biopsies(START, [DIAGNOSTIC, one, other]) == paired_biopsies(START, [other, DIAGNOSTIC, one])


def test_biopsy_summary_has_exactly_the_contract_keys():
    changes = [BiopsyChanges(True, True, False, True, True), None, BiopsyChanges(True, False, False, True, False)]
    assert biopsy_summary(changes) == {"paired": 2, "deposits_cleared": 2, "iga_cleared": 1,
                                       "proliferation_resolved": 0, "foot_process_improved": 2,
                                       "lee_grade_improved": 1}
    assert set(biopsy_summary([]).values()) == {0}


# --- adverse events ---------------------------------------------------------------------------

def ae(ae_id: str, grade: int = 1, serious: bool = False, causality: str = "unrelated",
       related_to: tuple[str, ...] = (), term: str = "hyperglycaemia") -> AdverseEventReport:
    return AdverseEventReport(ae_id, term, grade, serious, causality, related_to)  # type: ignore[arg-type]


def test_treatment_related_and_significant():
    assert ae("a", causality="possible", related_to=("mp_pulse",)).treatment_related
    assert ae("a", causality="definite", related_to=("cell_infusion",)).treatment_related
    assert not ae("a", causality="unlikely", related_to=("mp_pulse",)).treatment_related
    assert not ae("a", causality="probable").treatment_related  # no intervention named
    assert ae("a", grade=3).significant and ae("a", grade=1, serious=True).significant
    assert not ae("a", grade=2).significant


def test_patient_safety_reads_each_adverse_event_s_latest_report():
    reports = [ae("a", grade=3, serious=True, causality="probable", related_to=("mp_pulse",)),
               ae("b", grade=2),
               ae("a", grade=2, causality="unlikely", related_to=("mp_pulse",))]  # follow-up of "a"
    assert patient_safety(reports) == PatientSafety(2, 2, False, False)
    assert patient_safety(reports[:2]) == PatientSafety(2, 3, True, True)
    assert patient_safety([]) == PatientSafety(0, None, False, False)


def test_safety_summary_worked_by_hand():
    first = [ae("a", grade=3, causality="probable", related_to=("mp_pulse",)),
             ae("b", grade=1, term="headache")]
    second = [ae("c", grade=2, serious=True, causality="possible", related_to=("mp_pulse", "cell_infusion")),
              ae("d", grade=1), ae("d", grade=5, serious=True)]
    assert safety_summary([first, second, []]) == {
        "patients": 3,
        "patients_with_ae": 2,
        "patients_with_serious_ae": 1,
        "patients_with_significant_related_ae": 2,
        "events": 4,
        "serious": 2,
        "related": 2,
        "significant_related": 2,
        "by_grade": {"1": 1, "2": 1, "3": 1, "4": 0, "5": 1},
        "related_by_intervention": {"mp_pulse": 2, "cell_infusion": 1, "fat_harvest": 0},
        "by_term": [
            {"term": "headache", "events": 1, "patients": 1, "max_grade": 1, "serious": 0, "related": 0,
             "significant_related": 0},
            {"term": "hyperglycaemia", "events": 3, "patients": 2, "max_grade": 5, "serious": 2, "related": 2,
             "significant_related": 2},
        ],
    }
    assert safety_summary([])["by_term"] == [] and safety_summary([])["patients"] == 0


# --- cohort row -------------------------------------------------------------------------------

def test_cohort_evidence_means_over_defined_values_and_counts_patients():
    none_yet = PatientSafety(0, None, False, False)
    patients = [
        PatientEvidence(Proteinuria(2.0, 0.2, -90.0, True, False), day(100), TimeToEvent(100, "decline_40"),
                        PatientSafety(2, 3, True, True)),
        PatientEvidence(Proteinuria(1.0, 0.5, -50.0, False, True), None, TimeToEvent(300, None),
                        PatientSafety(1, 1, False, False)),
        PatientEvidence(Proteinuria(None, 0.9, None, False, None), None, TimeToEvent(50, "death"), none_yet),
        PatientEvidence(Proteinuria(None, None, None, None, None), None, None, none_yet),
    ]
    assert cohort_evidence(patients) == {
        "mean_baseline_upcr": 1.5,
        "mean_post_upcr": pytest.approx((0.2 + 0.5 + 0.9) / 3),
        "complete_remission_count": 1,
        "partial_remission_count": 1,
        "decline_40_count": 1,
        "composite_endpoint_count": 2,
        "patients_with_ae": 2,
        "patients_with_serious_ae": 1,
        "patients_with_significant_related_ae": 1,
    }
    assert cohort_evidence([])["mean_post_upcr"] is None


# --- properties -------------------------------------------------------------------------------

upcrs = st.lists(st.builds(upcr, st.integers(-100, 500), st.floats(0, 5).map(lambda v: round(v, 2)),
                           st.uuids().map(str)), max_size=8)


@given(upcrs, st.randoms(use_true_random=False))
def test_remissions_exclude_each_other_and_do_not_depend_on_order(points, rnd):
    result = proteinuria(START, points)
    assert result == proteinuria(START, rnd.sample(points, len(points)))
    assert not (result.complete_remission and result.partial_remission)
    if result.partial_remission:
        assert result.post_upcr < 1.0 and result.baseline_upcr is not None
        assert result.post_upcr <= result.baseline_upcr / 2 + 1e-12
    if result.complete_remission is None:
        assert result.post_upcr is None and result.partial_remission is None


findings = st.builds(
    Biopsy, st.integers(-10, 10).map(day), st.none() | st.booleans(),
    st.none() | st.sampled_from(["negative", "trace", "1+", "2+", "3+"]), st.none() | st.booleans(),
    st.none() | st.booleans(), st.none() | st.sampled_from(["I", "II", "III", "IV", "V"]))


@given(st.lists(findings, max_size=6), st.randoms(use_true_random=False))
def test_pairing_does_not_depend_on_the_order_biopsies_come_in(biopsies, rnd):
    pair = paired_biopsies(START, biopsies)
    assert pair == paired_biopsies(START, rnd.sample(biopsies, len(biopsies)))
    if pair is not None:
        assert pair[0].performed_on <= START < pair[1].performed_on
