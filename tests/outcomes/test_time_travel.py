"""Time travel and locks over HTTP (issue 18 point 3), on real PostgreSQL and NATS: a lock's
answers stay byte for byte the same through a correction, new results, a rebuild and a restart
of the outcomes process; ``as_of`` before the correction answers the uncorrected value, after it
the corrected one; the lock is an ``AnalysisLocked`` event in the outcomes store's audit trail."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import nats
import pytest

from contracts.enrollment import PatientDataErased
from shared.broker import Topology
from shared.database import migrate
from shared.events import CommandContext, DomainEvent, Envelope
from tests.conftest import NATS_URL, drop_database, new_database_url
from tests.outcomes.mixed_run import Published, publish
from tests.outcomes.serving import caught_up, outcomes_process
from tests.stack import TEST_API_KEYS
from tests.unit.outcomes.outcome_events import dose, egfr, enrolled

pytestmark = pytest.mark.timeout(120)

A1, C1 = "IGA-A-001", "IGA-C-001"
FIRST_RECORDED = datetime(2026, 1, 10, 9, 0, tzinfo=UTC)
CORRECTED_AT = FIRST_RECORDED + timedelta(days=30)
BEFORE_CORRECTION = "2026-01-25T00:00:00Z"
AFTER_CORRECTION = "2026-02-10T00:00:00%2B01:00"  # an offset other than Z, '+' encoded
LOCKED_PATHS = (
    "/v1/cohorts", f"/v1/patients/{A1}", "/v1/export/patients.csv", "/v1/export/patients.parquet",
    "/v1/cohorts/A/survival", "/v1/cohorts/A/egfr", "/v1/cohorts/A/biopsies", "/v1/cohorts/A/safety",
    "/v1/cohorts/A/endpoints", "/v1/cohorts/A/slopes", "/v1/export/adam/adtte.xpt", "/v1/export/sdtm/lb.json",
)
STAMPED = ("/v1/export/adam/adtte.xpt", "/v1/export/sdtm/lb.json")
"""Files stamped with their creation time: the time of writing when live, the lock's time when locked."""


def unstamped(answers: dict[str, bytes]) -> dict[str, bytes]:
    return {path: body for path, body in answers.items() if path not in STAMPED}


@pytest.fixture
def backend() -> str:
    return "postgresql"


def recorded(source: str, event: DomainEvent, stream_id: str, version: int, at: datetime) -> Published:
    return Published(source, Envelope.wrap(event, stream_id=stream_id, stream_version=version,
                                           context=CommandContext(), recorded_at=at))


def first_run() -> list[Published]:
    """A1 (group A) with a typo as its latest eGFR (3.8 for 38), and a control patient."""
    at = FIRST_RECORDED
    return [
        recorded("enrollment", enrolled(sid=A1, enrolled_on=date(2024, 1, 1), baseline=30.0), f"patient-{A1}", 1, at),
        recorded("enrollment", enrolled(sid=C1, enrolled_on=date(2024, 1, 1), baseline=33.0, group="control"),
                 f"patient-{C1}", 1, at),
        recorded("pulse", dose(date(2024, 1, 15), sid=A1), f"pulse-{A1}", 1, at),
        recorded("labs", egfr("A1-R1", 30.0, "2024-01-10", sid=A1), "labresult-A1-R1", 2, at),
        recorded("labs", egfr("A1-R2", 34.0, "2024-09-15", sid=A1), "labresult-A1-R2", 2, at),
        recorded("labs", egfr("A1-R3", 3.8, "2025-06-15", sid=A1), "labresult-A1-R3", 2, at),
    ]


def erasure() -> Published:
    """C1 withdrew and asked for erasure, after everything else."""
    erased = PatientDataErased(subject_id=C1, erased_on=date(2026, 3, 1))
    return recorded("enrollment", erased, f"erasure-{C1}", 1, CORRECTED_AT + timedelta(days=20))


def later_run() -> list[Published]:
    """After the lock: the typo's correction and a new result."""
    at = CORRECTED_AT
    return [
        recorded("labs", egfr("A1-R3", 38.0, "2025-06-15", status="corrected", sid=A1), "labresult-A1-R3", 4, at),
        recorded("labs", egfr("A1-R4", 41.0, "2025-12-15", sid=A1), "labresult-A1-R4", 2, at),
    ]


