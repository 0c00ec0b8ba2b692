"""The labs service end to end: enrollment and labs as real processes (``tests/stack.py``) over the
machine's NATS, on PostgreSQL and on SQLite. Results go in through the contract's three inputs
(JSON on ``labs.results``, HL7 v2 ORU^R01 over a real MLLP socket with python-hl7's client, FHIR
R4 over HTTP) and come out as events on the broker; every refusal is checked on ``labs.rejected``.

``labs.results`` and ``labs.rejected`` are fixed by the contract, so every stack on this NATS
shares them: each test uses its own subject ids (with the stack's prefix) and only ever looks at
its own messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import random
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.operationoutcome import OperationOutcome
from hl7.client import MLLPClient

from services.labs.egfr import ckd_epi_2021
from shared.broker import LAB_REJECTED_SUBJECT, LAB_RESULTS_SUBJECT, Topology
from shared.store import EventStore, open_store
from tests.conftest import BACKENDS, NATS_URL
from tests.keys import stack_codec
from tests.stack import Stack, eventually

pytestmark = pytest.mark.slow

_numbers = itertools.count(1)
_LETTERS = str.maketrans("0123456789", "ghijklmnop")


@dataclass
class Labs:
    stack: Stack
    prefix: str
    http: httpx.AsyncClient
    nc: Any
    store: EventStore
    published: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)

    def subject(self) -> str:
        # Enrollment refuses ids that look like record numbers (6+ digits in a row): the prefix's
        # digits become letters.
        return f"S-{self.prefix.translate(_LETTERS)}-{next(_numbers):03d}"

    def unique(self, what: str) -> str:
        return f"{what}-{self.prefix}-{next(_numbers)}"

    async def enroll(self, subject_id: str, sex: str = "F", age_years: int = 58, enrolled_on: str = "2014-03-02") -> None:
        body = {"subject_id": subject_id, "sex": sex, "age_years": age_years, "weight_kg": 61.5, "group": "A",
                "enrolled_on": enrolled_on, "baseline_egfr": 27.0, "lee_grade": "IV"}
        response = await self.http.post(f"{self.stack.url('enrollment')}/v1/patients", json=body)
        assert response.status_code == 201, response.text
        # labs learns the patient from enrollment's PatientEnrolled, through the broker
        await eventually(lambda: self.enrolled(subject_id))

    async def enrolled_subject(self) -> str:
        """A new subject id, enrolled (F, 58, on 2014-03-02) and known to labs."""
        subject_id = self.subject()
        await self.enroll(subject_id)
        return subject_id

    async def enrolled(self, subject_id: str) -> bool:
        view = await self.get(f"/v1/patients/{subject_id}/results")
        return view.json()["enrolled"]

    async def get(self, path: str) -> httpx.Response:
        return await self.http.get(f"{self.stack.url('labs')}{path}")

    async def post(self, path: str, body: Any, content_type: str = "application/fhir+json") -> httpx.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.http.post(f"{self.stack.url('labs')}{path}", content=data,
                                    headers={"content-type": content_type})

    async def egfr(self, result_id: str, count: int = 1) -> list[dict[str, Any]]:
        """The ``EgfrComputed`` payloads published for ``result_id`` once there are ``count``."""
        return await self.events("EgfrComputed", result_id, count)

    async def events(self, event_type: str, result_id: str, count: int = 1) -> list[dict[str, Any]]:
        """The payloads of ``event_type`` published for ``result_id`` once there are ``count``."""

        async def check() -> list[dict[str, Any]]:
            found = [m["payload"] for m in self.published
                     if m["event_type"] == event_type and m["payload"]["result_id"] == result_id]
            return found if len(found) >= count else []

        return await eventually(check)

    async def rejection(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            return next((m["payload"] for m in self.rejected if match(m["payload"])), None)

        return await eventually(check)

    async def send_json(self, body: dict[str, Any], msg_id: str | None = None) -> None:
        js = self.nc.jetstream()
        await js.publish(LAB_RESULTS_SUBJECT, json.dumps(body).encode(),
                         headers={"Nats-Msg-Id": msg_id or body["message_id"]})

    async def mllp(self, message: str | bytes) -> str:
        """Send one message with python-hl7's (blocking) MLLP client, in a thread; the ACK text."""

        def call() -> str:
            with MLLPClient("127.0.0.1", self.stack.mllp_port) as client:
                client.socket.settimeout(30)
                return read_frame(client.socket, client.send_message(message))

        return await asyncio.to_thread(call)

    async def raw_mllp(self, data: bytes, *, shutdown: bool = False, frames: int = 1) -> bytes:
        """Write bytes on a fresh connection; what comes back until the server closes or
        ``frames`` ACK frames are complete."""

        def call() -> bytes:
            with socket.create_connection(("127.0.0.1", self.stack.mllp_port), timeout=30) as sock:
                sock.sendall(data)
                if shutdown:
                    sock.shutdown(socket.SHUT_WR)
                received = b""
                while received.count(b"\x1c\r") < frames:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    received += chunk
                return received

        return await asyncio.to_thread(call)

    async def metric(self, name: str, **labels: str) -> float:
        text = (await self.get("/metrics")).text
        wanted = "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
        for line in text.splitlines():
            if line.startswith(name + "{") and _labels(line) == wanted:
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def _labels(line: str) -> str:
    inner = line[line.index("{") + 1 : line.index("}")]
    return "{" + ",".join(sorted(inner.split(","))) + "}"


