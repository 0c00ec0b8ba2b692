"""Hypothesis-driven fuzzing of the labs service's non-OpenAPI entry points, against the running
process: HL7 v2 over MLLP (random bytes, mutated and structurally random ORU^R01), FHIR R4
(mutated Observations and Bundles, random JSON, random bytes), and the contract's broker JSON
(on ``labs.results`` through NATS, and on ``POST /v1/results``).

For every case: always an answer (an ACK frame; an HTTP status below 500 with an
OperationOutcome or ``{"detail"}`` for a refusal), the answer to a refusal carries a specific
reason, a refused input changes nothing in the store but the refusal it records (results,
parked results and the result index are compared before and after), and the service stays up.
Broker messages get no synchronous answer: each carries a marker, and after the run every
marker must be accounted for — recorded as a result, or on ``labs.rejected`` with a reason —
with nothing dead-lettered and nothing left unacknowledged.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from uuid import UUID

import httpx
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from shared.broker import LAB_RESULTS_SUBJECT
from shared.events import EventRef
from tests.fault.infra import FaultStack
from tests.fault.verify import read_stream
from tests.fuzz.conftest import budget
from tests.fuzz.probe import LabsProbe, StoreState, ack_fields
from tests.keys import stack_codec

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]

ENROLLED = "IGA-FZ-001"
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True)

# --------------------------------------------------------------------------- strategies

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
JUNK_FIELD = st.one_of(TEXT, st.sampled_from(["", "^", "~", "\\", "&", "|", "\x00", "9" * 400, "-1e309", "NaN",
                                             "\\Z\\", "A\\Z1", "\\X41\\", "\\H\\A\\N\\", "\\.br\\"]))
LOINCS = st.sampled_from(["2160-0", "14682-9", "98979-8", "33914-3", "2345-7", "", "2160-0^Creat^LN", "abc"])
UNITS = st.sampled_from(["mg/dL", "umol/L", "µmol/L", "mL/min/{1.73_m2}", "g/L", "", "MG/DL"])
VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-10, 10**6).map(str),
                   st.sampled_from(["<0.5", ">90", "1,2", "", "1.2.3", "1\\Z5", "1\\Z\\5", "\\X31\\.2"]), TEXT)
TIMES = st.one_of(st.sampled_from(["20150601083000+0000", "20150601", "2015", "20990101", "19000101", "", "201513320000",
                                   "20150601083000+9999"]), TEXT)
SUBJECTS = st.one_of(st.just(ENROLLED), st.sampled_from(["IGA-FZ-404", "", "a b", "x'; DROP TABLE events;--"]), TEXT)
STATUS = st.one_of(st.sampled_from(["F", "C", "P", "X", "", "final"]), TEXT)


def mostly(valid: st.SearchStrategy[Any], junk: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` most of the time, ``junk`` about one time in six: messages must get past the
    header to reach the deep checks. (Not ``one_of``: hypothesis favours its simplest branches.)"""
    return st.integers(0, 5).flatmap(lambda pick: junk if pick == 5 else valid)


