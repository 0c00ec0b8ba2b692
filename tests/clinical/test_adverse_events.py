"""Adverse events end to end (contract: "Clinical evidence (v2)"): the enrollment service as a
process on PostgreSQL and on SQLite over real NATS, every request through HTTP; the store, the
broker and ``/metrics`` are then read directly to check what was kept, published and counted.

One stack per backend for the module; every test uses its own subject ids.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from shared.broker import Topology
from shared.database import create_engine
from shared.keys import KeyErased
from shared.schema import events
from shared.sealing import SealingCodec
from shared.store import EventStore, open_store
from tests.conftest import BACKENDS
from tests.keys import stack_codec
from tests.security.test_erasure import is_json
from tests.stack import Stack, eventually, running

pytestmark = pytest.mark.slow

_numbers = itertools.count(1)
_LETTERS = str.maketrans("0123456789", "ghijklmnop")  # no digit runs: those look like record numbers
SAE = {"term": "pneumonia", "onset_on": "2014-04-01", "grade": 3, "serious": True, "related_to": ["mp_pulse"],
       "causality": "possible", "outcome": "recovering", "resolved_on": None}
MINOR = {"term": "hyperglycaemia", "onset_on": "2014-03-11", "grade": 1, "serious": False,
         "related_to": ["mp_pulse"], "causality": "probable", "outcome": "recovered", "resolved_on": "2014-03-14"}


@dataclass
class Enrollment:
    stack: Stack
    prefix: str
    http: httpx.AsyncClient
    js: Any
    store: EventStore
    codec: SealingCodec

    def url(self, path: str) -> str:
        return f"{self.stack.url('enrollment')}{path}"

    async def enroll(self) -> str:
        subject_id = f"IGA-A-{uuid.uuid4().hex[:6].translate(_LETTERS)}-{next(_numbers)}"
        body = {"subject_id": subject_id, "sex": "F", "age_years": 58, "weight_kg": 61.5, "group": "A",
                "enrolled_on": "2014-03-02", "baseline_egfr": 27.0, "lee_grade": "IV"}
        response = await self.http.post(self.url("/v1/patients"), json=body)
        assert response.status_code == 201, response.text
        return subject_id

    async def report(self, subject_id: str, ae_id: str, body: dict[str, Any]) -> httpx.Response:
        return await self.http.put(self.url(f"/v1/patients/{subject_id}/adverse-events/{ae_id}"), json=body)

    async def serious_counted(self, grade: str, related: str) -> float:
        text = (await self.http.get(self.url("/metrics"))).text
        line = f'nephrotrack_serious_adverse_events_total{{grade="{grade}",treatment_related="{related}"}} '
        return next(float(row[len(line):]) for row in text.splitlines() if row.startswith(line))

    async def published(self, subject_id: str) -> list[dict[str, Any]]:
        """Enrollment's messages on the broker about this subject, opened with the stack's keys."""
        name = Topology(self.prefix).service_stream("enrollment").name
        info = await self.js.stream_info(name)
        found = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            envelope = self.codec.open((await self.js.get_msg(name, seq)).data)
            if envelope.stream_id == f"patient-{subject_id}":
                found.append({"event_type": envelope.event_type, **envelope.payload})
        return found


@pytest.fixture(scope="module", params=BACKENDS)
async def enrollment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Enrollment]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    tmp_path: Path = tmp_path_factory.mktemp(f"adverse-{request.param}")
    stack = Stack(tmp_path, prefix, ["enrollment"], backend=request.param)
    async with running(stack) as js, stack_codec(prefix) as codec, stack.client(timeout=30) as http:
        store = open_store(stack.database_urls["enrollment"], codec=codec)
        try:
            yield Enrollment(stack, prefix, http, js, store, codec)
        finally:  # before the stack stops and drops its database
            await store.close()


async def test_report_follow_up_and_resend(enrollment: Enrollment) -> None:
    subject = await enrollment.enroll()
    first = await enrollment.report(subject, "AE-1", {**MINOR, "outcome": "recovering", "resolved_on": None})
    assert first.status_code == 201, first.text
    body = first.json()
    assert (body["subject_id"], body["ae_id"], body["change"], body["outcome"]) == (subject, "AE-1", "reported", "recovering")
    assert body["related_to"] == ["mp_pulse"] and body["event_id"]

    follow_up = await enrollment.report(subject, "AE-1", MINOR)
    assert follow_up.status_code == 200, follow_up.text
    assert (follow_up.json()["change"], follow_up.json()["resolved_on"]) == ("updated", "2014-03-14")
    resend = await enrollment.report(subject, "AE-1", {**MINOR, "related_to": ["mp_pulse", "mp_pulse"]})
    assert resend.status_code == 200 and (resend.json()["change"], resend.json()["event_id"]) == ("unchanged", None)

    other = await enrollment.report(subject, "AE-2", {**MINOR, "term": "insomnia"})
    assert other.status_code == 201, other.text
    view = (await enrollment.http.get(enrollment.url(f"/v1/patients/{subject}"))).json()
    assert [(ae["ae_id"], ae["term"], ae["outcome"]) for ae in view["adverse_events"]] == [
        ("AE-1", "hyperglycaemia", "recovered"), ("AE-2", "insomnia", "recovered")]

    kept = [e.event_type for e in await enrollment.store.read_stream(f"patient-{subject}")]
    assert kept == ["PatientEnrolled", "AdverseEventReported", "AdverseEventUpdated", "AdverseEventReported"]
    ae_events = ("AdverseEventReported", "AdverseEventUpdated")

    async def all_published() -> list[dict[str, Any]] | None:
        found = [m for m in await enrollment.published(subject) if m["event_type"] in ae_events]
        return found if len(found) == 3 else None

    published = await eventually(all_published)
    assert [(m["event_type"], m["ae_id"], m["outcome"]) for m in published] == [
        ("AdverseEventReported", "AE-1", "recovering"), ("AdverseEventUpdated", "AE-1", "recovered"),
        ("AdverseEventReported", "AE-2", "recovered")]


@pytest.mark.parametrize(("ae_id", "change", "reason"), [
    ("AE-1", {"grade": 5}, "grade 5 with outcome recovered"),
    ("AE-1", {"outcome": "fatal"}, "grade 1 with outcome fatal"),
    ("AE-1", {"resolved_on": "2014-03-10"}, "resolved_on 2014-03-10 is before onset_on 2014-03-11"),
    ("AE-1", {"onset_on": "2014-03-01", "resolved_on": None}, "onset_on 2014-03-01 is before enrollment on 2014-03-02"),
    ("AE-1", {"grade": 6}, "grade"),
    ("AE-1", {"related_to": ["aspirin"]}, "related_to"),
    ("AE-1", {"onset_on": "2999-01-01", "resolved_on": None}, "onset_on"),
    ("AE 1;drop", {}, "ae_id"),
])
async def test_an_invalid_report_is_422_with_its_reason_and_records_nothing(
    enrollment: Enrollment, ae_id: str, change: dict[str, Any], reason: str
) -> None:
    subject = await enrollment.enroll()
    response = await enrollment.report(subject, ae_id, {**MINOR, **change})
    assert response.status_code == 422, response.text
    assert reason in response.json()["detail"]
    assert [e.event_type for e in await enrollment.store.read_stream(f"patient-{subject}")] == ["PatientEnrolled"]


async def test_unknown_patient_404_and_after_death_the_rules_of_other_records(enrollment: Enrollment) -> None:
    unknown = await enrollment.report("IGA-A-NOBODY-1", "AE-1", MINOR)
    assert unknown.status_code == 404 and "no patient is enrolled" in unknown.json()["detail"]
    subject = await enrollment.enroll()
    died = await enrollment.http.post(enrollment.url(f"/v1/patients/{subject}/events"), json={"type": "death", "on": "2014-05-01"})
    assert died.status_code == 201, died.text
    late = await enrollment.report(subject, "AE-1", {**MINOR, "onset_on": "2014-05-02", "resolved_on": None})
    assert late.status_code == 422 and f"is after {subject}'s death on 2014-05-01" in late.json()["detail"]
    assert (await enrollment.report(subject, "AE-1", MINOR)).status_code == 201  # before death: still reported


async def test_concurrent_reports_of_one_adverse_event_one_first_report_no_lost_follow_up(enrollment: Enrollment) -> None:
    """Concurrent writers are decided again on the new history (one 201, the rest follow-ups);
    a conflict that outlasts the retries would be a 409 with its reason, never a 500."""
    subject = await enrollment.enroll()
    bodies = [{**MINOR, "term": f"hyperglycaemia {n}"} for n in range(6)]
    answers = await asyncio.gather(*(enrollment.report(subject, "AE-1", body) for body in bodies))
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(201) == 1 and set(statuses) <= {200, 201, 409}, [a.text for a in answers]
    for answer in answers:
        if answer.status_code == 409:
            assert "being changed concurrently" in answer.json()["detail"]
    kept = [e.event_type for e in await enrollment.store.read_stream(f"patient-{subject}")]
    assert kept.count("AdverseEventReported") == 1
    assert kept.count("AdverseEventUpdated") == statuses.count(200)


async def test_a_serious_adverse_event_is_counted_on_metrics_once(enrollment: Enrollment) -> None:
    subject = await enrollment.enroll()
    before = await enrollment.serious_counted("3", "true")
    assert (await enrollment.report(subject, "SAE-1", SAE)).status_code == 201
    assert await enrollment.serious_counted("3", "true") == before + 1
    assert (await enrollment.report(subject, "SAE-1", {**SAE, "outcome": "recovered", "resolved_on": "2014-04-20"})).status_code == 200
    assert (await enrollment.report(subject, "AE-9", MINOR)).status_code == 201
    assert await enrollment.serious_counted("3", "true") == before + 1
    assert await enrollment.serious_counted("1", "false") >= 0  # every series exists from the start


async def test_asyncapi_declares_the_adverse_events(enrollment: Enrollment) -> None:
    document = (await enrollment.http.get(enrollment.url("/asyncapi.json"))).text
    for event_type in ("AdverseEventReported", "AdverseEventUpdated"):
        assert f"{enrollment.prefix}.enrollment.{event_type}" in document


async def test_erasure_makes_the_adverse_events_unreadable(enrollment: Enrollment) -> None:
    subject = await enrollment.enroll()
    assert (await enrollment.report(subject, "AE-1", {**SAE, "term": "erasable-pneumonia"})).status_code == 201
    withdrawn = await enrollment.http.post(enrollment.url(f"/v1/patients/{subject}/events"),
                                           json={"type": "withdrawn", "on": "2014-06-01"})
    assert withdrawn.status_code == 201, withdrawn.text
    erased = await enrollment.http.post(enrollment.url(f"/v1/patients/{subject}/erasure"))
    assert erased.status_code == 201, erased.text

    assert (await enrollment.http.get(enrollment.url(f"/v1/patients/{subject}"))).status_code == 404
    follow_up = await enrollment.report(subject, "AE-1", {**SAE, "term": "erasable-pneumonia", "outcome": "recovered"})
    assert (follow_up.status_code, follow_up.json()["code"]) == (404, "erased"), follow_up.text
    with pytest.raises(KeyErased):
        await _erased_read(enrollment, subject)
    engine = create_engine(enrollment.stack.database_urls["enrollment"])
    try:
        async with engine.connect() as connection:
            rows = (await connection.execute(
                select(events.c.payload).where(events.c.stream_id == f"patient-{subject}",
                                               events.c.event_type == "AdverseEventReported"))).scalars().all()
    finally:
        await engine.dispose()
    assert len(rows) == 1 and b"erasable-pneumonia" not in rows[0] and not is_json(rows[0])


async def _erased_read(enrollment: Enrollment, subject_id: str) -> None:
    for _ in range(100):  # the stack codec learns the erasure from the key bucket
        if enrollment.codec.is_erased(subject_id):
            break
        await asyncio.sleep(0.05)
    await enrollment.store.read_stream(f"patient-{subject_id}")
