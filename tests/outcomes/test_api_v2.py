"""Outcome statistics v2 over HTTP: a real outcomes process consuming enrollment, pulse, cells and
labs events from the real NATS (adverse events with a follow-up, UPCR results with a correction
and a preliminary, paired biopsies, a confirmed eGFR decline, death and dialysis), checked against
numbers worked out by hand from the contract's definitions."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import nats
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.outcomes.exports import COLUMNS
from services.outcomes.measurements import Measurement
from services.outcomes.slopes import PatientEgfr, group_slopes
from shared.broker import Topology
from tests.outcomes.conftest import Feed
from tests.outcomes.mixed_run import Published
from tests.outcomes.serving import outcomes_api
from tests.unit.outcomes.outcome_events import (
    adverse_event,
    at,
    biopsy,
    dialysis,
    died,
    dose,
    egfr,
    enrolled,
    infused,
    upcr,
)

pytestmark = pytest.mark.timeout(60)

A1, A2, C1 = "IGA-A-001", "IGA-A-002", "IGA-C-001"
A1_START, A2_START, C1_START = date(2014, 1, 15), date(2014, 2, 1), date(2013, 4, 1)
A1_EGFR = {"A1-R2": (16.0, "2014-06-01"), "A1-R3": (20.0, "2014-06-20"), "A1-R4": (16.5, "2014-07-01"),
           "A1-R5": (18.0, "2015-01-15")}
A2_EGFR = {"A2-R1": (24.0, "2015-02-01"), "A2-R2": (22.0, "2015-08-01")}


def cohort() -> list[Published]:
    feed = Feed()

    def lab(event: Any, version: int = 2) -> Published:
        return Published("labs", feed.envelope(event, f"labresult-{event.result_id}", version))

    def patient(event: Any) -> Published:
        """Enrollment's events on the patient's own stream, numbered in order (AE reports too)."""
        return Published("enrollment", feed.envelope(event, f"patient-{event.subject_id}"))

    def pulse(event: Any) -> Published:
        return Published("pulse", feed.envelope(event))

    return [
        patient(enrolled(sid=A1, age=60, enrolled_on=date(2014, 1, 1), baseline=30.0)),
        patient(enrolled(sid=A2, age=50, enrolled_on=date(2014, 1, 1), baseline=20.0)),
        patient(enrolled(sid=C1, age=57, enrolled_on=C1_START, baseline=33.0, group="control")),
        pulse(dose(A1_START, sid=A1)),
        pulse(dose(A2_START, sid=A2)),
        Published("cells", feed.envelope(infused("LOT-A2", date(2015, 2, 28), sid=A2))),
        # A1: baseline eGFR 28 (lab, before the start); 16.0 ≤ 60 % of 28 = 16.8, confirmed by 16.5 thirty
        # days later (20.0 in between, < 28 days, neither confirms nor refutes): decline on 2014-06-01.
        lab(egfr("A1-R1", 28.0, "2014-01-10", sid=A1)),
        *(lab(egfr(result_id, value, on, sid=A1)) for result_id, (value, on) in A1_EGFR.items()),
        *(lab(egfr(result_id, value, on, sid=A2)) for result_id, (value, on) in A2_EGFR.items()),
        lab(egfr("C1-R1", 33.0, "2013-04-01", sid=C1)),
        lab(egfr("C1-R2", 29.0, "2013-12-01", sid=C1)),
        # UPCR (g/g). A1: 2.0 before the start, 0.8 after (a typo of 8.0 corrected), a later preliminary
        # 0.1 never counted: partial remission (0.8 < 1.0 and ≤ 50 % of 2.0). A2: 1.2 → 0.2, complete.
        lab(upcr("A1-U1", 2.0, "2014-01-10", sid=A1)),
        lab(upcr("A1-U2", 1.5, "2014-06-01", sid=A1)),
        lab(upcr("A1-U3", 8.0, "2015-01-10", sid=A1)),
        lab(upcr("A1-U3", 0.8, "2015-01-10", status="corrected", sid=A1), 4),
        lab(upcr("A1-U4", 0.1, "2015-02-01", status="preliminary", sid=A1)),
        lab(upcr("A2-U1", 1.2, "2014-01-20", sid=A2)),
        lab(upcr("A2-U2", 0.2, "2015-02-01", sid=A2)),
        # Biopsies: A1 paired (deposits, IgA, foot processes and Lee grade improve; proliferation stays);
        # A2 has a follow-up biopsy only.
        patient(biopsy(date(2013, 12, 20), deposits=True, iga="2+", proliferation=True, foot=True, lee="IV", sid=A1)),
        patient(biopsy(date(2015, 1, 20), deposits=False, iga="negative", proliferation=True, foot=False, lee="III",
                       sid=A1)),
        patient(biopsy(date(2015, 3, 1), deposits=False, iga="negative", sid=A2)),
        # Adverse events: A1's hyperglycaemia (related to the pulse, possible) followed up from grade 1 to
        # 2, and an unrelated serious pneumonia; A2's probable infusion reaction of grade 3.
        patient(adverse_event("AE-1", "hyperglycaemia", date(2014, 1, 16), grade=1, related_to=("mp_pulse",),
                              causality="possible", sid=A1)),
        patient(adverse_event("AE-2", "pneumonia", date(2014, 9, 1), grade=3, serious=True, sid=A1)),
        patient(adverse_event("AE-1", "hyperglycaemia", date(2014, 1, 16), grade=2, related_to=("mp_pulse",),
                              causality="possible", outcome="recovered", follow_up=True, sid=A1)),
        patient(adverse_event("AE-3", "infusion reaction", date(2015, 3, 1), grade=3, related_to=("cell_infusion",),
                              causality="probable", sid=A2)),
        patient(died(date(2016, 1, 1), sid=A2)),
        patient(dialysis(date(2014, 10, 1), sid=C1)),
    ]


@pytest.fixture
async def api(backend: str, tmp_path: Path, nats_client: nats.NATS, topology: Topology,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    async with outcomes_api(cohort(), backend, tmp_path, nats_client, topology, monkeypatch) as client:
        yield client


def days(start: date, end: date) -> int:
    return (end - start).days


def years(n: int) -> float:
    return n / 365.25


A1_DECLINE_DAYS = days(A1_START, date(2014, 6, 1))  # 137
A1_LAST_EGFR_DAYS = days(A1_START, date(2015, 1, 15))  # 365
A2_DEATH_DAYS = days(A2_START, date(2016, 1, 1))  # 699
C1_DIALYSIS_DAYS = days(C1_START, date(2014, 10, 1))  # 548


async def test_cohort_rows_add_the_v2_means_and_counts(api: httpx.AsyncClient) -> None:
    rows = {row["group"]: row for row in (await api.get("/v1/cohorts")).json()}
    v2 = ["mean_baseline_upcr", "mean_post_upcr", "complete_remission_count", "partial_remission_count",
          "decline_40_count", "composite_endpoint_count", "patients_with_ae", "patients_with_serious_ae",
          "patients_with_significant_related_ae"]
    assert {k: rows["A"][k] for k in v2} == {
        "mean_baseline_upcr": math.fsum([2.0, 1.2]) / 2, "mean_post_upcr": math.fsum([0.8, 0.2]) / 2,
        "complete_remission_count": 1, "partial_remission_count": 1, "decline_40_count": 1,
        "composite_endpoint_count": 2,  # A1's confirmed decline, A2's death
        "patients_with_ae": 2, "patients_with_serious_ae": 1, "patients_with_significant_related_ae": 1,
    }
    assert {k: rows["control"][k] for k in v2} == {
        "mean_baseline_upcr": None, "mean_post_upcr": None, "complete_remission_count": 0,
        "partial_remission_count": 0, "decline_40_count": 0, "composite_endpoint_count": 1,
        "patients_with_ae": 0, "patients_with_serious_ae": 0, "patients_with_significant_related_ae": 0,
    }
    assert list(rows["A"])[-len(v2):] == v2  # after every v1 key, which keep their places


async def test_a_patient_has_the_v2_values_and_timeline_entries(api: httpx.AsyncClient) -> None:
    a1 = (await api.get(f"/v1/patients/{A1}")).json()
    assert {k: a1[k] for k in ("baseline_upcr", "post_upcr", "upcr_change_pct", "complete_remission",
                               "partial_remission")} == {
        "baseline_upcr": 2.0, "post_upcr": 0.8, "upcr_change_pct": (0.8 - 2.0) / 2.0 * 100,
        "complete_remission": False, "partial_remission": True}
    assert {k: a1[k] for k in ("paired_biopsies", "deposits_cleared", "iga_cleared", "proliferation_resolved",
                               "foot_process_improved", "lee_grade_improved")} == {
        "paired_biopsies": True, "deposits_cleared": True, "iga_cleared": True, "proliferation_resolved": False,
        "foot_process_improved": True, "lee_grade_improved": True}
    assert (a1["decline_40_on"], a1["decline_57_on"]) == ("2014-06-01", None)  # 43 % of 28 is 12.04
    assert (a1["composite_endpoint"], a1["composite_endpoint_days"], a1["composite_endpoint_years"]) == (
        "decline_40", A1_DECLINE_DAYS, years(A1_DECLINE_DAYS))
    assert (a1["kidney_failure_competing"], a1["kidney_failure_competing_days"]) == (None, A1_LAST_EGFR_DAYS)
    assert (a1["adverse_events"], a1["highest_ae_grade"], a1["any_serious_ae"], a1["any_significant_related_ae"]) == (
        2, 3, True, False)  # the serious pneumonia is unrelated; the related hyperglycaemia is grade 2
    assert a1["facts"]["urine_results"] == 4

    entries = [(t["kind"], t["detail"].get("ae_id") or t["detail"].get("result_id"), t["detail"].get("effective"))
               for t in a1["timeline"] if t["kind"] in ("adverse_event", "adverse_event_follow_up", "urine_result",
                                                         "biopsy")]
    assert entries == [
        ("biopsy", None, None), ("urine_result", "A1-U1", True),
        ("adverse_event", "AE-1", False), ("adverse_event_follow_up", "AE-1", True),  # on its onset date
        ("urine_result", "A1-U2", True), ("adverse_event", "AE-2", True),
        ("urine_result", "A1-U3", False), ("urine_result", "A1-U3", True),  # the typo stays, superseded
        ("biopsy", None, None), ("urine_result", "A1-U4", True),
    ]

    a2 = (await api.get(f"/v1/patients/{A2}")).json()
    assert (a2["complete_remission"], a2["partial_remission"], a2["paired_biopsies"], a2["deposits_cleared"]) == (
        True, False, False, None)
    assert (a2["composite_endpoint"], a2["composite_endpoint_days"]) == ("death", A2_DEATH_DAYS)
    assert (a2["kidney_failure_competing"], a2["kidney_failure_competing_days"]) == ("death", A2_DEATH_DAYS)
    assert (a2["highest_ae_grade"], a2["any_serious_ae"], a2["any_significant_related_ae"]) == (3, False, True)


async def test_group_biopsies_and_safety(api: httpx.AsyncClient) -> None:
    assert (await api.get("/v1/cohorts/A/biopsies")).json() == {
        "paired": 1, "deposits_cleared": 1, "iga_cleared": 1, "proliferation_resolved": 0,
        "foot_process_improved": 1, "lee_grade_improved": 1}
    assert (await api.get("/v1/cohorts/B/biopsies")).json() == {
        "paired": 0, "deposits_cleared": 0, "iga_cleared": 0, "proliferation_resolved": 0,
        "foot_process_improved": 0, "lee_grade_improved": 0}

    safety = (await api.get("/v1/cohorts/A/safety")).json()
    assert safety == {
        "patients": 2, "patients_with_ae": 2, "patients_with_serious_ae": 1, "patients_with_significant_related_ae": 1,
        "events": 3, "serious": 1, "related": 2, "significant_related": 1,
        "by_grade": {"1": 0, "2": 1, "3": 2, "4": 0, "5": 0},
        "related_by_intervention": {"mp_pulse": 1, "cell_infusion": 1, "fat_harvest": 0},
        "by_term": [
            {"term": "hyperglycaemia", "events": 1, "patients": 1, "max_grade": 2, "serious": 0, "related": 1,
             "significant_related": 0},
            {"term": "infusion reaction", "events": 1, "patients": 1, "max_grade": 3, "serious": 0, "related": 1,
             "significant_related": 1},
            {"term": "pneumonia", "events": 1, "patients": 1, "max_grade": 3, "serious": 1, "related": 0,
             "significant_related": 0},
        ],
    }
    empty = (await api.get("/v1/cohorts/B/safety")).json()
    assert (empty["patients"], empty["events"], empty["by_term"]) == (0, 0, [])
    for route in ("biopsies", "safety", "endpoints", "slopes"):
        unknown = await api.get(f"/v1/cohorts/Z/{route}")
        assert unknown.status_code == 404 and "unknown group 'Z'" in unknown.json()["detail"]


async def test_group_endpoints_are_the_curves_of_the_patients_times(api: httpx.AsyncClient) -> None:
    a = (await api.get("/v1/cohorts/A/endpoints")).json()
    assert a == {
        "composite": {"times": [years(A1_DECLINE_DAYS), years(A2_DEATH_DAYS)], "survival": [0.5, 0.0],
                      "at_risk": [2, 1], "events": [1, 1]},
        # A1 censored at the last eGFR; A2's death competes: no kidney failure
        "kidney_failure": {"times": [years(A1_LAST_EGFR_DAYS), years(A2_DEATH_DAYS)],
                           "cumulative_incidence": [0.0, 0.0], "at_risk": [2, 1], "events": [0, 0]},
    }
    control = (await api.get("/v1/cohorts/control/endpoints")).json()
    assert control == {
        "composite": {"times": [years(C1_DIALYSIS_DAYS)], "survival": [0.0], "at_risk": [1], "events": [1]},
        "kidney_failure": {"times": [years(C1_DIALYSIS_DAYS)], "cumulative_incidence": [1.0], "at_risk": [1],
                           "events": [1]},
    }
    empty = {"times": [], "at_risk": [], "events": []}
    assert (await api.get("/v1/cohorts/B/endpoints")).json() == {
        "composite": {**empty, "survival": []}, "kidney_failure": {**empty, "cumulative_incidence": []}}


def measured(results: dict[str, tuple[float, str]]) -> tuple[Measurement, ...]:
    return tuple(Measurement(result_id, value, at(on)) for result_id, (value, on) in results.items())


async def test_group_slopes_are_the_mixed_model_fit_or_null_with_a_reason(api: httpx.AsyncClient) -> None:
    a = (await api.get("/v1/cohorts/A/slopes")).json()
    expected = group_slopes([PatientEgfr(A1, A1_START, measured(A1_EGFR)), PatientEgfr(A2, A2_START, measured(A2_EGFR))])
    assert a == expected
    assert a["total"]["slope"] is not None and a["total"]["ci_low"] < a["total"]["slope"] < a["total"]["ci_high"]
    assert (a["total"]["patients"], a["total"]["measurements"], a["total"]["reason"]) == (2, 6, None)

    control = (await api.get("/v1/cohorts/control/slopes")).json()
    assert control["total"]["slope"] is None and control["total"]["reason"].startswith("too few patients")
    assert (control["total"]["patients"], control["total"]["measurements"]) == (1, 1)
    empty = (await api.get("/v1/cohorts/B/slopes")).json()
    assert empty["chronic"] == {"slope": None, "ci_low": None, "ci_high": None, "patients": 0, "measurements": 0,
                                "reason": empty["chronic"]["reason"]} and empty["chronic"]["reason"]


async def test_exports_carry_the_v2_columns(api: httpx.AsyncClient) -> None:
    rows = {r["subject_id"]: r for r in csv.DictReader(io.StringIO((await api.get("/v1/export/patients.csv")).text))}
    assert list(rows[A1]) == list(COLUMNS)
    assert (rows[A1]["decline_40_on"], rows[A1]["composite_endpoint"], rows[A1]["post_upcr"]) == (
        "2014-06-01", "decline_40", "0.8")
    assert (rows[A2]["complete_remission"], rows[A2]["any_significant_related_ae"], rows[C1]["baseline_upcr"]) == (
        "true", "true", "")

    table = pq.read_table(io.BytesIO((await api.get("/v1/export/patients.parquet")).content))
    assert table.schema.field("decline_40_on").type == pa.date32()
    assert table.schema.field("composite_endpoint_days").type == pa.int64()
    by_subject = {r["subject_id"]: r for r in table.to_pylist()}
    assert by_subject[A1]["decline_40_on"] == date(2014, 6, 1) and by_subject[C1]["composite_endpoint"] == (
        "kidney_failure")
    assert by_subject[A2]["highest_ae_grade"] == 3 and by_subject[C1]["highest_ae_grade"] is None


async def test_group_upcr_trajectories_hold_each_counted_upcr_once(api: httpx.AsyncClient) -> None:
    answer = (await api.get("/v1/cohorts/A/upcr")).json()
    points = {p["subject_id"]: [(pt["result_id"], pt["upcr"], pt["status"], pt["years"]) for pt in p["points"]]
              for p in answer["patients"]}
    assert answer["group"] == "A"
    assert points == {
        A1: [("A1-U1", 2.0, "final", years(-days(date(2014, 1, 10), A1_START))),
             ("A1-U2", 1.5, "final", years(days(A1_START, date(2014, 6, 1)))),
             ("A1-U3", 0.8, "corrected", years(days(A1_START, date(2015, 1, 10))))],  # the preliminary A1-U4 is not counted
        A2: [("A2-U1", 1.2, "final", years(-days(date(2014, 1, 20), A2_START))),
             ("A2-U2", 0.2, "final", years(days(A2_START, date(2015, 2, 1))))],
    }
    assert (await api.get("/v1/cohorts/control/upcr")).json() == {"group": "control", "patients": []}
    assert (await api.get("/v1/cohorts/D/upcr")).status_code == 404
