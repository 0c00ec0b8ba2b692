"""Whole-message refusals are the patient's data too (docs/erasure.md): an input refused as a
whole on any channel — an HL7 message with a bad MSH-10, an invalid FHIR resource, malformed
JSON on ``labs.results`` or ``POST /v1/results`` — is recorded with the subject it names, so it
is stored sealed with the patient's key and goes at erasure: ``GET /v1/rejections`` no longer
shows its raw text, subject id or value. One arriving after the erasure names no one.

Enrollment and labs run in the test's event loop (tests/inprocess.py), on PostgreSQL, over the
machine's NATS (``labs.results`` and ``labs.rejected`` are shared with every stack on it: each
test looks only at its own marker)."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.js.errors
import pytest
from sqlalchemy import or_, select

from services.labs.tables import lab_rejections
from shared.broker import LAB_RESULTS_SUBJECT, Topology
from shared.database import create_engine
from shared.schema import events
from shared.sealing import sealed_subject
from tests.inprocess import databases, pseudonym, running
from tests.stack import eventually

pytestmark = pytest.mark.timeout(180)

VALUE = 7.6543  # a distinctive value, looked for in what stays
BACKLOG_WAIT = 90.0
"""Seconds a message on the shared ``labs.results`` may wait: a new labs consumer first works
through every other stack's messages there."""


def new_marker() -> str:
    """A unique text to find an input by, that redaction keeps (no run of digits, no name)."""
    return f"MARK-{uuid.uuid4().hex.upper().translate(str.maketrans('0123456789', 'GHIJKLMNOP'))}-1"


def observation(subject_id: str, marker: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "identifier": [{"value": marker}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]},
            "subject": {"reference": f"Patient/{subject_id}"}, "effectiveDateTime": "2015-06-01T08:30:00Z",
            "valueQuantity": {"value": VALUE, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}}


def result_json(subject_id: str, marker: str) -> str:
    return json.dumps({"message_id": marker, "subject_id": subject_id, "lab_id": "lab-1", "loinc": "2160-0",
                       "value": VALUE, "unit": "mg/dL", "collected_at": "2016-06-01T08:30:00Z", "status": "final",
                       "result_id": marker})


def oru_with_bad_control_id(subject_id: str, marker: str) -> str:
    return "\r".join([
        f"MSH|^~\\&|LIS|LAB|NT|STUDY|20150601093000||ORU^R01|bad id {marker}|P|2.5.1",
        f"PID|1||{subject_id}^^^STUDY^PI~MRN-1234",
        "OBR|1||F1|2160-0^Creatinine^LN|||201506010830",
        f"OBX|1|NM|2160-0^Creatinine^LN||{VALUE}|mg/dL|||||F|||201506010830||||||||{marker}",
    ]) + "\r"


Send = Callable[[httpx.AsyncClient, nats.NATS, str, str], Awaitable[None]]