@st.composite
def oru_messages(draw: Callable[..., Any]) -> bytes:
    control = draw(mostly(st.uuids().map(lambda u: f"FZ-{u.hex[:12]}"), JUNK_FIELD))
    obx = []
    for n in range(draw(mostly(st.integers(1, 3), st.just(0)))):
        loinc = draw(mostly(st.sampled_from(["2160-0", "14682-9", "98979-8", "33914-3"]), LOINCS))
        unit = {"2160-0": "mg/dL", "14682-9": "umol/L"}.get(loinc, "mL/min/1.73m2")
        value = {"2160-0": "1.3", "14682-9": "110", "98979-8": "45"}.get(loinc, "50")
        fields = ["OBX", str(n + 1), draw(mostly(st.just("NM"), st.sampled_from(["ST", "", "CE", "TX"]))),
                  f"{loinc}^X^LN", "", draw(mostly(st.just(value), VALUES)), draw(mostly(st.just(unit), UNITS)),
                  "", "", "", "", draw(mostly(st.sampled_from(["F", "C", "P"]), STATUS)), "", "",
                  draw(mostly(st.just("20150601083000+0000"), TIMES)), "", "", "", "", "", "",
                  draw(mostly(st.uuids().map(lambda u: f"FZR-{u.hex[:12]}"), JUNK_FIELD))]
        obx.append("|".join(fields))
    segments = [
        f"MSH|^~\\&|LIS|{draw(mostly(st.just('LAB-FZ'), JUNK_FIELD))}|NT|STUDY|20150601||"
        f"{draw(mostly(st.just('ORU^R01'), st.sampled_from(['ADT^A01', '', 'ORU', 'ORU^R01^ORU_R01'])))}"
        f"|{control}|P|{draw(mostly(st.sampled_from(['2.5', '2.3', '2.5.1']), st.sampled_from(['3.0', '', 'x'])))}",
        f"PID|1||{draw(mostly(st.just(ENROLLED), SUBJECTS))}",
        f"OBR|1||FIL-{draw(st.uuids()).hex[:8]}||||{draw(mostly(st.just('20150601083000+0000'), TIMES))}",
        *obx,
    ]
    for _ in range(draw(mostly(st.just(0), st.integers(1, 2)))):  # stray segments anywhere
        segments.insert(draw(st.integers(0, len(segments))), draw(st.one_of(TEXT, st.just("NTE|1||" + "x" * 100))))
    message = draw(mostly(st.just("\r"), st.sampled_from(["\n", "\r\n"]))).join(segments)
    return message.encode(draw(st.sampled_from(["utf-8", "latin-1"])), errors="replace")


@st.composite
def mutated(draw: Callable[..., Any], inner: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(inner))
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        if op == "flip":
            data[at] = draw(st.integers(0, 255))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 20))]
        elif op == "insert":
            data[at:at] = draw(st.binary(max_size=20))
        else:
            del data[at:]
    return bytes(data)


HL7_INPUTS = st.one_of(oru_messages(), mutated(oru_messages()), st.binary(max_size=3000))

DEEP = json.loads('{"extension":[' * 70 + "{}" + "]}" * 70)
"""Deeper than the labs inputs take (64 levels): refused, not a 500."""
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT | st.just(DEEP),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
MISSING = object()


def observation(n: str, subject: str = ENROLLED) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "status": "final", "identifier": [{"value": f"FZF-{n}"}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]},
        "subject": {"reference": f"Patient/{subject}"}, "effectiveDateTime": "2015-06-01T08:30:00Z",
        "valueQuantity": {"value": 1.2, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
    }


@st.composite
def mutated_json(draw: Callable[..., Any], base: dict[str, Any], depth: int = 0) -> Any:
    """``base`` with each member kept, dropped, replaced by random JSON or (objects) mutated."""
    out: dict[str, Any] = {}
    for key, value in base.items():
        choice = draw(st.sampled_from(["keep"] * 5 + ["drop", "random", "deeper"]))
        if choice == "keep":
            out[key] = value
        elif choice == "random":
            out[key] = draw(JSON)
        elif choice == "deeper" and isinstance(value, dict) and depth < 3:
            out[key] = draw(mutated_json(value, depth + 1))
        elif choice == "deeper" and isinstance(value, list) and value and isinstance(value[0], dict):
            out[key] = [draw(mutated_json(value[0], depth + 1))]
        elif choice != "drop":
            out[key] = value
    if draw(st.booleans()):
        out[draw(TEXT)] = draw(JSON)
    return out


@st.composite
def fhir_bodies(draw: Callable[..., Any]) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["observation", "observation", "bundle", "json", "bytes"]))
    n = draw(st.uuids()).hex[:12]
    if kind == "observation":
        return "/fhir/Observation", json.dumps(draw(mutated_json(observation(n)))).encode()
    if kind == "bundle":
        entries = [{"resource": draw(mutated_json(observation(f"{n}-{i}"))), "request": {"method": "POST", "url": "Observation"}}
                   for i in range(draw(st.integers(0, 3)))]
        bundle = draw(mutated_json({"resourceType": "Bundle", "type": "transaction", "entry": entries}))
        return "/fhir", json.dumps(bundle).encode()
    if kind == "json":
        return draw(st.sampled_from(["/fhir/Observation", "/fhir"])), json.dumps(draw(JSON)).encode()
    return draw(st.sampled_from(["/fhir/Observation", "/fhir"])), draw(st.binary(max_size=2000))


