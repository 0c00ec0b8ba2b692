"""Withdrawal of consent with erasure, end to end on the five services as processes over real
PostgreSQL and NATS: after the erasure, the patient's payloads are unreadable in every service's
store and on every stream, the lab messages that named them in clear (results the labs published
on ``labs.results``, refusals on ``labs.rejected`` and the labs stream) are deleted from the
broker, the logs did not shrink, the analyst API and a rebuild no longer know the patient, and
the other patient is untouched (docs/erasure.md)."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import uuid
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.js.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from sqlalchemy import func, select

from shared.broker import LAB_RESULTS_SUBJECT, Topology
from shared.database import create_engine
from shared.schema import events
from shared.sealing import SEALED_FIELD
from shared.settings import SERVICES
from tests.conftest import NATS_URL
from tests.keys import stack_codec
from tests.stack import Stack, eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

# Distinctive plaintext values, searched for in raw bytes afterwards — new in every run: labs
# consumes the server's shared `labs.results` stream from its start, so earlier runs' messages
# (other subjects, long erased, refused in clear) come back with the same values otherwise.
ERASED_LAB_VALUE = 1 + secrets.randbelow(10**6) / 10**7
KEPT_LAB_VALUE = 2 + secrets.randbelow(10**6) / 10**7


def enrollment(subject_id: str) -> dict[str, Any]:
    return {"subject_id": subject_id, "sex": "F", "age_years": 58, "weight_kg": 61.5, "group": "A",
            "enrolled_on": "2014-03-02", "baseline_egfr": 27.0, "lee_grade": "IV"}


def lab_result(subject_id: str, n: int, value: float) -> dict[str, Any]:
    return {"message_id": f"m-{subject_id}-{n}", "subject_id": subject_id, "lab_id": "lab-1", "loinc": "2160-0",
            "value": value, "unit": "mg/dL", "collected_at": f"201{5 + n}-06-01T08:30:00Z", "status": "final",
            "result_id": f"r-{subject_id}-{n}"}


async def record_history(http: httpx.AsyncClient, stack: Stack, subject_id: str, lab_value: float) -> None:
    """Enrollment, a pulse cycle, a harvest, release and infusion, two lab results."""
    async def post(service: str, path: str, body: dict[str, Any], status: int = 201) -> httpx.Response:
        response = await http.post(f"{stack.url(service)}{path}", json=body)
        assert response.status_code == status, response.text
        return response

    await post("enrollment", "/v1/patients", enrollment(subject_id))
    for day in (1, 2, 3):
        await post("pulse", f"/v1/patients/{subject_id}/pulse-doses",
                   {"cycle": 1, "day": day, "given_on": f"2014-03-1{day}", "dose_mg": 1000, "weight_kg": 61.5})
    lot_id = (await post("cells", f"/v1/patients/{subject_id}/harvests",
                         {"harvested_on": "2014-06-01", "fat_grams": 120})).json()["lot_id"]
    await post("cells", f"/v1/lots/{lot_id}/release", {"cell_count": 3.1e7, "viability_pct": 92})
    await post("cells", f"/v1/patients/{subject_id}/infusions",
               {"lot_id": lot_id, "given_on": "2014-07-01", "cell_count": 3.0e7})

    async def labs_knows() -> bool:  # else the results would be parked (202) until it does
        return (await http.get(f"{stack.url('labs')}/v1/patients/{subject_id}/results")).json()["enrolled"]

    await eventually(labs_knows, timeout=30)
    for n in (1, 2):
        await post("labs", "/v1/results", lab_result(subject_id, n, lab_value))


async def stored_payloads(stack: Stack, service: str) -> tuple[int, list[bytes]]:
    """(row count, raw payloads) of a service's ``events`` table."""
    engine = create_engine(stack.database_urls[service])
    try:
        async with engine.connect() as connection:
            count = await connection.scalar(select(func.count()).select_from(events))
            payloads = list((await connection.execute(select(events.c.payload))).scalars())
    finally:
        await engine.dispose()
    return count, payloads


async def publish_lab_input(js: Any, subject_id: str, value: float) -> None:
    """What a lab system sends on NATS: a result (contract JSON, ``Nats-Msg-Id``) and a result
    the labs service refuses (an unknown LOINC code), both naming the subject in clear."""
    for body in (lab_result(subject_id, 3, value), {**lab_result(subject_id, 4, value), "loinc": "9999-9"}):
        await js.publish(LAB_RESULTS_SUBJECT, json.dumps(body).encode(), headers={"Nats-Msg-Id": body["message_id"]})


async def stream_bodies(js: Any, stream: str, subject: str) -> list[bytes]:
    """Every message on ``subject`` in ``stream``, read with an ephemeral consumer (the lab
    streams are shared by every stack on the server, so they may be long)."""
    subscription = await js.pull_subscribe(
        subject, stream=stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, mem_storage=True,
                              inactive_threshold=30.0),
    )
    bodies: list[bytes] = []
    try:
        if (await subscription.consumer_info()).num_pending:
            while True:
                messages = await subscription.fetch(1000, timeout=5)
                bodies.extend(message.data for message in messages)
                if not messages[-1].metadata.num_pending:
                    break
    finally:
        await subscription.unsubscribe()
    return bodies