def read_frame(sock: socket.socket, first: bytes) -> str:
    data = first
    while not data.endswith(b"\x1c\r"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    assert data.startswith(b"\x0b") and data.endswith(b"\x1c\r"), data
    return data[1:-2].decode("ascii")


@pytest.fixture(scope="module", params=BACKENDS)
async def labs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Labs]:
    backend = request.param
    prefix = f"t{uuid.uuid4().hex[:10]}"
    tmp_path: Path = tmp_path_factory.mktemp(f"labs-{backend}")
    stack = Stack(tmp_path, prefix, ["enrollment", "labs"], backend=backend)
    nc = await nats.connect(NATS_URL)
    store: EventStore | None = None
    try:
        await stack.start()
        async with stack_codec(prefix) as codec, stack.client(timeout=30) as http:
            store = open_store(stack.database_urls["labs"], codec=codec)
            labs = Labs(stack, prefix, http, nc, store)

            async def on_event(msg: Any) -> None:  # payloads opened as the services open them
                labs.published.append(codec.open(msg.data).model_dump(mode="json"))

            async def on_rejected(msg: Any) -> None:
                labs.rejected.append(json.loads(msg.data))

            await nc.subscribe(f"{prefix}.labs.>", cb=on_event)
            await nc.subscribe(LAB_REJECTED_SUBJECT, cb=on_rejected)
            yield labs
    finally:
        if store is not None:
            await store.close()
        await stack.stop()
        js = nc.jetstream()
        for name in [s.config.name for s in await js.streams_info()]:
            if name.startswith(prefix.upper()):
                await js.delete_stream(name)
        await forget_lab_consumer(js, prefix)
        await nc.drain()


async def forget_lab_consumer(js: Any, prefix: str) -> None:
    """The stack's durable consumer on the shared LABS_RESULTS stream outlives its stack; left
    there, every later message on ``labs.results`` would be tracked for it forever."""
    with contextlib.suppress(Exception):
        await js.delete_consumer(Topology(prefix).lab_results_stream.name, f"{prefix}-labs-results")


def lab_json(labs: Labs, subject_id: str, **changes: Any) -> dict[str, Any]:
    body = {"message_id": labs.unique("msg"), "subject_id": subject_id, "lab_id": "LAB1", "loinc": "2160-0",
            "value": 2.1, "unit": "mg/dL", "collected_at": "2015-06-01T08:30:00Z", "status": "final",
            "result_id": labs.unique("res")}
    return {**body, **changes}


# --------------------------------------------------------------------------- HL7 v2 messages


def seg(name: str, fields: dict[int, str]) -> str:
    return "|".join([name] + [fields.get(number, "") for number in range(1, max(fields) + 1)])


def obx(set_id: int, code: str, value: str, unit: str, status: str = "F", observed: str = "", instance: str = "") -> str:
    return seg("OBX", {1: str(set_id), 2: "NM", 3: code, 5: value, 6: unit, 11: status, 14: observed, 21: instance})


def oru_v25(control_id: str, subject_id: str, filler: str, *observations: str) -> str:
    return "\r".join([
        f"MSH|^~\\&|LIS|CENTRAL LAB|NEPHROTRACK|STUDY|20150601093000+0200||ORU^R01^ORU_R01|{control_id}|P|2.5.1"
        "|||AL|NE||UNICODE UTF-8",
        seg("PID", {1: "1", 3: f"{subject_id}^^^STUDY^PI", 5: "PSEUDONYM^SUBJECT"}),
        seg("PV1", {1: "1", 2: "O"}),
        seg("ORC", {1: "RE", 2: "ORD1^NEPHRO", 3: f"{filler}^LIS"}),
        seg("OBR", {1: "1", 2: "ORD1^NEPHRO", 3: f"{filler}^LIS", 4: "24362-6^Renal function panel^LN",
                    7: "20150601083000+0200"}),
        *observations,
    ]) + "\r"