def broker_message(n: str) -> dict[str, Any]:
    return {"message_id": f"FZB-{n}", "subject_id": ENROLLED, "lab_id": "LAB-FZ", "loinc": "2160-0", "value": 1.1,
            "unit": "mg/dL", "collected_at": "2015-06-01T08:30:00Z", "status": "final", "result_id": f"FZRB-{n}"}


@st.composite
def broker_bodies(draw: Callable[..., Any]) -> bytes:
    kind = draw(st.sampled_from(["contract", "contract", "json", "bytes"]))
    n = draw(st.uuids()).hex[:12]
    if kind == "contract":
        return json.dumps(draw(mutated_json(broker_message(n))), allow_nan=True).encode()
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    return draw(st.binary(max_size=2000))


# --------------------------------------------------------------------------- checks


class Tally:
    def __init__(self) -> None:
        self.cases: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(text)


def check_refusal_left_no_trace(tally: Tally, before: StoreState, after: StoreState, what: str) -> None:
    if after.results() != before.results():
        tally.problem(f"{what}: refused, but the store changed: {before} -> {after}")
    if after.rejections <= before.rejections:
        tally.problem(f"{what}: refused, but no refusal was recorded ({before.rejections} -> {after.rejections})")


def post_answered(probe: LabsProbe, tally: Tally, path: str, body: bytes, content_type: str) -> httpx.Response | None:
    """POST; a transport error is retried once on a new connection, and is a finding (no
    answer: a crash or a hang) if it happens again."""
    for attempt in (1, 2):
        try:
            return probe.post(path, body, content_type)
        except httpx.TransportError as error:
            if attempt == 2:
                tally.problem(f"POST {path} {body[:100]!r}: no answer ({error!r})")
            time.sleep(0.5)
    return None


def fuzz_mllp(probe: LabsProbe, examples: int, tally: Tally) -> None:
    @settings(max_examples=examples, **SETTINGS)
    @given(payload=HL7_INPUTS)
    def case(payload: bytes) -> None:
        before = probe.state()
        answer = probe.mllp(payload)
        tally.cases["mllp"] += 1
        if b"\x1c\r" in payload:
            return  # the payload ended the frame itself: the answer is for its first part
        ack = ack_fields(answer)
        if ack["code"] not in ("AA", "AE", "AR"):
            tally.problem(f"mllp {payload[:80]!r}: no ACK, got {answer[:200]!r}")
            return
        tally.cases[f"mllp {ack['code']}"] += 1
        tally.reasons[ack["text"][:50]] += 1
        if ack["code"] != "AA" and not (ack["text"].strip() or ack["errors"]):
            tally.problem(f"mllp {payload[:80]!r}: {ack['code']} without a reason: {ack['raw'][:200]}")
        if ack["code"] == "AR":
            check_refusal_left_no_trace(tally, before, probe.state(), f"mllp {payload[:80]!r}")
        elif ack["code"] == "AE" and probe.state().rejections <= before.rejections:
            tally.problem(f"mllp {payload[:80]!r}: AE but no refusal recorded")

    case()


def fuzz_fhir(probe: LabsProbe, examples: int, tally: Tally) -> None:
    @settings(max_examples=examples, **SETTINGS)
    @given(request=fhir_bodies(), content_type=st.sampled_from(["application/fhir+json"] * 6 + ["text/plain", ""]))
    def case(request: tuple[str, bytes], content_type: str) -> None:
        path, body = request
        before = probe.state()
        response = post_answered(probe, tally, path, body, content_type)
        if response is None:
            return
        tally.cases["fhir"] += 1
        tally.cases[f"fhir {response.status_code}"] += 1
        what = f"POST {path} {body[:100]!r}"
        if response.status_code >= 500 or response.status_code not in (200, 201, 202, 400, 413, 415, 422):
            tally.problem(f"{what}: {response.status_code} {response.text[:200]}")
            return
        if response.status_code >= 400:
            try:
                outcome = response.json()
                reason = "; ".join(i.get("diagnostics", "") for i in outcome.get("issue", []))
            except (ValueError, AttributeError):
                outcome, reason = None, ""
            if not outcome or outcome.get("resourceType") != "OperationOutcome" or not reason.strip():
                tally.problem(f"{what}: {response.status_code} without an OperationOutcome reason: {response.text[:200]}")
            check_refusal_left_no_trace(tally, before, probe.state(), what)
        elif path == "/fhir":
            for entry in response.json().get("entry", []):
                status = entry.get("response", {}).get("status", "")
                if status.startswith("422") and not entry["response"].get("outcome"):
                    tally.problem(f"{what}: bundle entry refused without an outcome")

    case()


