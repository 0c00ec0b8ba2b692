"""The demo seed, folded through the outcome domain in memory, reproduces the abstract."""

from __future__ import annotations

from datetime import date, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.cells import CellsInfused
from contracts.enrollment import (
    AdverseEventReported,
    AdverseEventUpdated,
    BiopsyRecorded,
    DialysisStarted,
    KidneyTransplanted,
    PatientDied,
    PatientEnrolled,
    PatientWithdrawn,
)
from contracts.labs import EgfrComputed, UrineResultMeasured
from contracts.pulse import PulseDoseAdministered
from nephrotrack.seed import (
    ABSTRACT,
    CREATININE_UMOL_PER_MG_DL,
    EXPECTED_BIOPSIES,
    EXPECTED_COHORTS,
    GROUP_A_MEAN_FOLLOWUP_YEARS,
    GROUP_B_MEAN_FOLLOWUP_YEARS,
    MG_PER_MMOL_PER_G_PER_G,
    SEED,
    SeedPatient,
    build_seed,
    creatinine_for_egfr,
    daily_dose_mg,
)
from services.labs.egfr import age_on, ckd_epi_2021
from services.outcomes.domain import PatientOutcome, compute_outcome, fold
from services.outcomes.group_evidence import biopsies
from services.outcomes.statistics import all_cohorts

CLINICAL = {"dialysis_started": DialysisStarted, "kidney_transplant": KidneyTransplanted,
            "death": PatientDied, "withdrawn": PatientWithdrawn}
CONTRACT_KEYS = ("group", "n", "mean_age", "mean_baseline_egfr", "mean_post_egfr", "mean_followup_years",
                 "mean_egfr_slope", "kidney_failure_count")
V2_KEYS = ("mean_baseline_upcr", "mean_post_upcr", "complete_remission_count", "partial_remission_count",
           "decline_40_count", "composite_endpoint_count", "patients_with_ae", "patients_with_serious_ae",
           "patients_with_significant_related_ae")
UPCR_IN_G_PER_G = {"g/g": 1.0, "mg/g": 1000.0, "mg/mmol": MG_PER_MMOL_PER_G_PER_G}


def lab_egfr(message: dict, enrolled: PatientEnrolled) -> EgfrComputed:
    """What labs publishes for a result: reported eGFR as is, creatinine through CKD-EPI 2021
    at the contract age on the collection date."""
    collected_at = datetime.fromisoformat(message["collected_at"].replace("Z", "+00:00"))
    derived_from, egfr = "reported", message["value"]
    if message["loinc"] in ("2160-0", "14682-9"):
        mg_dl = message["value"] / (CREATININE_UMOL_PER_MG_DL if message["loinc"] == "14682-9" else 1.0)
        age = age_on(enrolled.age_years, enrolled.enrolled_on, collected_at.date())
        derived_from, egfr = "creatinine", ckd_epi_2021(mg_dl, age, enrolled.sex)
    return EgfrComputed(result_id=message["result_id"], subject_id=message["subject_id"], egfr=egfr,
                        collected_at=collected_at, status=message["status"],
                        counted=message["status"] != "preliminary", source="broker", derived_from=derived_from)


def urine_measured(message: dict) -> UrineResultMeasured:
    """What labs publishes for a UPCR result: the value in g/g, whatever unit the lab sent."""
    return UrineResultMeasured(
        result_id=message["result_id"], subject_id=message["subject_id"], analyte="upcr",
        value=message["value"] / UPCR_IN_G_PER_G[message["unit"]], unit="g/g", loinc=message["loinc"],
        collected_at=datetime.fromisoformat(message["collected_at"].replace("Z", "+00:00")),
        status=message["status"], counted=message["status"] != "preliminary", source="broker")


def adverse_event_reports(patient: SeedPatient) -> list:
    """The first report of each AE id as reported, every later one as its follow-up."""
    reported: set[str] = set()
    events = []
    for ae_id, body in patient.adverse_events:
        model = AdverseEventUpdated if ae_id in reported else AdverseEventReported
        events.append(model(subject_id=patient.subject_id, ae_id=ae_id, **body))
        reported.add(ae_id)
    return events