def oru_v23(control_id: str, subject_id: str, filler: str, *observations: str) -> str:
    return "\r".join([
        f"MSH|^~\\&|LABSYS|SOUTH LAB|NT|STUDY|201506020915||ORU^R01|{control_id}|P|2.3",
        seg("PID", {1: "1", 3: subject_id, 5: "PSEUDONYM"}),
        seg("OBR", {1: "1", 3: filler, 4: "2160-0^Creatinine^LN", 7: "201506010830"}),
        *observations,
    ]) + "\r"


def segment(ack: str, name: str) -> list[str]:
    return [s for s in ack.split("\r") if s.startswith(name + "|")]


# --------------------------------------------------------------------------- broker


async def test_json_on_labs_results_becomes_egfr_on_the_broker_once(labs: Labs) -> None:
    subject = labs.subject()
    await labs.enroll(subject)
    body = lab_json(labs, subject, collected_at="2016-03-02T08:00:00Z")  # second anniversary: age 60
    await labs.send_json(body)
    await labs.send_json(body)  # the same message again: one effect
    (computed,) = await labs.egfr(body["result_id"])
    assert computed["egfr"] == ckd_epi_2021(2.1, 60, "F")
    assert (computed["age_years"], computed["counted"], computed["source"]) == (60, True, "broker")

    correction = lab_json(labs, subject, result_id=body["result_id"], status="corrected", value=1.8,
                          collected_at="2016-03-02T08:00:00Z")
    await labs.send_json(correction)
    first, second = await labs.egfr(body["result_id"], 2)
    assert second["egfr"] == ckd_epi_2021(1.8, 60, "F") and second["status"] == "corrected"

    view = (await labs.get(f"/v1/results/{body['result_id']}")).json()
    assert [h["event_type"] for h in view["history"]] == [
        "LabResultRecorded", "EgfrComputed", "LabResultRecorded", "LabResultCorrected", "EgfrComputed"]
    assert view["effective"]["egfr"] == second["egfr"]
    patient = (await labs.get(f"/v1/patients/{subject}/results")).json()
    assert [r["result_id"] for r in patient["results"]] == [body["result_id"]]
    assert (await labs.get(f"/v1/results/{labs.unique('nothing')}")).status_code == 404


async def test_a_result_before_the_enrollment_is_parked_then_recorded(labs: Labs) -> None:
    subject = labs.subject()
    body = lab_json(labs, subject)
    await labs.send_json(body)

    async def parked() -> bool:
        view = (await labs.get(f"/v1/patients/{subject}/results")).json()
        return [p["message_id"] for p in view["parked"]] == [body["message_id"]]

    await eventually(parked)
    await labs.enroll(subject, sex="M", age_years=40, enrolled_on="2015-01-01")
    (computed,) = await labs.egfr(body["result_id"])
    assert computed["egfr"] == ckd_epi_2021(2.1, 40, "M")
    assert (await labs.get(f"/v1/patients/{subject}/results")).json()["parked"] == []


async def test_broker_refusals_are_published_with_raw_payload_and_reason(labs: Labs) -> None:
    subject = labs.subject()
    await labs.enroll(subject)
    bad_unit = lab_json(labs, subject, unit="g/L")
    await labs.send_json(bad_unit)
    rejection = await labs.rejection(lambda r: r["message_id"] == bad_unit["message_id"])
    assert (rejection["source"], rejection["code"]) == ("broker", "unit_mismatch")
    assert "'g/L'" in rejection["reason"]
    assert json.loads(rejection["raw"]) == bad_unit

    garbage_id = labs.unique("garbage")
    await labs.nc.jetstream().publish(LAB_RESULTS_SUBJECT, b"\xff\xfe not json " + garbage_id.encode(),
                                      headers={"Nats-Msg-Id": garbage_id})
    rejection = await labs.rejection(lambda r: garbage_id in r["raw"])
    assert (rejection["source"], rejection["code"]) == ("broker", "bad_encoding")
    assert rejection["raw"].startswith("\\xff\\xfe not json")

    listed = (await labs.get("/v1/rejections?limit=1000&source=broker")).json()
    assert {"unit_mismatch", "bad_encoding"} <= {r["code"] for r in listed}
    assert await labs.metric("nephrotrack_lab_results_rejected_total", source="broker", reason="unit_mismatch") >= 1