def fuzz_json_http(probe: LabsProbe, examples: int, tally: Tally) -> None:
    @settings(max_examples=examples, **SETTINGS)
    @given(body=broker_bodies())
    def case(body: bytes) -> None:
        before = probe.state()
        response = post_answered(probe, tally, "/v1/results", body, "application/json")
        if response is None:
            return
        tally.cases["json"] += 1
        tally.cases[f"json {response.status_code}"] += 1
        what = f"POST /v1/results {body[:100]!r}"
        if response.status_code not in (200, 201, 202, 422):
            tally.problem(f"{what}: {response.status_code} {response.text[:200]}")
            return
        if response.status_code == 422:
            if not str(response.json().get("detail") or "").strip():
                tally.problem(f"{what}: 422 without a reason")
            check_refusal_left_no_trace(tally, before, probe.state(), what)

    case()


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="package")
async def probe(fuzz_stack: FaultStack) -> Any:
    async with fuzz_stack.client(timeout=30) as http:
        enrolled = await http.post(f"{fuzz_stack.url('enrollment')}/v1/patients", json={
            "subject_id": ENROLLED, "sex": "F", "age_years": 50, "weight_kg": 60, "group": "A",
            "enrolled_on": "2014-01-02", "baseline_egfr": 30.0, "lee_grade": "IV"})
        assert enrolled.status_code in (201, 409), enrolled.text
        deadline = time.monotonic() + 60
        while not (await http.get(f"{fuzz_stack.url('labs')}/v1/patients/{ENROLLED}/results")).json()["enrolled"]:
            assert time.monotonic() < deadline, "labs never learned the enrollment"
            await asyncio.sleep(0.3)
    made = await asyncio.to_thread(lambda: LabsProbe(fuzz_stack.url("labs"), fuzz_stack.mllp_port,
                                                     fuzz_stack.database_urls["labs"]))
    yield made
    await asyncio.to_thread(made.close)


def run_in_thread(probe: LabsProbe, fuzz: Callable[[LabsProbe, int, Tally], None], examples: int) -> Tally:
    """Run ``fuzz`` on the probe's own thread-bound event loop (the probe was made in a worker
    thread; its loop is used from one worker thread at a time)."""
    tally = Tally()
    fuzz(probe, examples, tally)
    return tally


async def _run(probe: LabsProbe, fuzz: Callable[[LabsProbe, int, Tally], None], examples: int, label: str,
               stack: FaultStack) -> None:
    tally = await asyncio.to_thread(run_in_thread, probe, fuzz, examples)
    print(f"\n{label}: {dict(tally.cases)}")
    if tally.reasons:
        print(f"{label} most frequent answers: {tally.reasons.most_common(6)}")
    assert probe.alive() and stack.processes["labs"].poll() is None, "the labs service went down"
    assert not tally.problems, f"{len(tally.problems)} problems:\n" + "\n".join(tally.problems)


async def test_mllp_fuzz(fuzz_stack: FaultStack, probe: LabsProbe) -> None:
    await _run(probe, fuzz_mllp, budget(150, 12_000), "MLLP", fuzz_stack)


async def test_fhir_fuzz(fuzz_stack: FaultStack, probe: LabsProbe) -> None:
    await _run(probe, fuzz_fhir, budget(150, 12_000), "FHIR", fuzz_stack)


async def test_json_http_fuzz(fuzz_stack: FaultStack, probe: LabsProbe) -> None:
    await _run(probe, fuzz_json_http, budget(100, 6_000), "POST /v1/results", fuzz_stack)


