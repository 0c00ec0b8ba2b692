"""Oversized payloads, slow clients and floods are bounded, on every entry point, with the
limits docs/robustness.md documents (the fuzz stack shortens the timeouts and connection
limits so this runs in seconds; the defaults are in the document):

- HTTP: a body over the limit is refused with 413 before it is read (declared length) or as
  soon as it passes the limit (chunked); a body sent 1 byte a second is cut off with 408; a
  client dribbling its request line and headers is disconnected; more connections than the
  concurrency limit get 503 while the service keeps answering the others afterwards;
- labs: FHIR over 1 MiB is 413 with an OperationOutcome, JSON over 64 KiB is 422, both
  recorded on ``labs.rejected``; MLLP over 1 MiB is AR ``message_too_large``; an MLLP client
  sending 1 byte a second is cut off after the read timeout (AR ``read_timeout``); an idle
  MLLP connection is closed; connections beyond the MLLP limit are refused;
- NATS: a message over the server's max_payload (1 MiB) is refused by the server; one over the
  labs limit (64 KiB) is refused by labs (``payload_too_large`` on ``labs.rejected``).

Every refusal leaves the store as it was (but for the refusal it records), and every service
still answers afterwards.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import nats
import pytest
from nats.errors import MaxPayloadError

from shared.broker import LAB_RESULTS_SUBJECT
from shared.settings import SERVICES
from tests.fault.infra import FaultStack
from tests.fuzz.probe import LabsProbe, ack_fields, mllp_exchange
from tests.stack import AUTH_HEADERS

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]

TIMEOUT = 3.0  # the fuzz stack's body, head and MLLP read timeouts (tests/fuzz/conftest.py)
MIB = 1024 * 1024


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def raw_http(port: int, data: bytes, *, read_timeout: float = 20) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            received += chunk
    return received


def complete(sock: socket.socket, received: bytes, timeout: float = 10) -> bytes:
    """Read the rest of an HTTP response whose head (maybe part of it) is in ``received``."""
    sock.settimeout(timeout)
    while True:
        head, _, body = received.partition(b"\r\n\r\n")
        if _:
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if len(body) >= length:
                return received
        try:
            more = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return received
        if not more:
            return received
        received += more


def auth_line() -> bytes:
    return b"".join(f"{k}: {v}\r\n".encode() for k, v in AUTH_HEADERS.items())


def post_oversized(port: int, path: str, *, chunked: bool) -> bytes:
    """POST a 3 MiB body (declared, or chunked without a length) and return the answer: the
    server answers as soon as it knows, without waiting for (or reading) the rest."""
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode() + auth_line()
            + (b"Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {3 * MIB}\r\n".encode()) + b"\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        received = b""
        chunk = b"a" * 65536
        frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk
        for _ in range(48):
            try:
                sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.01)
            try:
                received += sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                continue
            except ConnectionResetError:
                break
            if b"\r\n\r\n" in received:
                break
        received = complete(sock, received)
    return received


async def test_http_bodies_over_the_limit_are_refused_with_413(fuzz_stack: FaultStack) -> None:
    for service, path in (("enrollment", "/v1/patients"), ("pulse", "/v1/patients/IGA-X-1/pulse-doses"),
                          ("cells", "/v1/patients/IGA-X-1/harvests"), ("outcomes", "/v1/admin/rebuild"),
                          ("labs", "/v1/results")):
        port = port_of(fuzz_stack.url(service))
        for chunked in (False, True) if service != "outcomes" else (False,):  # outcomes reads no bodies
            answer = await asyncio.to_thread(post_oversized, port, path, chunked=chunked)
            status = answer[9:12]
            # labs' /v1/results reads 64 KiB itself and refuses with its own reason (422) first
            expected = (b"422",) if service == "labs" and chunked else (b"413",)
            assert status in expected, (service, chunked, answer[:300])
            assert b'"detail"' in answer and (b"limit" in answer), (service, chunked, answer[:300])
    async with fuzz_stack.client(timeout=10) as http:
        for service in SERVICES:
            assert (await http.get(fuzz_stack.url(service) + "/healthz")).status_code == 200


async def test_labs_refuses_oversized_results_on_every_channel_and_records_it(fuzz_stack: FaultStack) -> None:
    probe = await asyncio.to_thread(lambda: LabsProbe(fuzz_stack.url("labs"), fuzz_stack.mllp_port,
                                                      fuzz_stack.database_urls["labs"]))
    try:
        def exercise() -> None:
            before = probe.state()
            observation = {"resourceType": "Observation", "status": "final", "note": [{"text": "x" * (MIB + 10)}]}
            response = probe.post("/fhir/Observation", json.dumps(observation).encode())
            assert response.status_code == 413 and response.json()["resourceType"] == "OperationOutcome"
            assert response.json()["issue"][0]["diagnostics"]
            response = probe.post("/v1/results", json.dumps({"message_id": "big", "pad": "x" * 70_000}).encode(),
                                  "application/json")
            assert response.status_code == 422 and "limit" in response.json()["detail"]
            answer = ack_fields(probe.mllp(b"MSH|^~\\&|LIS|LAB|NT|STUDY|2015||ORU^R01|BIG|P|2.5\rNTE|1||"
                                           + b"x" * (MIB + 100)))
            assert answer["code"] == "AR" and "limit" in answer["text"], answer
            after = probe.state()
            assert after.results() == before.results()
            assert after.rejections >= before.rejections + 3

        await asyncio.to_thread(exercise)
    finally:
        await asyncio.to_thread(probe.close)


async def test_a_slow_http_body_is_cut_off(fuzz_stack: FaultStack) -> None:
    """Headers promise 200 bytes; then 1 byte a second: 408 after the body timeout."""
    port = port_of(fuzz_stack.url("enrollment"))

    def slow() -> tuple[float, bytes]:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /v1/patients HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 200\r\n" + auth_line() + b"\r\n")
            received = b""
            for _ in range(25):
                try:
                    sock.sendall(b"{")
                except (BrokenPipeError, ConnectionResetError):
                    break
                sock.settimeout(1.0)
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                received += chunk
                if b"\r\n\r\n" in received:
                    received = complete(sock, received)
                    break
        return time.monotonic() - started, received

    elapsed, answer = await asyncio.to_thread(slow)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"not received within" in answer
    assert elapsed < TIMEOUT + 6, elapsed


async def test_a_slow_http_request_head_is_disconnected(fuzz_stack: FaultStack) -> None:
    """A slowloris client: the request line and headers one byte a second. Closed after the head
    timeout; meanwhile the service answers others."""
    port = port_of(fuzz_stack.url("enrollment"))

    def slowloris() -> float:
        started = time.monotonic()
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 60
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            for byte in head:
                try:
                    sock.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                sock.settimeout(1.0)
                try:
                    if sock.recv(1024) == b"":
                        break
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    break
        return time.monotonic() - started

    task = asyncio.create_task(asyncio.to_thread(slowloris))
    await asyncio.sleep(1)
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.get(fuzz_stack.url("enrollment") + "/healthz")).status_code == 200
    elapsed = await task
    assert elapsed < TIMEOUT + 6, f"the slow client was held for {elapsed:.1f} s"


async def test_an_http_connection_flood_is_bounded_and_the_service_recovers(fuzz_stack: FaultStack) -> None:
    """More connections than the concurrency limit (64 in the fuzz stack): beyond it requests get
    503; once the flood's idle connections are closed (head timeout), service is normal."""
    port = port_of(fuzz_stack.url("pulse"))
    sockets = []
    try:
        for _ in range(80):
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(timeout=10) as http:
            refused = (await http.get(fuzz_stack.url("pulse") + "/healthz")).status_code
        assert refused == 503, refused
    finally:
        for sock in sockets:
            sock.close()
    await asyncio.sleep(TIMEOUT + 1)
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(fuzz_stack.url("pulse") + "/healthz")).status_code == 200