async def test_post_v1_results_takes_the_contract_json_over_http(labs: Labs) -> None:
    subject = labs.subject()
    await labs.enroll(subject)
    body = lab_json(labs, subject, loinc="98979-8", value=27.4, unit="mL/min/1.73m2")
    first = await labs.post("/v1/results", body, "application/json")
    assert first.status_code == 201, first.text
    assert first.json()["events"] == ["LabResultRecorded", "EgfrComputed"]
    again = await labs.post("/v1/results", body, "application/json")
    assert (again.status_code, again.json()["outcome"]) == (200, "duplicate")
    bad = await labs.post("/v1/results", {**body, "message_id": labs.unique("m"), "status": "final?"}, "application/json")
    assert bad.status_code == 422 and "status" in bad.json()["detail"]
    (computed,) = await labs.egfr(body["result_id"])
    assert (computed["egfr"], computed["derived_from"]) == (27.4, "reported")


async def test_a_result_collected_before_1900_is_refused_on_labs_rejected(labs: Labs) -> None:
    subject = labs.subject()
    await labs.enroll(subject, enrolled_on="1900-01-01")
    early = lab_json(labs, subject, collected_at="1899-12-31T23:59:00Z")
    refused = await labs.post("/v1/results", early, "application/json")
    assert refused.status_code == 422, refused.text
    reason = "collected_at 1899-12-31T23:59:00+00:00 is before 1900-01-01, the earliest clinical date accepted"
    assert reason in refused.json()["detail"]
    rejection = await labs.rejection(lambda r: r["message_id"] == early["message_id"])
    assert (rejection["code"], rejection["reason"]) == ("collected_too_early", reason)
    on_the_bound = lab_json(labs, subject, collected_at="1900-01-01T00:00:00Z")
    assert (await labs.post("/v1/results", on_the_bound, "application/json")).status_code == 201


# --------------------------------------------------------------------------- HL7 v2 over MLLP


async def test_hl7_v25_and_v23_oru_r01_over_mllp_are_acknowledged_aa(labs: Labs) -> None:
    subject_a, subject_b = labs.subject(), labs.subject()
    await labs.enroll(subject_a)
    await labs.enroll(subject_b, sex="M", age_years=50, enrolled_on="2014-01-01")
    filler = labs.unique("FIL")
    control = labs.unique("MSG")
    v25 = oru_v25(
        control, subject_a, filler,
        obx(1, "2160-0^Creatinine [Mass/volume] in Serum or Plasma^LN", "2.1", "mg/dL^mg/dL^UCUM",
            observed="20150601083000+0200"),
        obx(2, "98979-8^eGFR CKD-EPI 2021^LN", "27.4", "mL/min/{1.73_m2}", observed="20150601083000+0200"),
    )
    ack = await labs.mllp(v25)
    (msa,) = segment(ack, "MSA")
    assert msa.split("|")[1:3] == ["AA", control]
    assert segment(ack, "MSH")[0].split("|")[8] == "ACK^R01^ACK"
    (creatinine,) = await labs.egfr(f"{filler}-2160-0")
    assert creatinine["egfr"] == ckd_epi_2021(2.1, 59, "F") and creatinine["source"] == "mllp"
    (reported,) = await labs.egfr(f"{filler}-98979-8")
    assert reported["egfr"] == 27.4

    assert (await labs.mllp(v25)).split("\r")[1].startswith("MSA|AA|")  # resent: AA, no new effect
    await asyncio.sleep(0.5)
    assert len(await labs.egfr(f"{filler}-2160-0")) == 1

    filler23, control23 = labs.unique("F23"), labs.unique("A23")
    v23 = oru_v23(control23, subject_b, filler23, obx(1, "2160-0^Creatinine^LN", "1.9", "MG/DL", "C"))
    ack23 = await labs.mllp(v23)
    assert segment(ack23, "MSA")[0].split("|")[1:3] == ["AA", control23]
    assert segment(ack23, "MSH")[0].split("|")[11] == "2.3"
    (corrected,) = await labs.egfr(f"{filler23}-2160-0")
    assert (corrected["status"], corrected["egfr"]) == ("corrected", ckd_epi_2021(1.9, 51, "M"))


