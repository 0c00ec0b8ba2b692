"""Stopping a service (shared.service.Service.stop) ends what it started and nothing more: its
background tasks and the probe loops of its outages go, and the stopper's own cancellation is
never swallowed on the way.

A CI run hung on both: a test cancelled at its timeout went on inside ``stop`` (the
cancellation suppressed while it waited for a background task), started the next service
against a database already dropped, and a probe loop left behind asked that database for ever."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from shared.outages import Dependency
from shared.service import Service
from tests.inprocess import databases


@pytest.fixture
async def enrollment_url(tmp_path: Path, prefix: str, nats_client: nats.NATS,
                         monkeypatch: pytest.MonkeyPatch) -> object:
    async with databases(("enrollment",), backend="sqlite", tmp_path=tmp_path, prefix=prefix,
                         monkeypatch=monkeypatch) as urls:
        yield urls["enrollment"]


async def test_a_stop_cancelled_while_it_waits_for_a_background_task_is_cancelled(enrollment_url: str) -> None:
    service = Service("enrollment", database=enrollment_url)
    cleaned_up = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await cleaned_up.wait()  # a cleanup that takes its time (a flush, a lease released)

    service.background.append(slow_to_stop)
    await service.start()
    stopping = asyncio.create_task(service.stop())
    await asyncio.sleep(0.2)
    stopping.cancel()
    done, _ = await asyncio.wait([stopping], timeout=5)
    cleaned_up.set()
    await service.stop()
    assert done, "the cancelled stop went on waiting for the background task"
    assert stopping.cancelled()


async def test_a_stopped_service_leaves_no_probe_loop_behind(enrollment_url: str) -> None:
    service = Service("enrollment", database=enrollment_url)
    await service.start()

    async def never_answers() -> None:
        raise ConnectionRefusedError(111, "refused")

    service.outages.probes[Dependency.STORE] = never_answers
    service.outages.first_pause = 0.01
    waiting = asyncio.create_task(service.outages.wait_out(Dependency.STORE))
    while not service.outages.is_down(Dependency.STORE):
        await asyncio.sleep(0.01)
    assert _probe_loops(), "the outage started no probe loop"
    await service.stop()
    waiting.cancel()
    assert not _probe_loops()


def _probe_loops() -> list[asyncio.Task[object]]:
    return [task for task in asyncio.all_tasks()
            if not task.done() and task.get_coro().__qualname__ == "Outages._probe_until_back"]