def domain_events(patient: SeedPatient) -> list:
    sid = patient.subject_id
    enrolled = PatientEnrolled.model_validate(patient.enrollment)
    events: list = [enrolled]
    events += [PulseDoseAdministered(subject_id=sid, mg_per_kg=d["dose_mg"] / d["weight_kg"], **d)
               for d in patient.pulse_doses]
    events += [CellsInfused(subject_id=sid, lot_id=f"LOT-{sid}-{n}", infusion_number=n, **infusion)
               for n, (_, _, infusion) in enumerate(patient.harvests, start=1)]
    events += [CLINICAL[e["type"]](subject_id=sid, on=e["on"]) for e in patient.clinical_events]
    events += [lab_egfr(m, enrolled) for m in patient.lab_results]
    events += [urine_measured(m) for m in patient.urine_results]
    events += [BiopsyRecorded(subject_id=sid, **b) for b in patient.biopsies]
    events += adverse_event_reports(patient)
    return events


@pytest.fixture(scope="module")
def outcomes() -> list[PatientOutcome]:
    return [compute_outcome(fold(p.subject_id, domain_events(p))) for p in SEED]


@pytest.fixture(scope="module")
def cohorts(outcomes) -> dict[str, dict]:
    return {row["group"]: row for row in all_cohorts(outcomes)}


def test_the_abstract_is_reproduced(cohorts):
    a, b = cohorts["A"], cohorts["B"]
    assert (a["n"], a["mean_age"], round(a["mean_baseline_egfr"]), round(a["mean_post_egfr"])) == (7, 60.0, 28, 39)
    assert round(a["mean_followup_years"], 1) == 6.8
    assert (b["n"], b["mean_age"], round(b["mean_baseline_egfr"]), round(b["mean_post_egfr"])) == (3, 25.0, 85, 106)
    assert round(b["mean_followup_years"], 1) == 9.3
    for group in ("A", "B"):
        for key, value in ABSTRACT[group].items():
            digits = 1 if key == "mean_followup_years" else 0
            assert round(cohorts[group][key], digits) == value


def test_published_means_are_exact_and_follow_up_as_close_as_whole_days_allow(cohorts):
    assert (cohorts["A"]["mean_baseline_egfr"], cohorts["A"]["mean_post_egfr"]) == (28.0, 39.0)
    assert (cohorts["B"]["mean_baseline_egfr"], cohorts["B"]["mean_post_egfr"]) == (85.0, 106.0)
    assert cohorts["A"]["mean_followup_years"] == pytest.approx(GROUP_A_MEAN_FOLLOWUP_YEARS, abs=1e-12)
    assert cohorts["B"]["mean_followup_years"] == pytest.approx(GROUP_B_MEAN_FOLLOWUP_YEARS, abs=1e-12)
    # One day more or less would move the mean further from the published value.
    for days, n, published in ((17386, 7, 6.8), (10190, 3, 9.3)):
        error = abs(days / (n * 365.25) - published)
        assert error < abs((days + 1) / (n * 365.25) - published)
        assert error < abs((days - 1) / (n * 365.25) - published)


def test_computed_cohorts_match_the_seed_expectations(cohorts):
    for group, expected in EXPECTED_COHORTS.items():
        row = cohorts[group]
        assert tuple(expected) == CONTRACT_KEYS + V2_KEYS
        approximate = ("mean_egfr_slope", "mean_baseline_upcr", "mean_post_upcr")  # unit conversions: float noise
        assert {k: row[k] for k in expected if k not in approximate} == \
            {k: v for k, v in expected.items() if k not in approximate}
        for key in approximate:
            assert row[key] == pytest.approx(expected[key], rel=1e-9), (group, key)


def test_control_starts_dialysis_within_two_years_of_a_baseline_of_33(outcomes, cohorts):
    (control,) = [o for o in outcomes if o.group == "control"]
    assert control.treatment_start == control.enrolled_on
    assert control.baseline_egfr == 33.0 == ABSTRACT["control"]["baseline_egfr"]
    assert control.kidney_failure and control.kidney_failure_years < ABSTRACT["control"]["dialysis_within_years"]
    assert control.egfr_slope < 0
    assert cohorts["control"]["kidney_failure_count"] == 1