async def test_one_bad_obx_is_answered_ae_with_the_reason_and_published(labs: Labs) -> None:
    subject = labs.subject()
    await labs.enroll(subject)
    filler, control = labs.unique("FIL"), labs.unique("MSG")
    message = oru_v25(
        control, subject, filler,
        obx(1, "2160-0^Creatinine^LN", "2.0", "mg/dL"),
        obx(2, "2345-7^Glucose^LN", "95", "mg/dL"),
        obx(3, "14682-9^Creatinine^LN", "abc", "umol/L", instance=labs.unique("I")),
    )
    ack = await labs.mllp(message)
    (msa,) = segment(ack, "MSA")
    assert msa.split("|")[1:3] == ["AE", control]
    assert "OBX 2: LOINC '2345-7' is not an accepted analyte" in msa
    errors = segment(ack, "ERR")
    assert [e.split("|")[2] for e in errors] == ["OBX^2^3", "OBX^3^5"]
    assert [e.split("|")[5] for e in errors] == ["unknown_loinc", "not_a_number"]
    (good,) = await labs.egfr(f"{filler}-2160-0")
    assert good["creatinine_mg_dl"] == 2.0
    rejection = await labs.rejection(lambda r: r["message_id"] == control and r["code"] == "unknown_loinc")
    assert rejection["source"] == "mllp" and rejection["reason"].startswith("OBX 2: ")
    # the raw message, with the patient name redacted (services/labs/redaction.py)
    assert rejection["raw"] == message.rstrip("\r").replace("PSEUDONYM^SUBJECT", "[redacted]")
    await labs.rejection(lambda r: r["message_id"] == control and r["code"] == "not_a_number")

    future = oru_v25(labs.unique("MSG"), subject, labs.unique("FIL"),
                     obx(1, "2160-0^Creatinine^LN", "2.0", "mg/dL", observed="20990101000000+0000"))
    ack = await labs.mllp(future)
    assert segment(ack, "MSA")[0].startswith("MSA|AE|") and "in the future" in ack
    assert segment(ack, "ERR")[0].split("|")[2] == "OBX^1"


async def test_escape_sequences_labs_does_not_decode_are_refused_not_dropped(labs: Labs) -> None:
    """``1\\Z5`` was read as the value 1 and ``<subject>\\Z...`` as a cut subject id (another
    patient); python-hl7 also logged the whole field of a sequence it dropped."""
    subject = labs.subject()
    await labs.enroll(subject)
    filler, control = labs.unique("FIL"), labs.unique("MSG")
    ack = await labs.mllp(oru_v25(control, subject, filler, obx(1, "2160-0^Creatinine^LN", "1\\Z5", "mg/dL"),
                                  obx(2, "98979-8^eGFR^LN", "4\\X35\\", "mL/min/1.73m2")))
    (msa,) = segment(ack, "MSA")
    assert msa.startswith(f"MSA|AE|{control}|OBX 1: OBX-5 has an escape sequence that is never closed")
    assert [e.split("|")[2] for e in segment(ack, "ERR")] == ["OBX^1^5"]
    assert (await labs.egfr(f"{filler}-98979-8"))[0]["egfr"] == 45.0  # \X35\ is "5": decoded
    assert (await labs.rejection(lambda r: r["message_id"] == control))["code"] == "bad_escape"

    cut, control = subject[:5], labs.unique("MSG")  # what python-hl7 left of PID-3
    ack = await labs.mllp(oru_v25(control, f"{cut}\\Z\\{subject[5:]}", labs.unique("FIL"),
                                  obx(1, "2160-0^Creatinine^LN", "2.0", "mg/dL")))
    assert segment(ack, "MSA")[0].startswith(f"MSA|AR|{control}|PID-3 has the escape sequence")
    assert (await labs.rejection(lambda r: r["message_id"] == control))["code"] == "bad_escape"
    assert subject[5:] not in labs.stack.log("labs")


