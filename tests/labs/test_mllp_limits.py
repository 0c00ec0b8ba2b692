"""The MLLP listener's limits against slow and greedy clients, on an in-process server with short
timeouts (the labs store on SQLite): a trickle of one byte every 0.8 s gets one deadline per frame,
never one per byte, and one address cannot take every connection slot."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest

from services.labs.handlers import ingest_runner
from services.labs.mllp import MllpServer
from shared.store import EventStore
from tests.conftest import free_port
from tests.fuzz.probe import ack_fields, mllp_exchange
from tests.labs.conftest import sql_labs

pytestmark = pytest.mark.parametrize("backend", ["sqlite"])

IDLE, READ = 1.5, 1.5
TRICKLE_PAUSE = 0.8
"""The issue's trickle: one byte every 0.8 s."""
PER_ADDRESS = 3
PAYLOAD = b"MSH|^~\\&|LIS|LAB|NT|STUDY|2015||ORU^R01|LIMIT|P|2.5"
"""Refused (no PID): an answer is all these tests need."""
MESSAGE = b"\x0b" + PAYLOAD + b"\x1c\r"


@pytest.fixture
async def mllp(labs_store: EventStore) -> AsyncIterator[MllpServer]:
    server = MllpServer(ingest_runner(labs_store, sql_labs()), host="127.0.0.1", port=free_port(), idle_timeout=IDLE,
                        read_timeout=READ, max_connections=10, max_connections_per_address=PER_ADDRESS)
    task = asyncio.create_task(server.run())
    while server.server is None:
        await asyncio.sleep(0.01)
    yield server
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def trickle(port: int, data: bytes, *, limit: float = 12) -> tuple[float, bytes]:
    """Send ``data`` one byte every 0.8 s (again from the start when it is used up) until the
    server closes or ``limit`` seconds passed; returns the time held and what came back."""
    started = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=TRICKLE_PAUSE) as sock:
        sent = 0
        while time.monotonic() - started < limit:
            try:
                sock.sendall(data[sent % len(data):][:1])
                sent += 1
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
    return time.monotonic() - started, received


async def test_a_trickle_of_blank_lines_does_not_hold_a_connection(mllp: MllpServer) -> None:
    """Blank lines between frames are tolerated, but each one used to restart the idle wait."""
    held, answer = await asyncio.to_thread(trickle, mllp.port, b"\r")
    assert answer == b"" and held < IDLE + 2, f"held {held:.1f} s by a blank every {TRICKLE_PAUSE} s"


async def test_a_trickled_frame_is_cut_at_its_deadline_and_gets_no_more_time(mllp: MllpServer) -> None:
    held, answer = await asyncio.to_thread(trickle, mllp.port, MESSAGE)
    ack = ack_fields(answer)
    assert ack["code"] == "AR" and f"within {READ:g} s" in ack["text"], answer
    assert held < READ + 2, f"held {held:.1f} s"
    # a blank first (within the idle wait's deadline), then the frame (its own): never more than both
    held, answer = await asyncio.to_thread(trickle, mllp.port, b"\n" + MESSAGE)
    assert ack_fields(answer)["code"] == "AR" and held < IDLE + READ + 2, (held, answer)


async def test_one_address_cannot_take_every_connection(mllp: MllpServer) -> None:
    port = mllp.port
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(PER_ADDRESS)]
    try:
        while mllp.active < PER_ADDRESS:  # the server has counted them
            await asyncio.sleep(0.01)
        extra = await asyncio.to_thread(mllp_exchange, port, PAYLOAD, timeout=5)
        assert extra == b"", "the address's extra connection was served"
        other = await asyncio.to_thread(mllp_exchange, port, PAYLOAD, timeout=5, source="127.0.0.2")
        assert ack_fields(other)["code"] == "AR", "another address was locked out"
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while not await asyncio.to_thread(mllp_exchange, port, PAYLOAD, timeout=5):
        assert time.monotonic() < deadline, "the address's slots were not freed when its connections closed"
        await asyncio.sleep(0.1)

