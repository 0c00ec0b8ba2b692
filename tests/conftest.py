"""Fixtures for tests that talk to the machine's real PostgreSQL and NATS.

Each test gets fresh databases (one per backend) and its own subject prefix, so tests never see
each other's events even on a shared NATS server. Override the servers with
``NEPHROTRACK_TEST_POSTGRES`` (an SQLAlchemy URL without a database) and ``NEPHROTRACK_TEST_NATS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from hypothesis import strategies as st
from hypothesis.errors import NonInteractiveExampleWarning
from sqlalchemy.ext.asyncio import create_async_engine

from contracts import register_all
from services.labs import events as labs_private
from shared.broker import Topology
from shared.database import migrate
from shared.events import registry
from shared.store import MEMORY_URL, EventStore, open_store
from shared.tasks import within

pytest_plugins = ["tests.hangs"]

register_all(registry, *labs_private.EVENTS)  # what the services' composition roots register


@pytest.fixture(scope="session", autouse=True)
def hypothesis_unicode_table() -> None:
    """Hypothesis builds its table of Unicode characters the first time any test draws text, and
    counts that second against the drawing test (``HealthCheck.too_slow``): in a fresh clone
    (no ``.hypothesis``) the first property test with text failed for it, e.g. under
    ``make test-fast``. Build the table before the first test (a fixture: Hypothesis warns when
    it is done while pytest loads its plugins)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonInteractiveExampleWarning)
        st.text(min_size=1).example()


POSTGRES = os.environ.get("NEPHROTRACK_TEST_POSTGRES", "postgresql+asyncpg://postgres@127.0.0.1:5432")
NATS_URL = os.environ.get("NEPHROTRACK_TEST_NATS", "nats://127.0.0.1:4222")


@pytest.fixture(scope="session", autouse=True)
async def shared_lab_streams_emptied() -> None:
    """Delete the two streams every test stack shares (the contract's ``labs.results`` and
    ``labs.rejected``; each service creates them again when it starts). They keep every message
    for ever, and each test's new labs consumer reads all of them first: after a day of runs the
    labs tests slowed down and some waited in vain for their own message (README, Testing).
    Deleted, not purged: a purge keeps the 10-minute duplicate window, and the seed cohort's
    results (fixed message ids) sent by a run within it were dropped as duplicates, so the
    dashboard test's demo never saw its lab values. So ``make test`` needs a NATS of its own
    (``NEPHROTRACK_TEST_NATS``), never one holding a running stack's lab messages. Without a
    NATS server (``make test-fast``) there is nothing to delete."""
    try:
        client = await within(5, nats.connect(NATS_URL, connect_timeout=2, allow_reconnect=False))
    except (OSError, TimeoutError, nats.errors.Error):
        return
    try:
        js = client.jetstream()
        topology = Topology("test")
        for stream in (topology.lab_results_stream.name, topology.lab_rejected_stream.name):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(stream)
    finally:
        await client.drain()


BACKENDS = ["sqlite", "postgresql"]
STORE_BACKENDS = ["memory", *BACKENDS]
"""For a test of the event store's interface only (no SQL of its own): the in-memory store too.
A module opts in by overriding the ``backend`` fixture with these as its params."""


def new_database_url(backend: str, tmp_path: Path, service: str = "test") -> str:
    if backend == "memory":
        return MEMORY_URL
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / f'{service}-{uuid.uuid4().hex[:8]}.db'}"
    return f"{POSTGRES}/nt_{service}_{uuid.uuid4().hex[:12]}"


async def drop_database(url: str) -> None:
    if not url.startswith("postgresql"):
        return
    base, name = url.rsplit("/", 1)
    admin = create_async_engine(f"{base}/postgres", isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            await connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.dispose()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def database_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    url = new_database_url(backend, tmp_path)
    if backend != "memory":
        await asyncio.to_thread(migrate, "test", url)
    yield url
    await drop_database(url)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[EventStore]:
    event_store = open_store(database_url, subject_for=lambda e: f"test.{e.event_type}")
    yield event_store
    await event_store.close()


@pytest.fixture
def prefix(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    value = f"t{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("NEPHROTRACK_SUBJECT_PREFIX", value)
    yield value


@pytest.fixture
async def nats_client(prefix: str) -> AsyncIterator[nats.NATS]:
    client = await nats.connect(NATS_URL)
    yield client
    js = client.jetstream()
    for name in [s.config.name for s in await js.streams_info()]:
        if name.startswith(prefix.upper()):
            await js.delete_stream(name)
    await client.drain()


_handed_out: set[int] = set()


def _first_ephemeral_port() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A port for a server a test starts: free now, never handed out before in this run, and
    below the range the kernel picks from for port 0 and for outgoing connections. A port from
    port 0 may be given again to the next caller, or to a connection to PostgreSQL, in the seconds
    before the server binds it: a CI run lost a fault test to "address already in use"."""
    high = _first_ephemeral_port()
    while True:
        port = random.randrange(max(1024, high - 20_000), high)
        if port in _handed_out:
            continue
        _handed_out.add(port)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


@pytest.fixture
def topology(prefix: str) -> Topology:
    return Topology(prefix)