async def test_mllp_slow_idle_and_flooding_clients_are_bounded(fuzz_stack: FaultStack) -> None:
    port = fuzz_stack.mllp_port

    def slow_sender() -> tuple[float, bytes]:
        started = time.monotonic()
        message = b"\x0bMSH|^~\\&|LIS|LAB|NT|STUDY|2015||ORU^R01|SLOW|P|2.5\rPID|1||IGA-X-1\r"
        received = b""
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            for byte in message:
                try:
                    sock.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                sock.settimeout(1.0)
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                received += chunk
        return time.monotonic() - started, received

    elapsed, answer = await asyncio.to_thread(slow_sender)
    ack = ack_fields(answer)
    assert ack["code"] == "AR" and "within" in ack["text"], answer[:300]
    assert elapsed < TIMEOUT + 6

    def idle() -> float:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            assert sock.recv(10) == b""  # closed by the server, nothing sent
        return time.monotonic() - started

    assert await asyncio.to_thread(idle) < 5 + 6  # the fuzz stack's MLLP idle timeout is 5 s

    def flood() -> int:
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(30)]
        time.sleep(0.5)
        closed = 0
        for sock in held:
            sock.settimeout(0.2)
            try:
                if sock.recv(10) == b"":
                    closed += 1
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed += 1
        for sock in held:
            sock.close()
        return closed

    closed = await asyncio.to_thread(flood)
    assert closed >= 30 - 16, f"only {closed} of 30 connections refused with a limit of 16"
    # The flood's held connections free their slots when the server has read their close, a
    # moment after ours: until then a new connection is still refused (closed unanswered).
    deadline = time.monotonic() + 5
    while True:
        probe_answer = await asyncio.to_thread(
            mllp_exchange, port, b"MSH|^~\\&|LIS|LAB|NT|STUDY|2015||ORU^R01|AFTER|P|2.5")
        if probe_answer or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert ack_fields(probe_answer)["code"] in ("AR", "AE"), probe_answer


async def test_nats_payload_limits(fuzz_stack: FaultStack) -> None:
    url = fuzz_stack.nats_server.url  # type: ignore[attr-defined]
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        with pytest.raises((MaxPayloadError, nats.errors.Error)):
            await js.publish(LAB_RESULTS_SUBJECT, b"x" * (2 * MIB), headers={"Nats-Msg-Id": "too-big-for-nats"})
        body = json.dumps({"message_id": "big-for-labs", "pad": "x" * 100_000}).encode()
        await js.publish(LAB_RESULTS_SUBJECT, body, headers={"Nats-Msg-Id": "big-for-labs"})
    finally:
        await client.close()
    async with fuzz_stack.client(timeout=10) as http:
        deadline = time.monotonic() + 60
        while True:
            listed = (await http.get(fuzz_stack.url("labs") + "/v1/rejections?limit=50&code=payload_too_large")).json()
            if any(r["source"] == "broker" for r in listed):
                break
            assert time.monotonic() < deadline, "the oversized broker message was not refused"
            await asyncio.sleep(0.5)
        assert (await http.get(fuzz_stack.url("labs") + "/healthz")).status_code == 200
