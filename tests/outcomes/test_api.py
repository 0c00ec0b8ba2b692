"""The analyst API over HTTP: a real outcomes process (uvicorn, in this event loop) consuming a
small hand-made cohort from the real NATS, answered from its projection (tests/outcomes/serving.py)."""

from __future__ import annotations

import asyncio
import csv
import io
import math
from collections.abc import AsyncIterator
from datetime import date, datetime
from pathlib import Path

import httpx
import nats
import pyarrow.parquet as pq
import pytest

from services.outcomes.exports import CONTRACT_COLUMNS
from shared.broker import Topology
from tests.outcomes.conftest import Feed
from tests.outcomes.mixed_run import Published
from tests.outcomes.serving import outcomes_api
from tests.stack import AUTH_HEADERS
from tests.unit.outcomes.outcome_events import dialysis, dose, egfr, enrolled

pytestmark = pytest.mark.timeout(60)

A1, A2, C1 = "IGA-A-001", "IGA-A-002", "IGA-C-001"


def cohort() -> list[Published]:
    """Two group A patients and one control, with a correction and a preliminary result."""
    feed = Feed()

    def lab(event, version: int) -> Published:  # type: ignore[no-untyped-def]
        return Published("labs", feed.envelope(event, f"labresult-{event.result_id}", version))

    def event(source: str, e) -> Published:  # type: ignore[no-untyped-def]
        return Published(source, feed.envelope(e))

    return [
        event("enrollment", enrolled(sid=A1, age=60, enrolled_on=date(2014, 1, 1), baseline=30.0)),
        event("enrollment", enrolled(sid=A2, age=50, enrolled_on=date(2014, 1, 1), baseline=20.0)),
        event("enrollment", enrolled(sid=C1, age=57, enrolled_on=date(2013, 4, 1), baseline=33.0, group="control")),
        event("pulse", dose(date(2014, 1, 15), sid=A1)),
        event("pulse", dose(date(2014, 2, 1), sid=A2)),
        lab(egfr("A1-R1", 28.0, "2014-01-10", sid=A1), 2),
        lab(egfr("A1-R2", 35.0, "2015-01-15", sid=A1), 2),
        lab(egfr("A1-R3", 40.0, "2016-01-15", sid=A1), 2),
        lab(egfr("A1-R4", 10.0, "2016-06-01", status="preliminary", sid=A1), 2),
        lab(egfr("A2-R1", 2.4, "2015-02-01", sid=A2), 2),
        lab(egfr("A2-R1", 24.0, "2015-02-01", status="corrected", sid=A2), 4),
        lab(egfr("C1-R1", 33.0, "2013-04-01", sid=C1), 2),
        lab(egfr("C1-R2", 29.0, "2013-12-01", sid=C1), 2),
        event("enrollment", dialysis(date(2014, 10, 1), sid=C1)),
    ]


@pytest.fixture
async def api(backend: str, tmp_path: Path, nats_client: nats.NATS, topology: Topology,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    async with outcomes_api(cohort(), backend, tmp_path, nats_client, topology, monkeypatch) as client:
        yield client


def years(days: int) -> float:
    return days / 365.25


def assert_fresh(response: httpx.Response) -> None:
    assert response.headers["X-Projection-Position"] == "enrollment:4,pulse:2,cells:0,labs:8"
    assert datetime.fromisoformat(response.headers["X-Projection-Updated-At"]).tzinfo is not None


async def test_cohorts_are_the_contract_array_with_the_contract_means(api: httpx.AsyncClient) -> None:
    response = await api.get("/v1/cohorts")
    assert response.status_code == 200
    assert_fresh(response)
    rows = response.json()
    assert isinstance(rows, list) and [r["group"] for r in rows] == ["A", "control"]  # B has nobody: omitted
    a, control = rows
    a1_slope = (40.0 - 35.0) / (years(730) - years(365))
    assert {k: a[k] for k in list(a)[:10]} == {
        "group": "A", "n": 2, "mean_age": 55.0,
        "mean_baseline_egfr": 24.0,  # A1: lab 28 on or before the first dose; A2: enrollment's 20
        "mean_post_egfr": 32.0,  # A1: 40 (the later preliminary 10 is not counted); A2: the corrected 24
        "mean_followup_years": math.fsum([years(730), years(365)]) / 2,
        "mean_egfr_slope": pytest.approx(a1_slope, rel=1e-12),  # A2 has one result after start: no slope
        "mean_egfr_change": math.fsum([12.0, 4.0]) / 2,
        "mean_egfr_change_pct": math.fsum([12 / 28 * 100, 4 / 20 * 100]) / 2,
        "kidney_failure_count": 0,
    }
    assert (control["n"], control["mean_baseline_egfr"], control["mean_post_egfr"]) == (1, 33.0, 29.0)
    assert control["mean_followup_years"] == years(244) and control["kidney_failure_count"] == 1
    assert control["sd_age"] is None and a["sd_age"] == pytest.approx(math.sqrt(50))


async def test_a_patient_has_values_facts_and_timeline_and_an_unknown_one_is_a_404(api: httpx.AsyncClient) -> None:
    response = await api.get(f"/v1/patients/{A2}")
    assert response.status_code == 200
    assert_fresh(response)
    patient = response.json()
    assert (patient["baseline_egfr"], patient["baseline_source"], patient["post_egfr"]) == (20.0, "enrollment", 24.0)
    assert patient["facts"]["egfr_results"] == 1 and patient["facts"]["enrollment_baseline_egfr"] == 20.0
    timeline = [(t["kind"], t["detail"].get("egfr"), t["detail"].get("effective")) for t in patient["timeline"]]
    assert timeline == [("enrolled", None, None), ("pulse_dose", None, None),
                        ("egfr", 2.4, False), ("egfr", 24.0, True)]  # the typo stays visible, superseded

    missing = await api.get("/v1/patients/IGA-A-404")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "no patient with subject id IGA-A-404 is known to the outcomes service"}


