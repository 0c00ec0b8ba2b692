"""The MLLP listener's limits against slow and greedy clients, on an in-process server with short
timeouts (the labs store on SQLite): a trickle of one byte every 0.8 s gets one deadline per frame,
never one per byte, and one address cannot take every connection slot."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest

from services.labs.ingest import LabIngestion
from services.labs.mllp import MllpServer
from shared.store import EventStore
from tests.conftest import free_port
from tests.fuzz.probe import ack_fields

pytestmark = pytest.mark.parametrize("backend", ["sqlite"])

IDLE, READ = 1.5, 1.5
TRICKLE_PAUSE = 0.8
"""The issue's trickle: one byte every 0.8 s."""
PER_ADDRESS = 3
MESSAGE = b"\x0bMSH|^~\\&|LIS|LAB|NT|STUDY|2015||ORU^R01|LIMIT-{n}|P|2.5\x1c\r"


@pytest.fixture
async def mllp(labs_store: EventStore) -> AsyncIterator[MllpServer]:
    server = MllpServer(labs_store, LabIngestion(), host="127.0.0.1", port=free_port(), idle_timeout=IDLE,
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


def connect_from(address: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((address, 0))  # every 127/8 address is the loopback on Linux
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


def exchange(sock: socket.socket, n: int) -> bytes:
    """One message on an open connection; the ACK frame, or b"" when the server closed it."""
    try:
        sock.sendall(MESSAGE.replace(b"{n}", str(n).encode()))
        received = b""
        while not received.endswith(b"\x1c\r"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received
    except (BrokenPipeError, ConnectionResetError):
        return b""


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

    def scenario() -> None:
        held = [connect_from("127.0.0.1", port) for _ in range(PER_ADDRESS)]
        try:
            assert all(ack_fields(exchange(sock, n))["code"] == "AR" for n, sock in enumerate(held))
            extra = connect_from("127.0.0.1", port)
            with extra:
                assert exchange(extra, 99) == b"", "the address's extra connection was served"
            with connect_from("127.0.0.2", port) as other:
                assert ack_fields(exchange(other, 100))["code"] == "AR", "another address was locked out"
        finally:
            for sock in held:
                sock.close()

        def freed() -> bool:
            with connect_from("127.0.0.1", port) as sock:
                return ack_fields(exchange(sock, 101))["code"] == "AR"

        assert _eventually(freed), "the address's slots were not freed when its connections closed"

    await asyncio.to_thread(scenario)


def _eventually(condition: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