GARBAGE: dict[str, tuple[bytes, str]] = {
    # TOKEN is replaced by a value unique to the test run, to find the refusal on labs.rejected
    "plain text": (b"\x0bhello, is this the lab? TOKEN\x1c\r", "not_hl7"),
    "binary": (b"\x0b" + bytes(range(256)) * 4 + b"TOKEN\x1c\r", "not_hl7"),
    "truncated": (b"\x0bMSH|^~\\&|LIS|LAB|NT|STUDY|2015060109||ORU^R01|TOKEN|P|2.5\rPID|1||S-1\rOBX|1|NM|2160\x1c\r",
                  "missing_unit"),
    "not ORU": (b"\x0bMSH|^~\\&|LIS|LAB|NT|STUDY|2015060109||ADT^A01|TOKEN|P|2.5\rPID|1||S-1\x1c\r", "not_oru_r01"),
    "sql injection": (
        b"\x0bMSH|^~\\&|LIS|LAB|NT|STUDY|2015060109||ORU^R01|TOKEN|P|2.5\rPID|1||x'; DROP TABLE events;--\r"
        b"OBR|1||F1||||20150601\rOBX|1|NM|2160-0^Creatinine^LN||2.1|mg/dL|||||F\x1c\r", "bad_subject_id"),
    "no start block": (b"MSH|^~\\&|LIS|LAB|NT|STUDY|2015060109||ORU^R01|TOKEN|P|2.5\x1c\r", "not_mllp"),
    "huge": (b"\x0bMSH|^~\\&|LIS|LAB|NT|STUDY|2015060109||ORU^R01|TOKEN|P|2.5\r" + b"NTE|1||" + b"x" * (2 << 20)
             + b"\x1c\r", "message_too_large"),
}


@pytest.mark.parametrize("case", list(GARBAGE))
async def test_garbage_is_refused_with_a_reason_and_the_server_keeps_serving(labs: Labs, case: str) -> None:
    token = labs.unique("G")
    data, code = GARBAGE[case][0].replace(b"TOKEN", token.encode()), GARBAGE[case][1]
    marker = labs.unique("after")
    answer = await labs.raw_mllp(data + _valid(marker), frames=2)  # garbage, then a good message, same connection
    frames = [f for f in answer.split(b"\x1c\r") if f]
    assert len(frames) == 2, answer[:500]
    first, second = (f.lstrip(b"\x0b").decode("ascii") for f in frames)
    msa = segment(first, "MSA")[0].split("|")
    assert msa[1] in ("AR", "AE") and msa[3], first
    assert code in [e.split("|")[5] for e in segment(first, "ERR")], first
    assert segment(second, "MSA")[0].split("|")[1:3] == ["AA", marker]
    rejection = await labs.rejection(lambda r: r["source"] == "mllp" and token in r["raw"])
    assert rejection["code"] == code and rejection["reason"]
    assert len(json.dumps(rejection)) < 1_000_000


async def test_a_frame_cut_by_the_peer_is_refused_and_reported(labs: Labs) -> None:
    marker = labs.unique("CUT")
    answer = await labs.raw_mllp(b"\x0bMSH|^~\\&|LIS|LAB|||20150601||ORU^R01|" + marker.encode(), shutdown=True)
    assert b"MSA|AR|" + marker.encode() in answer and b"incomplete MLLP frame" in answer
    await labs.rejection(lambda r: r["code"] == "incomplete_frame" and marker in r["raw"])
    assert (await labs.mllp(_valid(labs.unique("next")))).split("\r")[1].startswith("MSA|AA|")


def _valid(control: str) -> bytes:
    message = oru_v25(control, "S-UNENROLLED-MLLP", "F-" + control, obx(1, "2160-0^Creatinine^LN", "2.1", "mg/dL"))
    return b"\x0b" + message.encode() + b"\x1c\r"


# --------------------------------------------------------------------------- FHIR R4