async def test_exports_have_one_unrounded_row_per_patient(api: httpx.AsyncClient) -> None:
    response = await api.get("/v1/export/patients.csv")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    assert_fresh(response)
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert list(rows[0])[: len(CONTRACT_COLUMNS)] == list(CONTRACT_COLUMNS)
    assert [r["subject_id"] for r in rows] == [A1, A2, C1]
    a1, a2, c1 = rows
    assert float(a1["followup_years"]) == years(730) and a1["followup_years"] == repr(years(730))
    assert (a2["egfr_slope"], a2["kidney_failure"], c1["kidney_failure"]) == ("", "false", "true")
    assert float(c1["kidney_failure_years"]) == years((date(2014, 10, 1) - date(2013, 4, 1)).days)

    parquet = await api.get("/v1/export/patients.parquet")
    assert parquet.status_code == 200
    table = pq.read_table(io.BytesIO(parquet.content)).to_pylist()
    assert [r["subject_id"] for r in table] == [A1, A2, C1]
    assert table[0]["followup_years"] == years(730) and table[0]["treatment_start"] == date(2014, 1, 15)
    assert table[1]["egfr_slope"] is None and table[2]["kidney_failure"] is True


async def test_survival_and_egfr_trajectories_give_the_numbers_behind_the_plots(api: httpx.AsyncClient) -> None:
    survival = await api.get("/v1/cohorts/control/survival")
    assert survival.status_code == 200
    assert_fresh(survival)
    curve = survival.json()
    assert (curve["n"], curve["events"]) == (1, 1)
    assert curve["steps"][-1]["time"] == years(548) and curve["steps"][-1]["survival"] == 0.0
    assert [row["at_risk"] for row in curve["at_risk_by_year"]] == [1, 1]

    trajectories = (await api.get("/v1/cohorts/A/egfr")).json()
    assert [p["subject_id"] for p in trajectories["patients"]] == [A1, A2]
    assert [p["egfr"] for p in trajectories["patients"][0]["points"]] == [28.0, 35.0, 40.0]
    assert trajectories["mean_curve"][0] == {"year": 0, "mean_egfr": 24.0, "n": 2}

    unknown = await api.get("/v1/cohorts/Z/survival")
    assert unknown.status_code == 404 and "unknown group 'Z'" in unknown.json()["detail"]


async def test_every_response_says_how_fresh_it_is(api: httpx.AsyncClient) -> None:
    freshness = await api.get("/v1/freshness")
    body = freshness.json()
    assert body["generation"] == 1 and body["position"] == "enrollment:4,pulse:2,cells:0,labs:8"
    assert {s["source"]: (s["last_sequence"], s["pending"]) for s in body["sources"]} == {
        "enrollment": (4, 0), "pulse": (2, 0), "cells": (0, 0), "labs": (8, 0)}
    for path in ("/metrics", "/openapi.json"):  # authenticated, not reading the projection: stamped too
        assert_fresh(await api.get(path))
    assert "/v1/cohorts/{group}/survival" in (await api.get("/openapi.json")).json()["paths"]


async def test_only_authenticated_responses_say_how_fresh_the_clinical_data_are(api: httpx.AsyncClient) -> None:
    open_routes = ("/healthz", "/", "/patients/IGA-A-001", "/static/common.js", "/static/x%00.css")
    for path in open_routes:  # with or without a key: open routes are answered as to anyone
        for headers in ({"Authorization": ""}, AUTH_HEADERS):
            response = await api.get(path, headers=headers)
            assert response.status_code in (200, 404), (path, response.status_code)
            assert not [h for h in response.headers if h.lower().startswith("x-projection-")], path
    refused = [await api.get("/v1/cohorts", headers={"Authorization": ""}),
               await api.get("/metrics", headers={"Authorization": "Bearer not-a-key-0000"}),
               await api.get("/v2/cohorts")]  # a valid key, a route no role may call
    assert [r.status_code for r in refused] == [401, 401, 403]
    assert not [h for r in refused for h in r.headers if h.lower().startswith("x-projection-")]
    assert_fresh(await api.get("/v1/cohorts"))  # the analyst's own answers keep them


async def test_the_admin_endpoint_rebuilds_without_changing_an_answer(api: httpx.AsyncClient) -> None:
    before = (await api.get("/v1/cohorts")).json()
    started = await api.post("/v1/admin/rebuild")
    assert started.status_code == 202
    for _ in range(100):
        status = (await api.get("/v1/admin/rebuild")).json()
        if status["progress"]["phase"] in ("done", "failed"):
            break
        await asyncio.sleep(0.1)
    assert status["progress"]["phase"] == "done", status
    assert (status["active_generation"], status["rebuilding_generation"], status["running_here"]) == (2, None, False)
    after = await api.get("/v1/cohorts")
    assert after.json() == before and after.headers["X-Projection-Generation"] == "2"