async def via_mllp(labs: httpx.AsyncClient, nc: nats.NATS, subject_id: str, marker: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", int(os.environ["NEPHROTRACK_MLLP_PORT"]))
    try:
        writer.write(b"\x0b" + oru_with_bad_control_id(subject_id, marker).encode() + b"\x1c\r")
        ack = (await reader.readuntil(b"\x1c\r")).decode()
    finally:
        writer.close()
    assert "|AR|" in ack and "bad_control_id" in ack, ack


async def invalid_fhir(labs: httpx.AsyncClient, nc: nats.NATS, subject_id: str, marker: str) -> None:
    body = {**observation(subject_id, marker), "status": ["final"]}  # a code must be a string
    response = await labs.post("/fhir/Observation", json=body, headers={"content-type": "application/fhir+json"})
    assert response.status_code == 400 and "invalid Observation" in response.text, response.text


async def malformed_fhir(labs: httpx.AsyncClient, nc: nats.NATS, subject_id: str, marker: str) -> None:
    body = json.dumps(observation(subject_id, marker))[:-12]
    response = await labs.post("/fhir/Observation", content=body, headers={"content-type": "application/fhir+json"})
    assert response.status_code == 400 and "malformed JSON" in response.text, response.text


async def malformed_json_on_the_broker(labs: httpx.AsyncClient, nc: nats.NATS, subject_id: str, marker: str) -> None:
    await nc.jetstream().publish(LAB_RESULTS_SUBJECT, result_json(subject_id, marker)[:-20].encode(),
                                 headers={"Nats-Msg-Id": marker})


async def malformed_json_over_http(labs: httpx.AsyncClient, nc: nats.NATS, subject_id: str, marker: str) -> None:
    response = await labs.post("/v1/results", content=result_json(subject_id, marker)[:-20],
                               headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["code"] == "malformed_json", response.text


CHANNELS: dict[str, Send] = {
    "hl7-bad-msh-10": via_mllp, "fhir-invalid": invalid_fhir, "fhir-malformed": malformed_fhir,
    "broker-malformed": malformed_json_on_the_broker, "http-malformed": malformed_json_over_http,
}


def enrollment_body(subject_id: str) -> dict[str, Any]:
    return {"subject_id": subject_id, "sex": "F", "age_years": 58, "weight_kg": 61.5, "group": "A",
            "enrolled_on": "2014-03-02", "baseline_egfr": 27.0, "lee_grade": "IV"}


async def logged(database_url: str, text: str) -> list[dict[str, Any]]:
    """The rows of the rejection log — what ``GET /v1/rejections`` shows — that hold ``text``.
    Read from its table: the labs consumer of the shared ``labs.results`` may log thousands of
    other stacks' refusals meanwhile, more than one page of the endpoint shows."""
    columns = (lab_rejections.c.raw_preview, lab_rejections.c.message_id, lab_rejections.c.reason,
               lab_rejections.c.subject_id)
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(select(lab_rejections).where(or_(*(c.contains(text) for c in columns))))
            return [dict(row._mapping) for row in rows]
    finally:
        await engine.dispose()


async def stored_payload(database_url: str, event_id: uuid.UUID) -> bytes:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            return await connection.scalar(select(events.c.payload).where(events.c.event_id == event_id))
    finally:
        await engine.dispose()


@pytest.fixture
async def urls(tmp_path: Path, prefix: str, nats_client: nats.NATS, monkeypatch: pytest.MonkeyPatch) -> Any:
    async with databases(("enrollment", "labs"), backend="postgresql", tmp_path=tmp_path, prefix=prefix,
                         monkeypatch=monkeypatch) as found:
        yield found


@pytest.mark.parametrize("channel", CHANNELS)
async def test_a_whole_message_refusal_is_sealed_with_its_patient_and_erased_with_them(
    channel: str, urls: dict[str, str], prefix: str, nats_client: nats.NATS,
) -> None:
    subject, marker = pseudonym(prefix, 1), new_marker()
    send = CHANNELS[channel]
    async with running("enrollment", urls["enrollment"]) as (_, enrollment), running("labs", urls["labs"]) as (_, labs):
        enrolled = await enrollment.post("/v1/patients", json=enrollment_body(subject))
        assert enrolled.status_code == 201, enrolled.text
        await send(labs, nats_client, subject, marker)

        (row,) = await eventually(lambda: logged(urls["labs"], marker), timeout=BACKLOG_WAIT)
        assert row["subject_id"] == subject, row
        stored = await stored_payload(urls["labs"], row["event_id"])
        assert sealed_subject(stored) == subject and marker.encode() not in stored  # sealed with the patient's key

        withdrawn = await enrollment.post(f"/v1/patients/{subject}/events", json={"type": "withdrawn", "on": "2020-01-01"})
        assert withdrawn.status_code == 201, withdrawn.text
        assert (await enrollment.post(f"/v1/patients/{subject}/erasure")).status_code == 201

        async def purged() -> dict[str, Any] | None:
            jobs = (await labs.get("/v1/admin/erasures")).json()
            return next((job for job in jobs if job["subject_id"] == subject and job["status"] == "done"), None)

        job = await eventually(purged, timeout=60)
        assert job["deleted"]["labs_rejected"] >= 1, job  # the clear copy on labs.rejected went too
        assert await logged(urls["labs"], marker) == [] and await logged(urls["labs"], subject) == []
        shown = json.dumps((await labs.get("/v1/rejections", params={"limit": 1000})).json())
        assert marker not in shown and subject not in shown and repr(VALUE) not in shown
        assert await stored_payload(urls["labs"], row["event_id"]) == stored  # the log keeps it, unreadable


async def test_a_whole_message_refusal_about_an_erased_patient_names_no_one(
    urls: dict[str, str], prefix: str, nats_client: nats.NATS,
) -> None:
    """Refused without recording the erased patient's id, as a result about them is
    (``subject_erased``), and its copy on ``labs.results`` is deleted."""
    subject, marker = pseudonym(prefix, 2), new_marker()
    async with running("enrollment", urls["enrollment"]) as (_, enrollment), running("labs", urls["labs"]) as (_, labs):
        assert (await enrollment.post("/v1/patients", json=enrollment_body(subject))).status_code == 201
        await enrollment.post(f"/v1/patients/{subject}/events", json={"type": "withdrawn", "on": "2020-01-01"})
        assert (await enrollment.post(f"/v1/patients/{subject}/erasure")).status_code == 201
        # The erasure's purge of earlier copies done: it scans the streams up to where they were
        # when it began, so a message published before that would be purged, not refused.
        await eventually(lambda: _erased_in_labs(labs, subject))

        js = nats_client.jetstream()
        sent = await js.publish(LAB_RESULTS_SUBJECT, result_json(subject, marker)[:-20].encode(),
                                headers={"Nats-Msg-Id": marker})
        (row,) = await eventually(lambda: logged(urls["labs"], marker), timeout=BACKLOG_WAIT)
        assert row["subject_id"] is None and subject not in json.dumps(row, default=str), row

        async def inbound_copy_gone() -> bool:
            try:
                await js.get_msg(Topology(prefix).lab_results_stream.name, sent.seq)
            except nats.js.errors.NotFoundError:
                return True
            return False

        await eventually(inbound_copy_gone)


async def _erased_in_labs(labs: httpx.AsyncClient, subject_id: str) -> bool:
    jobs = (await labs.get("/v1/admin/erasures")).json()
    return any(job["subject_id"] == subject_id and job["status"] == "done" for job in jobs)