CREATININE = {
    "resourceType": "Observation",
    "identifier": [{"use": "official", "system": "http://www.bmc.nl/zorgportal/identifiers/observations",
                    "value": "6323"}],
    "status": "final",
    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                              "code": "laboratory"}]}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0",
                         "display": "Creatinine [Mass/volume] in Serum or Plasma"}]},
    "subject": {"reference": "Patient/IGA-A-001"},
    "effectiveDateTime": "2015-06-01T09:30:10+01:00",
    "issued": "2015-06-01T15:30:10+01:00",
    "performer": [{"reference": "Organization/LAB1"}],
    "valueQuantity": {"value": 2.1, "unit": "mg/dl", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
    "referenceRange": [{"low": {"value": 0.6, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
                        "high": {"value": 1.2, "unit": "mg/dL", "system": "http://unitsofmeasure.org",
                                 "code": "mg/dL"}}],
}


def observation(subject_id: str, result_id: str, **changes: Any) -> dict[str, Any]:
    resource = copy.deepcopy(CREATININE)
    resource["subject"] = {"reference": f"Patient/{subject_id}"}
    resource["identifier"][0]["value"] = result_id
    resource.update(changes)
    return resource


def issue(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/fhir+json")
    outcome = OperationOutcome.model_validate(response.json())
    assert outcome.issue[0].diagnostics
    return response.json()["issue"][0]


async def test_fhir_observation_is_created_once_and_bad_ones_get_an_operation_outcome(labs: Labs) -> None:
    subject = labs.subject()
    await labs.enroll(subject)
    result_id = labs.unique("obs")
    resource = observation(subject, result_id)
    created = await labs.post("/fhir/Observation", resource)
    assert created.status_code == 201, created.text
    assert created.json() == resource
    again = await labs.post("/fhir/Observation", resource, "application/json")
    assert again.status_code == 200
    (computed,) = await labs.egfr(result_id)
    assert computed["egfr"] == ckd_epi_2021(2.1, 59, "F") and computed["source"] == "fhir"

    amended = observation(subject, result_id, status="amended",
                          valueQuantity={"value": 1.9, "system": "http://unitsofmeasure.org", "code": "mg/dL"})
    outcome = await labs.http.post(f"{labs.stack.url('labs')}/fhir/Observation", content=json.dumps(amended),
                                   headers={"content-type": "application/fhir+json", "prefer": "return=OperationOutcome"})
    assert outcome.status_code == 201 and issue(outcome)["severity"] == "information"
    assert (await labs.egfr(result_id, 2))[1]["status"] == "corrected"

    bad_unit = observation(subject, labs.unique("obs"),
                           valueQuantity={"value": 2.1, "system": "http://unitsofmeasure.org", "code": "g/L"})
    refused = await labs.post("/fhir/Observation", bad_unit)
    assert refused.status_code == 422
    assert (issue(refused)["code"], "'g/L'" in issue(refused)["diagnostics"]) == ("code-invalid", True)
    rejection = await labs.rejection(lambda r: r["source"] == "fhir" and bad_unit["identifier"][0]["value"] in r["raw"])
    assert rejection["code"] == "unit_mismatch"

    assert (await labs.post("/fhir/Observation", b"{not json")).status_code == 400
    assert (await labs.post("/fhir/Observation", {"resourceType": "Patient"})).status_code == 400
    assert (await labs.post("/fhir/Observation", resource, "text/plain")).status_code == 415
    future = observation(subject, labs.unique("obs"), effectiveDateTime="2099-01-01T00:00:00Z")
    assert "in the future" in issue(await labs.post("/fhir/Observation", future))["diagnostics"]
    parked = await labs.post("/fhir/Observation", observation(labs.subject(), labs.unique("obs")))
    assert parked.status_code == 202 and "not enrolled yet" in issue(parked)["diagnostics"]


async def test_fhir_censored_values_are_refused_422_and_published(labs: Labs) -> None:
    subject = labs.subject()
    await labs.enroll(subject)
    for comparator in ("<", "<=", ">=", ">", "ad"):
        result_id = labs.unique("obs")
        quantity = {"value": 0.4, "comparator": comparator, "system": "http://unitsofmeasure.org", "code": "mg/dL"}
        refused = await labs.post("/fhir/Observation", observation(subject, result_id, valueQuantity=quantity))
        assert refused.status_code == 422, refused.text
        assert f"comparator {comparator!r}" in issue(refused)["diagnostics"]
        rejection = await labs.rejection(lambda r, result_id=result_id: r["source"] == "fhir" and result_id in r["raw"])
        assert rejection["code"] == "censored_value" and rejection["subject_id"] == subject
    assert (await labs.get(f"/v1/patients/{subject}/results")).json()["results"] == []


def nested_extensions(links: int) -> list[dict[str, Any]]:
    chain: dict[str, Any] = {"url": "http://example.org/x", "valueString": "x"}
    for _ in range(links - 1):
        chain = {"url": "http://example.org/x", "extension": [chain]}
    return [chain]


async def test_too_deep_json_is_refused_400_alone_and_never_fails_its_neighbours(labs: Labs) -> None:
    """130 nested extensions answered 500 (fhir.resources ran out of recursion) and failed every
    entry of their Bundle; now a 400 OperationOutcome, and in a Bundle a refusal of that entry."""
    subject = labs.subject()
    await labs.enroll(subject)
    deep_id = labs.unique("obs")
    refused = await labs.post("/fhir/Observation", observation(subject, deep_id, extension=nested_extensions(130)))
    assert refused.status_code == 400, refused.text
    assert (issue(refused)["code"], "nested more than 64 levels" in issue(refused)["diagnostics"]) == ("structure", True)
    assert (await labs.rejection(lambda r: deep_id in r["raw"]))["code"] == "too_deep"

    good, deep_entry = labs.unique("obs"), labs.unique("obs")
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": resource, "request": {"method": "POST", "url": "Observation"}}
        for resource in (observation(subject, good), observation(subject, deep_entry, extension=nested_extensions(130)))
    ]}
    response = await labs.post("/fhir", bundle)
    assert response.status_code == 200, response.text
    assert [e["response"]["status"] for e in response.json()["entry"]] == ["201 Created", "422 Unprocessable Entity"]
    await labs.egfr(good)
    rejection = await labs.rejection(lambda r: deep_entry in r["raw"])
    assert (rejection["code"], rejection["reason"].startswith("entry[1]: ")) == ("too_deep", True)
    bundle["entry"][0]["request"]["extension"] = nested_extensions(40)
    assert (await labs.post("/fhir", bundle)).status_code == 400

    deep_json = lab_json(labs, subject, comment=json.loads("[" * 100 + "]" * 100))
    await labs.send_json(deep_json)
    rejection = await labs.rejection(lambda r: r["message_id"] == deep_json["message_id"])
    assert (rejection["source"], rejection["code"]) == ("broker", "too_deep")


