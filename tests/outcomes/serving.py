"""A real outcomes process (uvicorn, in the test's event loop) on a fresh database, fed a run of
events through the real NATS, answered over HTTP once its projection has caught up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import nats
import pytest
import uvicorn

from services.outcomes.app import create_app
from shared.broker import Topology
from shared.database import migrate
from shared.service import Service
from tests.conftest import NATS_URL, drop_database, free_port, new_database_url
from tests.outcomes.mixed_run import Published, publish
from tests.stack import AUTH_HEADERS, TEST_API_KEYS


@contextlib.asynccontextmanager
async def outcomes_api(
    run: list[Published], backend: str, tmp_path: Path, nats_client: nats.NATS, topology: Topology,
    monkeypatch: pytest.MonkeyPatch, *, api_keys: str = TEST_API_KEYS, headers: dict[str, str] = AUTH_HEADERS,
) -> AsyncIterator[httpx.AsyncClient]:
    """``api_keys``/``headers``: the keys the process knows and the client's (one key for every role
    unless a test tells roles apart)."""
    monkeypatch.setenv("NATS_URL", NATS_URL)
    monkeypatch.setenv("NEPHROTRACK_API_KEYS", api_keys)
    url = new_database_url(backend, tmp_path, "outcomes")
    await asyncio.to_thread(migrate, "outcomes", url)
    try:
        async with outcomes_process(url, headers=headers) as client:
            await publish(nats_client.jetstream(), topology, run)
            await caught_up(client, len(run))
            yield client
    finally:
        await drop_database(url)


@contextlib.asynccontextmanager
async def outcomes_process(url: str, timeout: float = 10,
                           headers: dict[str, str] = AUTH_HEADERS) -> AsyncIterator[httpx.AsyncClient]:
    """One outcomes process on a migrated database, and a client with the test key; stopping it
    and starting another on the same database is a restart."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(Service("outcomes", database=url)), host="127.0.0.1",
                                           port=port, log_config=None, access_log=False))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=timeout, headers=headers) as client:
            yield client
    finally:
        server.should_exit = True
        await serving


async def caught_up(client: httpx.AsyncClient, published: int, timeout: float = 15) -> None:
    for _ in range(int(timeout / 0.1)):
        sources = (await client.get("/v1/freshness")).json()["sources"]
        if all(s["pending"] == 0 for s in sources) and sum(s["last_sequence"] for s in sources) == published:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"projection did not catch up: {sources}")