def test_every_treated_patient_follows_the_protocol(outcomes):
    treated = [o for o in outcomes if o.group != "control"]
    assert len(treated) == 10
    for o in treated:
        assert 3 <= o.pulse_cycles <= 17
        assert 2 <= o.infusions <= 4
        assert o.cells_infused / o.infusions == pytest.approx(3e7, rel=0.05)
        assert o.baseline_source == "lab"
        assert not o.kidney_failure


def test_doses_are_within_the_protocol_so_no_deviation_is_intended():
    for patient in SEED:
        by_cycle: dict[int, list[date]] = {}
        for d in patient.pulse_doses:
            assert d["dose_mg"] <= 1000 and 20 <= d["dose_mg"] / d["weight_kg"] <= 30
            assert d["dose_mg"] == daily_dose_mg(d["weight_kg"])
            by_cycle.setdefault(d["cycle"], []).append(date.fromisoformat(d["given_on"]))
        for days in by_cycle.values():
            assert [(x - days[0]).days for x in days] == [0, 1, 2]
        assert all(harvest["harvested_on"] < infusion["given_on"] and release["viability_pct"] >= 85
                   and release["cell_count"] >= infusion["cell_count"]
                   for harvest, release, infusion in patient.harvests)


def test_enrollment_matches_eligibility_and_the_pre_treatment_result(outcomes):
    for patient, outcome in zip(SEED, outcomes, strict=True):
        body = patient.enrollment
        assert date(2009, 1, 1) <= date.fromisoformat(body["enrolled_on"]) <= date(2016, 12, 31)
        if body["group"] == "A":
            assert body["baseline_egfr"] < 45
        if body["group"] == "B":
            assert body["lee_grade"] in ("IV", "V")
        assert body["baseline_egfr"] == outcome.baseline_egfr


def test_lab_messages_are_well_formed_and_cover_every_case():
    messages = [m for p in SEED for m in p.lab_results]
    assert len({m["message_id"] for m in messages}) == len(messages)
    assert all(m["collected_at"].endswith("Z") and m["collected_at"] < "2026-11-01" for m in messages)
    assert {m["loinc"] for m in messages} == {"98979-8", "2160-0", "14682-9"}
    statuses = [m["status"] for m in messages]
    assert statuses.count("corrected") == 1 and statuses.count("preliminary") == 1
    (corrected,) = [m for m in messages if m["status"] == "corrected"]
    replaced = [m for m in messages if m["result_id"] == corrected["result_id"]]
    assert [m["status"] for m in replaced] == ["final", "corrected"]
    all_dates = [e["on"] for p in SEED for e in p.clinical_events] + \
        [x["given_on"] for p in SEED for x in p.pulse_doses] + \
        [i["given_on"] for p in SEED for _, _, i in p.harvests]
    assert max(all_dates) < "2026-11-01"


def test_subject_ids_and_groups():
    assert [p.subject_id for p in SEED] == [*(f"IGA-A-{n:03d}" for n in range(1, 8)),
                                            *(f"IGA-B-{n:03d}" for n in range(1, 4)), "IGA-C-001"]
    assert build_seed() == SEED and build_seed() is not SEED


@given(st.floats(5, 140), st.integers(18, 90), st.sampled_from(["F", "M"]))
def test_creatinine_inverts_ckd_epi_2021(egfr, age, sex):
    creatinine = creatinine_for_egfr(egfr, age, sex)
    assert ckd_epi_2021(creatinine, age, sex) == pytest.approx(egfr, rel=1e-12)


def test_creatinine_results_carry_an_intended_one_decimal_egfr():
    """The seed's intended eGFRs have one decimal; CKD-EPI of the creatinine sent gives it back."""
    for patient in SEED:
        enrolled = PatientEnrolled.model_validate(patient.enrollment)
        for message in patient.lab_results:
            if message["loinc"] != "98979-8":
                egfr = lab_egfr(message, enrolled).egfr
                assert egfr == pytest.approx(round(egfr, 1), abs=1e-9)


def test_paired_biopsies_match_the_seed_expectations(outcomes):
    for group, expected in EXPECTED_BIOPSIES.items():
        assert biopsies([o for o in outcomes if o.group == group]) == expected, group