def naming(bodies: list[bytes], subject_id: str) -> list[bytes]:
    return [body for body in bodies if subject_id.encode() in body]


async def broker_bodies(js: Any, topology: Topology) -> list[bytes]:
    bodies = []
    for service in SERVICES:
        name = topology.service_stream(service).name
        state = (await js.stream_info(name)).state
        for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
            try:
                bodies.append((await js.get_msg(name, seq)).data)
            except nats.js.errors.NotFoundError:
                continue  # deleted (the erasure's purge of lab refusals)
    return bodies


def is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def mentions(data: bytes, subject_id: str, value: float) -> bool:
    return subject_id.encode() in data or repr(value).encode() in data


async def cohort_a(http: httpx.AsyncClient, stack: Stack) -> dict[str, Any]:
    rows = (await http.get(f"{stack.url('outcomes')}/v1/cohorts")).json()
    return next(row for row in rows if row["group"] == "A")


async def test_erasure_makes_a_patient_unreadable_everywhere_and_keeps_the_logs(tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    topology = Topology(prefix)
    stack = Stack(tmp_path, prefix, SERVICES, backend="postgresql")
    erased, kept = f"IGA-A-{uuid.uuid4().hex[:4]}-1", f"IGA-A-{uuid.uuid4().hex[:4]}-2"
    client = await nats.connect(NATS_URL)
    js = client.jetstream()
    try:
        await stack.start()
        async with stack_codec(prefix) as codec, stack.client(timeout=30) as http:
            await record_history(http, stack, erased, ERASED_LAB_VALUE)
            await record_history(http, stack, kept, KEPT_LAB_VALUE)
            for subject_id, value in ((erased, ERASED_LAB_VALUE), (kept, KEPT_LAB_VALUE)):
                await publish_lab_input(js, subject_id, value)
            outcomes = stack.url("outcomes")
            lab_streams = {  # stream -> the subject in it where lab messages travel in clear
                topology.lab_results_stream.name: LAB_RESULTS_SUBJECT,
                topology.lab_rejected_stream.name: "labs.rejected",
                topology.service_stream("labs").name: topology.event_subject("labs", "LabResultRejected"),
            }

            async def both_projected() -> bool:
                for subject_id in (erased, kept):
                    timeline = (await http.get(f"{outcomes}/v1/patients/{subject_id}")).json().get("timeline", [])
                    if [row["kind"] for row in timeline].count("egfr") != 3:
                        return False
                for stream, subject in lab_streams.items():  # the refusals are published too
                    bodies = await stream_bodies(js, stream, subject)
                    if not (naming(bodies, erased) and naming(bodies, kept)):
                        return False
                return (await cohort_a(http, stack))["n"] == 2

            await eventually(both_projected, timeout=60)
            kept_lab_messages = {
                stream: naming(await stream_bodies(js, stream, subject), kept) for stream, subject in lab_streams.items()
            }
            kept_before = (await http.get(f"{outcomes}/v1/patients/{kept}")).json()
            before = {service: (await stored_payloads(stack, service))[0] for service in SERVICES if service != "outcomes"}

            # Erasure needs a withdrawal first: refused with the reason, nothing recorded.
            refused = await http.post(f"{stack.url('enrollment')}/v1/patients/{erased}/erasure")
            assert refused.status_code == 409 and "has not withdrawn consent" in refused.json()["detail"]
            unknown = await http.post(f"{stack.url('enrollment')}/v1/patients/IGA-A-NOBODY-9/erasure")
            assert unknown.status_code == 404
            withdrawn = await http.post(f"{stack.url('enrollment')}/v1/patients/{erased}/events",
                                        json={"type": "withdrawn", "on": "2020-01-01"})
            assert withdrawn.status_code == 201, withdrawn.text
            done = await http.post(f"{stack.url('enrollment')}/v1/patients/{erased}/erasure")
            assert done.status_code == 201, done.text
            again = await http.post(f"{stack.url('enrollment')}/v1/patients/{erased}/erasure")
            assert again.status_code == 200 and again.json()["event_id"] == done.json()["event_id"]
            assert done.json()["subject_id"] == erased

            # The analyst API forgets the patient; the other is untouched.
            async def forgotten() -> bool:
                return (await http.get(f"{outcomes}/v1/patients/{erased}")).status_code == 404 and (
                    (await cohort_a(http, stack))["n"] == 1
                )

            await eventually(forgotten, timeout=30)
            assert (await http.get(f"{outcomes}/v1/patients/{kept}")).json() == kept_before
            csv = (await http.get(f"{outcomes}/v1/export/patients.csv")).text
            assert erased not in csv and kept in csv
            for service in ("enrollment", "pulse", "cells", "labs"):  # the services' own reads: 404
                path = {"enrollment": f"/v1/patients/{erased}", "pulse": f"/v1/patients/{erased}/pulse-cycles",
                        "cells": f"/v1/patients/{erased}/infusions", "labs": f"/v1/results/r-{erased}-1"}[service]
                response = await http.get(f"{stack.url(service)}{path}")
                assert response.status_code == 404, (service, response.text)
            assert (await http.post(f"{stack.url('enrollment')}/v1/patients", json=enrollment(erased))).status_code == 409

            # The lab messages that named the patient in clear are deleted from the broker (the
            # labs stream's other events are its log, sealed: checked below); the other
            # patient's are all still there.
            async def purged() -> dict[str, Any] | None:
                jobs = (await http.get(f"{stack.url('labs')}/v1/admin/erasures")).json()
                job = next((job for job in jobs if job["subject_id"] == erased), None)
                return job if job and job["status"] == "done" else None

            job = await eventually(purged, timeout=60)
            assert job["deleted"]["labs_results"] >= 2 and job["deleted"]["labs_rejected"] >= 1, job
            assert job["deleted"]["labs_events"] >= 1, job
            for stream, subject in lab_streams.items():
                bodies = await stream_bodies(js, stream, subject)
                assert not naming(bodies, erased), f"{stream} still names the erased patient"
                assert naming(bodies, kept) == kept_lab_messages[stream], f"{stream} lost the other patient's messages"
            metrics_text = (await http.get(f"{stack.url('labs')}/metrics")).text
            assert 'nephrotrack_erasure_purge_deleted_messages_total{stream="labs_results"}' in metrics_text
            assert "nephrotrack_erasure_purges_pending 0.0" in metrics_text

            # Nothing readable is left of the patient: stores and streams hold only sealed blobs
            # (besides the clear erasure event, which carries the pseudonym and a date), and the
            # logs did not shrink.
            await asyncio.sleep(0.5)
            for service, count in before.items():
                now, payloads = await stored_payloads(stack, service)
                assert now >= count, f"{service}'s log shrank"
                readable = [p for p in payloads if is_json(p) and mentions(p, erased, ERASED_LAB_VALUE)]
                if service == "enrollment":  # only the erasure event itself
                    assert len(readable) == 1
                    assert set(json.loads(readable[0])) == {"subject_id", "erased_on"}
                else:
                    assert not readable, f"{service} keeps a readable payload of the erased patient"
                sealed = [p for p in payloads if not is_json(p)]
                assert sealed and all(repr(ERASED_LAB_VALUE).encode() not in p for p in sealed)
            for body in await broker_bodies(js, topology):
                envelope = json.loads(body)
                payload = envelope["payload"]
                if envelope["event_type"] == "PatientDataErased":
                    assert set(payload) == {"subject_id", "erased_on"}
                    continue
                if SEALED_FIELD in payload:
                    blob = base64.b64decode(payload[SEALED_FIELD])
                    assert not is_json(blob) and repr(ERASED_LAB_VALUE).encode() not in blob
                else:
                    assert not mentions(json.dumps(payload).encode(), erased, ERASED_LAB_VALUE), envelope["event_type"]
            assert codec.is_erased(erased) or await _erased_within(codec, erased)

            # A rebuild equals the live projection without the patient, and says what it skipped.
            live_cohorts = (await http.get(f"{outcomes}/v1/cohorts")).json()
            assert (await http.post(f"{outcomes}/v1/admin/rebuild")).status_code == 202

            async def rebuilt() -> dict[str, Any] | None:
                status = (await http.get(f"{outcomes}/v1/admin/rebuild")).json()
                return status if status["progress"]["phase"] in ("done", "failed") else None

            status = await eventually(rebuilt, timeout=60)
            assert status["progress"]["phase"] == "done", status
            assert status["progress"]["skipped_erased"] > 0
            assert (await http.get(f"{outcomes}/v1/cohorts")).json() == live_cohorts
            assert (await http.get(f"{outcomes}/v1/patients/{erased}")).status_code == 404
            assert (await http.get(f"{outcomes}/v1/patients/{kept}")).json() == kept_before

            # A result about the erased patient that arrives later is refused at once, naming no
            # one: not parked (which would end in an unknown_subject refusal naming them).
            late = await http.post(f"{stack.url('labs')}/v1/results", json=lab_result(erased, 3, 3.4567))
            assert late.status_code == 422 and "erased" in late.json()["detail"], late.text
            assert erased not in late.text
            rejections = (await http.get(f"{stack.url('labs')}/v1/rejections")).json()
            assert any(item["code"] == "subject_erased" for item in rejections), rejections
            assert all(erased not in json.dumps(item) for item in rejections), rejections  # unknown_loinc's row too
            assert any(kept in json.dumps(item) for item in rejections), rejections
    finally:
        await stack.stop()
        for name in [s.config.name for s in await js.streams_info()]:
            if name.startswith(prefix.upper()):
                await js.delete_stream(name)
        await client.drain()


async def _erased_within(codec: Any, subject_id: str, seconds: float = 5.0) -> bool:
    for _ in range(int(seconds / 0.05)):
        if codec.is_erased(subject_id):
            return True
        await asyncio.sleep(0.05)
    return False
