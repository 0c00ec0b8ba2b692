"""Services run inside the test's own event loop (tests/stack.py runs them as processes), for
tests that change a part of one — a key bucket that refuses deletions — or restart it at will.
Each service has its own database, as a process would; they meet over the machine's NATS."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from importlib import import_module
from pathlib import Path

import httpx
import nats
import pytest

from shared.broker import Topology
from shared.database import migrate
from shared.keys import bucket_name
from shared.service import Service
from tests.conftest import NATS_URL, drop_database, free_port, new_database_url
from tests.stack import AUTH_HEADERS, TEST_API_KEYS

_LETTERS = str.maketrans("0123456789", "ghijklmnop")


def pseudonym(prefix: str, number: int) -> str:
    """A subject id enrollment accepts (it refuses runs of digits, which look like record numbers)."""
    return f"S-{prefix.translate(_LETTERS)}-{number:03d}"


@contextlib.asynccontextmanager
async def databases(
    services: Iterable[str], *, backend: str, tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[dict[str, str]]:
    """A migrated database per service and the environment the services read (prefix, NATS, keys,
    an MLLP port); on exit the databases, the stack's key bucket and its consumer on the shared
    ``labs.results`` stream go (its streams go with the ``nats_client`` fixture)."""
    monkeypatch.setenv("NATS_URL", NATS_URL)
    monkeypatch.setenv("NEPHROTRACK_API_KEYS", TEST_API_KEYS)
    monkeypatch.setenv("NEPHROTRACK_MLLP_PORT", str(free_port()))
    urls = {service: new_database_url(backend, tmp_path, service) for service in services}
    try:
        for service, url in urls.items():
            await asyncio.to_thread(migrate, service, url)
        yield urls
    finally:
        for url in urls.values():
            await drop_database(url)
        client = await nats.connect(NATS_URL)
        js = client.jetstream()
        topology = Topology(prefix)
        with contextlib.suppress(Exception):
            await js.delete_stream(f"KV_{bucket_name(topology)}")
        with contextlib.suppress(Exception):
            await js.delete_consumer(topology.lab_results_stream.name, f"{prefix}-labs-results")
        await client.drain()


@contextlib.asynccontextmanager
async def running(
    name: str, database_url: str, adjust: Callable[[Service], None] = lambda service: None
) -> AsyncIterator[tuple[Service, httpx.AsyncClient]]:
    """The service started (``adjust`` may change it first) and a client of its HTTP API; a
    500 comes back as a response, as from a process."""
    service = Service(name, database=database_url)
    adjust(service)
    app = import_module(f"services.{name}.app").create_app(service)
    await service.start()
    try:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{name}", headers=AUTH_HEADERS,
                                     timeout=30) as client:
            yield service, client
    finally:
        await service.stop()
