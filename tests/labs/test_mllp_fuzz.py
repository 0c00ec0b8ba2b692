"""Fuzzing the MLLP listener of a running labs process with random bytes: whatever arrives, the
server answers with an ACK frame (AR/AE, with a reason) or closes the connection cleanly, and
keeps serving the next client."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import NATS_URL
from tests.labs.test_labs_service import forget_lab_consumer
from tests.stack import Stack

pytestmark = pytest.mark.slow

VALID = (
    "MSH|^~\\&|LIS|LAB|NEPHROTRACK|STUDY|20150601093000||ORU^R01|{control}|P|2.5\r"
    "PID|1||S-FUZZ-UNENROLLED\r"
    "OBR|1||F-{control}||||20150601083000\r"
    "OBX|1|NM|2160-0^Creatinine^LN||2.1|mg/dL|||||F\r"
)


@pytest.fixture(scope="module")
async def mllp_port(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[int]:
    tmp_path: Path = tmp_path_factory.mktemp("mllp-fuzz")
    prefix = f"t{uuid.uuid4().hex[:10]}"
    stack = Stack(tmp_path, prefix, ["labs"], backend="sqlite", extra_env={"NEPHROTRACK_MLLP_READ_TIMEOUT_SECONDS": "5"})
    try:
        await stack.start()
        yield stack.mllp_port
    finally:
        await stack.stop()
        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()
        for name in [s.config.name for s in await js.streams_info()]:
            if name.startswith(prefix.upper()):
                await js.delete_stream(name)
        await forget_lab_consumer(js, prefix)
        await nc.drain()


def exchange(port: int, data: bytes, *, half_close: bool) -> bytes:
    """Send ``data``; return the first ACK frame, or what came before the server closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while b"\x1c\r" not in received:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        return received


def assert_ack_or_clean_close(answer: bytes) -> None:
    if not answer:
        return  # closed without a word: allowed (e.g. only blanks were sent)
    assert answer.startswith(b"\x0b") and answer.endswith(b"\x1c\r"), answer[:200]
    segments = answer[1:-2].decode("ascii").split("\r")
    assert segments[0].startswith("MSH|^~\\&|")
    msa = segments[1].split("|")
    assert msa[0] == "MSA" and msa[1] in ("AA", "AE", "AR")
    if msa[1] != "AA":
        assert len(msa) > 3 and msa[3], "a refusal states its reason in MSA-3"


def assert_still_serving(port: int) -> None:
    control = f"OK{uuid.uuid4().hex[:12]}"
    answer = exchange(port, b"\x0b" + VALID.format(control=control).encode() + b"\x1c\r", half_close=False)
    assert f"MSA|AA|{control}".encode() in answer, answer


FUZZ = settings(max_examples=100, deadline=timedelta(seconds=20), suppress_health_check=[HealthCheck.function_scoped_fixture])

hl7ish = st.lists(
    st.sampled_from([b"MSH|^~\\&|", b"PID|1||", b"OBX|1|NM|2160-0^^LN||", b"OBR|1||F|||", b"|", b"^", b"\r", b"\\",
                     b"\x0b", b"\x1c", b"2.5", b"ORU^R01", b"\x00", b"\xff", "é".encode(), b"20150601"]),
    max_size=40,
).map(b"".join)


@FUZZ
@given(payload=st.binary(max_size=4096) | hl7ish)
def test_random_bytes_in_a_frame_get_an_ack(mllp_port: int, payload: bytes) -> None:
    assert_ack_or_clean_close(exchange(mllp_port, b"\x0b" + payload + b"\x1c\r", half_close=False))


@FUZZ
@given(data=st.binary(max_size=4096) | hl7ish)
def test_random_unframed_bytes_are_answered_or_closed(mllp_port: int, data: bytes) -> None:
    assert_ack_or_clean_close(exchange(mllp_port, data, half_close=True))


def test_the_server_still_serves_after_the_fuzzing(mllp_port: int) -> None:
    assert_still_serving(mllp_port)