async def test_broker_fuzz(fuzz_stack: FaultStack) -> None:
    """Publish many generated messages on ``labs.results`` (each with a marker and its own
    ``Nats-Msg-Id``); every one must end recorded or refused with a reason — none dropped."""
    count = budget(200, 8_000)
    bodies: list[bytes] = []

    @settings(max_examples=count, **SETTINGS)
    @given(body=broker_bodies())
    def collect(body: bytes) -> None:
        bodies.append(body)

    collect()
    nats_url = fuzz_stack.nats_server.url  # type: ignore[attr-defined]
    client = await nats.connect(nats_url)
    js = client.jetstream()
    markers = {}
    header_ids: set[str] = set()
    deduplicated: set[str] = set()
    for i, body in enumerate(bodies):
        marker = f"FZ{i}Q"
        try:
            loaded = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            loaded = None
        if isinstance(loaded, dict):  # a JSON object: the marker is a member, unknown members are ignored
            loaded["fuzz_marker"] = marker
            data = json.dumps(loaded, allow_nan=True).encode()
        else:
            data = body + b" " + marker.encode()
        markers[marker] = (data, loaded.get("message_id") if isinstance(loaded, dict) else None)
        headers = {"Nats-Msg-Id": f"fz-{i}"}
        message_id = loaded.get("message_id") if isinstance(loaded, dict) else None
        if isinstance(message_id, str) and message_id.startswith("FZB-") and i % 2:
            headers["Nats-Msg-Id"] = message_id  # as the contract says; else a mismatch to refuse
        if headers["Nats-Msg-Id"] in header_ids:
            deduplicated.add(marker)  # JetStream keeps the first message with an id: one effect
        header_ids.add(headers["Nats-Msg-Id"])
        await js.publish(LAB_RESULTS_SUBJECT, data, headers=headers)
    await client.close()

    prefix = fuzz_stack.env["NEPHROTRACK_SUBJECT_PREFIX"]
    consumer = f"{prefix}-labs-results"
    client = await nats.connect(nats_url)
    deadline = time.monotonic() + 300
    while True:
        info = await client.jetstream().consumer_info("LABS_RESULTS", consumer)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            break
        assert time.monotonic() < deadline, f"labs did not finish the broker fuzz: {info}"
        await asyncio.sleep(0.5)
    await client.close()
    await asyncio.sleep(2)  # the last refusals' outbox rows

    refused = [json.loads(data)["payload"] for _, data, _ in await read_stream(nats_url, "LABS_REJECTED")]
    dead = await read_stream(nats_url, f"{prefix.upper()}_DLQ")
    assert not dead, f"{len(dead)} messages dead-lettered: {dead[:3]}"
    for payload in refused:
        assert str(payload.get("reason") or "").strip(), f"refusal without a reason: {payload}"
    refused_text = "\n".join(p.get("raw", "") for p in refused)
    recorded = await recorded_message_ids(fuzz_stack.database_urls["labs"], prefix, nats_url)
    unaccounted = [marker for marker, (_, message_id) in markers.items()
                   if marker not in refused_text and message_id not in recorded and marker not in deduplicated]
    print(f"\nbroker: {len(bodies)} messages ({len(deduplicated)} deduplicated by JetStream); "
          f"{len(refused)} refusals on labs.rejected (all channels); "
          f"{len(recorded)} recorded message ids; {len(unaccounted)} unaccounted")
    assert not unaccounted, f"{len(unaccounted)} broker messages neither recorded nor refused: " + ", ".join(
        f"{m}: {markers[m][0][:120]!r}" for m in unaccounted[:10])
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.get(f"{fuzz_stack.url('labs')}/healthz")).status_code == 200


async def recorded_message_ids(database_url: str, prefix: str, nats_url: str) -> set[str]:
    """Message ids of every recorded result (any subject; payloads sealed with the patient's
    key, shared/sealing.py) and every parked one."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection, stack_codec(prefix, nats_url=nats_url, delete_bucket=False) as codec:
            rows = (await connection.execute(
                text("SELECT event_id, event_type, stream_id, payload FROM events "
                     "WHERE event_type = 'LabResultRecorded'"))).all()
            await codec.prepare(stored=(bytes(row.payload) for row in rows))
            found = {
                codec.decode(EventRef(UUID(str(row.event_id)), row.event_type, row.stream_id), bytes(row.payload))[
                    "message_id"]
                for row in rows
            }
            rows = await connection.execute(text("SELECT message_id FROM parked_results"))
            found |= {row.message_id for row in rows}
    finally:
        await engine.dispose()
    return found
