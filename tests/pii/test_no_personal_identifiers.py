"""No personal identifiers anywhere: after a run of the whole stack with the demo study and
deliberately hostile inputs — lab messages whose subject is a name, a birth date or an MRN, HL7
with a patient name, birth date and hospital MRN in PID, FHIR with a contained Patient, broker
JSON with extra name/birth-date fields, HTTP commands naming a person — every service database
(every text, JSON and bytes column of every table), every service log and every message on the
stack's NATS streams is scanned for those identifiers, and none is found.

Every hostile input whose *subject* is personal data is refused, with a specific reason that
does not repeat it; inputs that merely carry identifiers beside a pseudonymous subject are taken
for what they are (a result for that pseudonym) and their identifiers are not kept. What is kept
of refused input (the contract's raw payload on ``labs.rejected``) is redacted: see
services/labs/redaction.py and docs/robustness.md, "Personal identifiers".
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from nephrotrack.demo import Stack as DemoStack
from nephrotrack.demo import demo
from shared.broker import LAB_RESULTS_SUBJECT
from shared.settings import SERVICES
from tests.fault.infra import FaultStack, NatsServer
from tests.stack import eventually

pytestmark = [pytest.mark.slow]

NAME, GIVEN, FAMILY = "John Smith", "John", "Smith"
DOB, DOB_HL7, DOB_EU = "1980-02-03", "19800203", "03.02.1980"
MRN_NUMBER, MRN = "12345678", "MRN 12345678"
KIN = "Jane Doerksen"
NEEDLES = (NAME, FAMILY, DOB, DOB_HL7, DOB_EU, MRN_NUMBER, "Doerksen", "Smith^John")
"""The identifiers the hostile inputs carry; none may be found after the run ("John" alone is
too common a substring to scan for; "Smith" covers the name)."""
PATTERNS = (re.compile(r"(?i)\bMRN\s*[:#]?\s*\d{4,}"), re.compile(r"\b1980[-/.]?02[-/.]?03\b"))
"""Identifier shapes: an MRN with its number, the birth date in any separator style."""

LAB = "LAB-PII-1"
ENROLLED = "IGA-A-001"  # a demo patient: enrolled, so results for it are accepted
UNENROLLED = "PII-X-001"  # a pseudonym nobody enrolled: results for it are parked


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[FaultStack]:
    server = NatsServer(tmp_path / "nats")
    await server.astart()
    stack = FaultStack(tmp_path, f"p{uuid.uuid4().hex[:10]}", SERVICES, backend="postgresql", nats_url=server.url,
                       extra_env={"NEPHROTRACK_UNKNOWN_PATIENT_WAIT_SECONDS": "1"})
    stack.nats_server = server  # type: ignore[attr-defined]
    try:
        await stack.start()
        yield stack
    finally:
        await stack.stop()
        server.stop()


# --------------------------------------------------------------------------- hostile inputs


def broker_json(subject_id: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"message_id": f"PII-B-{n}", "subject_id": subject_id, "lab_id": LAB, "loinc": "2160-0", "value": 1.4,
            "unit": "mg/dL", "collected_at": "2016-06-01T08:30:00Z", "status": "final", "result_id": f"PII-RB-{n}",
            **extra}


def oru(control: str, pid: str, *obx: str, extra: str = "") -> bytes:
    text = "\r".join([
        f"MSH|^~\\&|LIS|{LAB}|NEPHROTRACK|STUDY|20160601093000||ORU^R01|{control}|P|2.5",
        pid,
        *([extra] if extra else []),
        f"OBR|1||FIL-{control}||||20160601083000+0000",
        *obx,
    ]) + "\r"
    return b"\x0b" + text.encode() + b"\x1c\r"


def obx(n: int, loinc: str, value: str, unit: str, instance: str) -> str:
    fields = ["OBX", str(n), "NM", f"{loinc}^X^LN", "", value, unit, "", "", "", "", "F", "", "",
              "20160601083000+0000", "", "", "", "", "", "", instance]
    return "|".join(fields)


def observation(subject: dict[str, Any], n: int, *, unit: str = "mg/dL", contained: bool = False) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation", "status": "final",
        "identifier": [{"value": f"PII-RF-{n}"}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]},
        "subject": subject,
        "effectiveDateTime": "2016-06-01T08:30:00Z",
        "valueQuantity": {"value": 1.3, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
        "note": [{"text": f"patient {NAME}, born {DOB}, {MRN}"}],
    }
    if contained:
        resource["contained"] = [{"resourceType": "Patient", "id": "p1", "name": [{"family": FAMILY, "given": [GIVEN]}],
                                  "birthDate": DOB, "identifier": [{"type": {"text": "MRN"}, "value": MRN_NUMBER}]}]
    return resource


def mllp_exchange(port: int, frame: bytes) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(frame)
        data = b""
        while not data.endswith(b"\x1c\r"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace")


async def send_hostile_inputs(stack: FaultStack, nats_url: str) -> dict[str, Any]:
    """Every channel, every kind of identifier; returns what each answered."""
    answers: dict[str, Any] = {}
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    # broker: subjects that are personal data (refused), and identifiers beside a pseudonym
    broker = [
        broker_json(NAME, 1), broker_json(DOB, 2), broker_json(MRN, 3), broker_json("MRN12345678", 4),
        broker_json(ENROLLED, 5, patient_name=NAME, dob=DOB, mrn=MRN),  # accepted; extras ignored, not kept
        broker_json(UNENROLLED, 6, patient_name=NAME, birth_date=DOB),  # parked: the copy must not keep them
        broker_json(ENROLLED, 7, unit="g/L", patient={"name": NAME, "birthDate": DOB}),  # refused: unit
    ]
    for body in broker:
        await js.publish(LAB_RESULTS_SUBJECT, json.dumps(body).encode(), headers={"Nats-Msg-Id": body["message_id"]})
    # broker: garbage carrying identifiers
    garbage = ('{"subject_id": "' + NAME + '", "dob": "' + DOB + '", "note": "' + MRN + '"').encode()
    await js.publish(LAB_RESULTS_SUBJECT, garbage, headers={"Nats-Msg-Id": "PII-B-garbage"})
    await nc.close()

    # HL7 over MLLP
    pid_full = f"PID|1||{ENROLLED}^^^STUDY^PI~{MRN_NUMBER}^^^HOSP^MR||{FAMILY}^{GIVEN}||{DOB_HL7}|M|||1 Main St^^Town"
    frames = {
        "mllp name subject": oru("PII-M-1", f"PID|1||{NAME}", obx(1, "2160-0", "1.2", "mg/dL", "PII-RM-1")),
        "mllp dob subject": oru("PII-M-2", f"PID|1||{DOB}", obx(1, "2160-0", "1.2", "mg/dL", "PII-RM-2")),
        "mllp mrn subject": oru("PII-M-3", f"PID|1||{MRN}", obx(1, "2160-0", "1.2", "mg/dL", "PII-RM-3")),
        "mllp identifiers, one bad OBX": oru(
            "PII-M-4", pid_full, obx(1, "2160-0", "1.2", "mg/dL", "PII-RM-4"),
            obx(2, "2345-7", "95", "mg/dL", "PII-RM-5"), extra=f"NK1|1|Doerksen^Jane|SPO\rNTE|1||call {KIN}"),
        "mllp identifiers, unenrolled": oru(
            "PII-M-5", pid_full.replace(ENROLLED, UNENROLLED), obx(1, "2160-0", "1.2", "mg/dL", "PII-RM-6")),
    }
    for label, frame in frames.items():
        answers[label] = await asyncio.to_thread(mllp_exchange, stack.mllp_port, frame)

    # FHIR, HTTP JSON and the other services' commands
    async with stack.client(timeout=60) as http:
        labs = stack.url("labs")
        fhir_headers = {"Content-Type": "application/fhir+json"}
        fhir = {
            "fhir name subject": observation({"reference": f"Patient/{NAME}"}, 1),
            "fhir dob subject": observation({"identifier": {"value": DOB}}, 2),
            "fhir mrn subject": observation({"identifier": {"value": MRN}}, 3),
            "fhir contained patient, bad unit": observation(
                {"reference": f"Patient/{ENROLLED}", "display": NAME}, 4, unit="g/L", contained=True),
            "fhir contained patient, accepted": observation(
                {"reference": f"Patient/{ENROLLED}", "display": NAME}, 5, contained=True),
        }
        for label, resource in fhir.items():
            response = await http.post(f"{labs}/fhir/Observation", content=json.dumps(resource), headers=fhir_headers)
            answers[label] = (response.status_code, response.text)
        response = await http.post(f"{labs}/v1/results", json=broker_json(NAME, 8),
                                   headers={"Nats-Msg-Id": "PII-B-8"})
        answers["labs json name subject"] = (response.status_code, response.text)
        for n, subject in enumerate((NAME, DOB, MRN)):
            body = {"subject_id": subject, "sex": "M", "age_years": 44, "weight_kg": 80, "group": "control",
                    "enrolled_on": "2016-01-04", "baseline_egfr": 50.0, "lee_grade": "II"}
            response = await http.post(f"{stack.url('enrollment')}/v1/patients", json=body)
            answers[f"enroll {n}"] = (response.status_code, response.text)
            for service, path, command in (
                ("pulse", f"/v1/patients/{subject}/pulse-doses",
                 {"cycle": 1, "day": 1, "given_on": "2016-02-01", "dose_mg": 1000, "weight_kg": 80}),
                ("cells", f"/v1/patients/{subject}/harvests", {"harvested_on": "2016-02-01", "fat_grams": 100}),
                ("enrollment", f"/v1/patients/{subject}/events", {"type": "dialysis_started", "on": "2017-01-01"}),
            ):
                response = await http.post(f"{stack.url(service)}{path}", json=command)
                answers[f"{service} {n}"] = (response.status_code, response.text)
            response = await http.get(f"{stack.url('outcomes')}/v1/patients/{subject}")
            answers[f"outcomes {n}"] = (response.status_code, response.text)
    return answers


# --------------------------------------------------------------------------- scanning


async def database_texts(url: str) -> list[tuple[str, str]]:
    """(table.column, value as text) of every non-null value of every table."""
    engine = create_async_engine(url)
    found: list[tuple[str, str]] = []
    try:
        async with engine.connect() as connection:
            tables = await connection.run_sync(lambda sync: {
                name: [c["name"] for c in sa_inspect(sync).get_columns(name)]
                for name in sa_inspect(sync).get_table_names()
            })
            from sqlalchemy import column, table

            for name, columns in tables.items():
                rows = await connection.execute(select(*(column(c) for c in columns)).select_from(table(name)))
                for row in rows:
                    for column_name, value in zip(columns, row, strict=True):
                        if value is None:
                            continue
                        text = value.decode("utf-8", "replace") if isinstance(value, bytes | memoryview) else (
                            json.dumps(value) if isinstance(value, dict | list) else str(value))
                        found.append((f"{name}.{column_name}", text))
    finally:
        await engine.dispose()
    return found


async def broker_texts(nats_url: str) -> list[tuple[str, str]]:
    """(stream, subject + headers + data) of every message in every stream of the server."""
    from tests.fault.verify import read_stream

    client = await nats.connect(nats_url)
    try:
        names = [info.config.name for info in await client.jetstream().streams_info()]
    finally:
        await client.close()
    found = []
    for stream in names:
        for subject, data, headers in await read_stream(nats_url, stream):
            found.append((stream, f"{subject} {json.dumps(headers)} {data.decode('utf-8', 'replace')}"))
    return found


def leaks(texts: list[tuple[str, str]]) -> list[str]:
    out = []
    for where, text in texts:
        for needle in NEEDLES:
            if needle in text:
                out.append(f"{where}: {needle!r} in …{_around(text, text.index(needle))}…")
        for pattern in PATTERNS:
            match = pattern.search(text)
            if match:
                out.append(f"{where}: {match.group(0)!r} in …{_around(text, match.start())}…")
    return out


def _around(text: str, at: int) -> str:
    return text[max(0, at - 60): at + 60].replace("\r", "\\r")


# --------------------------------------------------------------------------- the test


async def test_no_personal_identifiers_in_stores_logs_or_broker(stack: FaultStack) -> None:
    nats_url = stack.nats_server.url  # type: ignore[attr-defined]
    env = {**stack.env}
    evidence = await demo(DemoStack.from_env(env), timeout=180)
    assert {row["group"] for row in evidence.cohorts} == {"A", "B", "control"}
    answers = await send_hostile_inputs(stack, nats_url)

    # every input whose subject is personal data was refused, with a reason that does not repeat it
    for label in ("mllp name subject", "mllp dob subject", "mllp mrn subject"):
        assert "MSA|AR|" in answers[label] or "MSA|AE|" in answers[label], answers[label]
    assert "MSA|AE|" in answers["mllp identifiers, one bad OBX"]
    assert "MSA|AA|" in answers["mllp identifiers, unenrolled"]  # parked (accepted for later)
    for label in ("fhir name subject", "fhir dob subject", "fhir mrn subject", "fhir contained patient, bad unit",
                  "labs json name subject"):
        assert answers[label][0] in (400, 422), (label, answers[label])
    assert answers["fhir contained patient, accepted"][0] == 201
    for n in range(3):
        assert answers[f"enroll {n}"][0] == 422, answers[f"enroll {n}"]
        assert answers[f"pulse {n}"][0] in (404, 422) and answers[f"cells {n}"][0] in (404, 422)
        assert answers[f"enrollment {n}"][0] in (404, 422) and answers[f"outcomes {n}"][0] in (404, 422)
    for label in ("enroll 0", "enroll 1", "enroll 2", "labs json name subject"):
        detail = json.loads(answers[label][1])["detail"]
        assert detail and NAME not in detail and DOB not in detail and MRN_NUMBER not in detail, detail

    # the refusals are on labs.rejected (redacted), and the accepted ones recorded
    async with stack.client(timeout=10) as http:
        async def settled() -> bool:
            listed = (await http.get(f"{stack.url('labs')}/v1/rejections?limit=1000")).json()
            codes = [r["code"] for r in listed]
            return codes.count("personal_identifier") >= 4 + 3 + 3 + 1 and "malformed_json" in codes

        await eventually(settled, timeout=60)

        async def accepted() -> bool:
            view = (await http.get(f"{stack.url('labs')}/v1/patients/{ENROLLED}/results")).json()
            ids = {r["result_id"] for r in view["results"]}
            return {"PII-RB-5", "PII-RM-4", "PII-RF-5"} <= ids

        await eventually(accepted, timeout=60)
        parked = (await http.get(f"{stack.url('labs')}/v1/patients/{UNENROLLED}/results")).json()["parked"]
        assert {p["result_id"] for p in parked} == {"PII-RB-6", "PII-RM-6"}
    await asyncio.sleep(2)  # let the relays publish the last refusals

    # the scanner is not blind: it finds the identifiers in what was sent
    assert leaks([("sent", json.dumps(broker_json(NAME, 1)))]) and leaks([("sent", DOB_HL7 + " " + MRN)])

    database, logs, broker = [], [], []
    for service, url in stack.database_urls.items():
        database += [(f"{service} db {where}", text) for where, text in await database_texts(url)]
    for path in stack.log_paths():
        logs.append((f"log {path.name}", path.read_text(errors="replace")))
    broker = [(f"NATS {where}", text) for where, text in await broker_texts(nats_url)]
    found = leaks(database) + leaks(logs) + leaks(broker)
    assert not found, f"{len(found)} personal identifiers found:\n" + "\n".join(found[:30])
    # ... and it looked where the hostile inputs went: refusals (redacted) in the labs store and on
    # labs.rejected, parked copies, logs of every service
    assert sum("[redacted]" in text for where, text in database if where.startswith("labs db events.payload")) >= 8
    assert sum("[redacted]" in text for where, text in database if "parked_results.payload" in where) == 2
    assert sum(where.startswith("NATS LABS_REJECTED") for where, _ in broker) >= 15
    assert len(logs) == len(SERVICES) and len(database) > 1000
    print(f"\nscanned {len(database)} database values, {len(logs)} logs, {len(broker)} broker messages: "
          f"no personal identifiers")


async def test_a_refused_request_naming_a_person_leaves_no_trace_in_the_logs(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")
    await server.astart()
    stack = FaultStack(tmp_path, f"p{uuid.uuid4().hex[:10]}", ["enrollment"], backend="sqlite", nats_url=server.url)
    try:
        await stack.start()
        async with httpx.AsyncClient(timeout=10) as anonymous:  # no key: refused by authentication
            response = await anonymous.get(f"{stack.url('enrollment')}/v1/patients/{NAME}")
            assert response.status_code == 401
            response = await anonymous.get(f"{stack.url('enrollment')}/v1/patients/{MRN}",
                                           headers={"Authorization": "Bearer not-a-key"})
            assert response.status_code == 401
        await asyncio.sleep(0.5)
        found = leaks([(f"log {p.name}", p.read_text(errors="replace")) for p in stack.log_paths()])
        assert not found, "\n".join(found)
    finally:
        await stack.stop()
        server.stop()