async def test_fhir_transaction_bundle_answers_per_entry(labs: Labs) -> None:
    subject = labs.subject()
    await labs.enroll(subject)
    good, bad = labs.unique("obs"), labs.unique("obs")
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": resource, "request": {"method": "POST", "url": "Observation"}}
        for resource in (observation(subject, good), observation(subject, bad, status="registered"))
    ]}
    response = await labs.post("/fhir", bundle)
    assert response.status_code == 200, response.text
    answer = Bundle.model_validate(response.json())
    assert answer.type == "transaction-response"
    assert [e.response.status for e in answer.entry] == ["201 Created", "422 Unprocessable Entity"]
    assert "status 'registered'" in answer.entry[1].response.outcome.issue[0].diagnostics
    await labs.egfr(good)
    rejection = await labs.rejection(lambda r: r["source"] == "fhir" and bad in r["raw"])
    assert rejection["reason"].startswith("entry[1]: ") and rejection["code"] == "unsupported_status"


async def test_every_refusal_is_counted_by_source_and_reason(labs: Labs) -> None:
    before = await labs.metric("nephrotrack_lab_results_rejected_total", source="mllp", reason="not_hl7")
    await labs.raw_mllp(b"\x0bnonsense\x1c\r")

    async def counted() -> bool:
        return await labs.metric("nephrotrack_lab_results_rejected_total", source="mllp", reason="not_hl7") == before + 1

    await eventually(counted)
    assert await labs.metric("nephrotrack_lab_results_accepted_total", source="broker") >= 0
    text = (await labs.get("/metrics")).text
    assert "nephrotrack_lab_results_parked " in text
    rejections = (await labs.get("/v1/rejections?limit=5&source=mllp")).json()
    assert rejections[0]["code"] == "not_hl7" and "nonsense" in rejections[0]["raw_preview"]


async def test_a_burst_of_finals_corrections_and_preliminaries_ends_with_every_correction_effective(labs: Labs) -> None:
    """Many messages for the same result ids at once: the concurrent pull loops may decide two of
    them in different batches; the later commit then fails on the stream version and its batch is
    retried message by message. Whatever the interleaving, the correction is what counts."""
    subject = labs.subject()
    await labs.enroll(subject)
    result_ids = [labs.unique("burst") for _ in range(60)]
    bodies = []
    for n, result_id in enumerate(result_ids):
        bodies += [
            lab_json(labs, subject, result_id=result_id, status="preliminary", value=3.0),
            lab_json(labs, subject, result_id=result_id, status="final", value=2.0 + n / 100),
            lab_json(labs, subject, result_id=result_id, status="corrected", value=1.5 + n / 100),
        ]
    rng = random.Random(7)
    rng.shuffle(bodies)
    await asyncio.gather(*(labs.send_json(body) for body in bodies))

    async def settled() -> bool:
        views = [(await labs.get(f"/v1/results/{r}")) for r in result_ids]
        return all(v.status_code == 200 and len(v.json()["history"]) >= 3 and
                   v.json()["effective"]["status"] == "corrected" for v in views)

    await eventually(settled, timeout=60)
    for n, result_id in enumerate(result_ids):
        view = (await labs.get(f"/v1/results/{result_id}")).json()
        recorded = [h for h in view["history"] if h["event_type"] == "LabResultRecorded"]
        assert len(recorded) == 3  # each message exactly once
        assert view["effective"]["creatinine_mg_dl"] == pytest.approx(1.5 + n / 100)
        assert view["effective"]["counted"] is True