@pytest.fixture
async def outcomes_url(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    monkeypatch.setenv("NATS_URL", NATS_URL)
    monkeypatch.setenv("NEPHROTRACK_API_KEYS", TEST_API_KEYS)
    url = new_database_url(backend, tmp_path, "outcomes")
    await asyncio.to_thread(migrate, "outcomes", url)
    yield url
    await drop_database(url)


async def bodies(client: httpx.AsyncClient, query: str) -> dict[str, bytes]:
    answers = {}
    for path in LOCKED_PATHS:
        response = await client.get(f"{path}?{query}")
        assert response.status_code == 200, (path, response.text)
        answers[path] = response.content
    return answers


async def post_egfr(client: httpx.AsyncClient, query: str = "") -> float:
    response = await client.get(f"/v1/patients/{A1}?{query}")
    assert response.status_code == 200, response.text
    return response.json()["post_egfr"]


async def rebuilt(client: httpx.AsyncClient) -> None:
    assert (await client.post("/v1/admin/rebuild")).status_code == 202
    for _ in range(300):
        status = (await client.get("/v1/admin/rebuild")).json()
        if status["progress"]["phase"] in ("done", "failed"):
            break
        await asyncio.sleep(0.1)
    assert status["progress"]["phase"] == "done", status


async def test_a_lock_answers_the_same_bytes_through_corrections_rebuilds_and_restarts(
    outcomes_url: str, nats_client: nats.NATS, topology: Topology
) -> None:
    js = nats_client.jetstream()
    async with outcomes_process(outcomes_url, timeout=30) as api:
        await publish(js, topology, first_run())
        await caught_up(api, len(first_run()))
        live_then = await bodies(api, "")
        assert await post_egfr(api) == 3.8

        created = await api.post("/v1/locks", json={"name": "interim-2026"})
        assert created.status_code == 201, created.text
        lock = created.json()
        assert lock["positions"] == {"enrollment": 2, "pulse": 1, "cells": 0, "labs": 3}
        assert lock["actor"].startswith("analyst:") and lock["generation"] < 0
        assert (await api.post("/v1/locks", json={"name": "interim-2026"})).status_code == 409
        locked_then = await bodies(api, "lock=interim-2026")
        assert unstamped(locked_then) == unstamped(live_then)

        assert await post_egfr(api, f"as_of={AFTER_CORRECTION}") == 3.8  # the correction is not recorded yet
        await publish(js, topology, later_run())
        await caught_up(api, len(first_run()) + len(later_run()))
        assert await post_egfr(api) == 41.0  # live moved on
        live_now = await bodies(api, "")
        assert live_now["/v1/cohorts"] != live_then["/v1/cohorts"] and live_now[f"/v1/patients/{A1}"] != live_then[f"/v1/patients/{A1}"]
        assert await bodies(api, "lock=interim-2026") == locked_then

        assert await post_egfr(api, f"as_of={BEFORE_CORRECTION}") == 3.8
        assert (await api.get(f"/v1/cohorts?as_of={BEFORE_CORRECTION}")).content == live_then["/v1/cohorts"]
        assert await post_egfr(api, f"as_of={AFTER_CORRECTION}") == 41.0  # kept, caught up with the log
        assert (await api.get(f"/v1/cohorts?as_of={AFTER_CORRECTION}")).content == (await api.get("/v1/cohorts")).content
        before_anything = await api.get("/v1/cohorts?as_of=2025-12-31T00:00:00Z")
        assert before_anything.json() == [] and before_anything.headers["X-Projection-As-Of"] == "2025-12-31T00:00:00+00:00"

        await publish(js, topology, [erasure()])  # the law wins over the past: C1 leaves every answer
        await caught_up(api, len(first_run()) + len(later_run()) + 1)
        for query in (f"as_of={BEFORE_CORRECTION}", f"as_of={AFTER_CORRECTION}", "as_of=2026-01-11T00:00:00Z", ""):
            assert (await api.get(f"/v1/patients/{C1}?{query}")).status_code == 404, query
            assert [row["group"] for row in (await api.get(f"/v1/cohorts?{query}")).json()] == ["A"], query
        locked = await bodies(api, "lock=interim-2026")
        assert locked["/v1/cohorts"] != live_then["/v1/cohorts"] and b"control" not in locked["/v1/cohorts"]
        live_then = await bodies(api, "lock=interim-2026")  # from here on the lock must not change again

        await rebuilt(api)
        assert await bodies(api, "lock=interim-2026") == live_then

        audit = (await api.get("/v1/audit?event_type=AnalysisLocked")).json()
        assert [(e["stream_id"], e["actor"]) for e in audit] == [("analysis-lock-interim-2026", lock["actor"])]

    async with outcomes_process(outcomes_url, timeout=30) as restarted:
        assert await bodies(restarted, "lock=interim-2026") == live_then
        assert (await restarted.get("/v1/locks")).json() == [lock]
        assert await post_egfr(restarted) == 41.0


async def test_bad_time_travel_parameters_are_refused_with_their_reason(
    outcomes_url: str, nats_client: nats.NATS, topology: Topology
) -> None:
    async with outcomes_process(outcomes_url, timeout=30) as api:
        for query, status, reason in [
            ("as_of=2026-01-01T00:00:00", 422, "no offset"),
            ("as_of=yesterday", 422, "not an RFC 3339 time"),
            ("as_of=2026-01-01T00:00:00+01:00", 422, "%2B"),  # '+' unencoded reads as a space
            ("as_of=2026-01-01T00:00:00Z&lock=interim", 422, "exclude each other"),
            ("lock=nobody-made-this", 404, "no analysis lock"),
            ("lock=nul%00byte", 404, "no analysis lock"),  # never sent to PostgreSQL (text holds no NUL)
            ("as_of=0001-01-01T00:00:00%2B14:00", 422, "outside the years"),
        ]:
            for path in ("/v1/cohorts", "/v1/freshness", "/v1/cohorts/B/safety", "/v1/export/sdtm/dm.json"):
                response = await api.get(f"{path}?{query}")
                assert response.status_code == status and reason in response.json()["detail"], (path, query)
        assert (await api.post("/v1/locks", json={"name": "../etc"})).status_code == 422
        assert (await api.get("/v1/locks?lock=nobody")).status_code == 404
