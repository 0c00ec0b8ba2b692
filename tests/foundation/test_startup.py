"""A service starting while JetStream cannot answer yet — a cluster still electing its meta
leader, a node still recovering — waits for it instead of exiting (the cluster test saw a service
exit on `nats: timeout` from the stream API seconds after its three nodes started); one that
cannot have its HTTP port exits instead of hanging."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.broker import JETSTREAM_NOT_READY, until_jetstream_answers
from shared.outages import Dependency
from shared.service import Service
from tests.fault.infra import NATS_SERVER, NatsServer
from tests.inprocess import databases
from tests.stack import Stack


async def test_a_step_is_tried_again_while_jetstream_is_not_ready_and_other_errors_pass() -> None:
    calls = 0

    async def step() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise JETSTREAM_NOT_READY[calls % len(JETSTREAM_NOT_READY)]()
        return "created"

    assert await until_jetstream_answers(step, "streams", first_pause=0.01) == "created" and calls == 3

    async def refused() -> None:
        raise PermissionError("not allowed")

    with pytest.raises(PermissionError):
        await until_jetstream_answers(refused, "streams", first_pause=0.01)


class NatsWithoutJetStreamYet:
    """A nats-server on ``server``'s port without JetStream, until :meth:`enable_jetstream`
    restarts it there with JetStream (the client reconnects to the same URL)."""

    def __init__(self, tmp_path: Path) -> None:
        self.server = NatsServer(tmp_path / "nats")
        self.plain = subprocess.Popen([str(NATS_SERVER), "-a", "127.0.0.1", "-p", str(self.server.port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    async def enable_jetstream(self) -> None:
        self.plain.terminate()
        self.plain.wait(10)
        await self.server.astart()

    def stop(self) -> None:
        if self.plain.poll() is None:
            self.plain.kill()
        self.server.stop()


@pytest.fixture
async def pulse_beside_nats_without_jetstream(
    tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[Service, NatsWithoutJetStreamYet]]:
    """The pulse service (not started) configured for a NATS server that has no JetStream yet."""
    nats_server = NatsWithoutJetStreamYet(tmp_path)
    try:
        async with databases(("pulse",), backend="sqlite", tmp_path=tmp_path, prefix=prefix,
                             monkeypatch=monkeypatch) as urls:
            monkeypatch.setenv("NATS_URL", nats_server.server.url)
            yield Service("pulse", database=urls["pulse"]), nats_server
    finally:
        nats_server.stop()


async def test_a_service_started_before_jetstream_is_enabled_waits_and_then_starts(
    pulse_beside_nats_without_jetstream: tuple[Service, NatsWithoutJetStreamYet],
) -> None:
    service, nats_server = pulse_beside_nats_without_jetstream
    starting = asyncio.create_task(service.start())
    await asyncio.sleep(2.0)
    assert not starting.done(), starting.exception() if starting.done() else None  # waiting, not exited
    await nats_server.enable_jetstream()
    try:
        await asyncio.wait_for(starting, 60)
        info = await service.broker.connection.jetstream().stream_info(service.topology.service_stream("pulse").name)
        assert info.config.name == service.topology.service_stream("pulse").name
    finally:
        await service.stop()


async def test_a_connected_broker_whose_jetstream_cannot_answer_is_an_outage_until_it_does(
    pulse_beside_nats_without_jetstream: tuple[Service, NatsWithoutJetStreamYet],
) -> None:
    """The broker probe asks JetStream, not only the TCP connection: before, a JetStream timeout
    met by a consumer found the broker "answering at once" and, after three tries, dead-lettered
    a good message."""
    service, nats_server = pulse_beside_nats_without_jetstream
    service.outages.first_pause = 0.2
    await service.broker.connect()
    try:
        waiting = asyncio.create_task(service.outages.wait_out(Dependency.BROKER))
        await asyncio.sleep(3.0)
        assert not waiting.done() and service.outages.is_down(Dependency.BROKER)
        await nats_server.enable_jetstream()  # the client reconnects to it
        assert await asyncio.wait_for(waiting, 60) is True  # waited out, then resumed
        assert not service.outages.is_down(Dependency.BROKER)
    finally:
        await service.broker.stop()


async def test_a_service_whose_http_port_is_taken_exits_saying_so(tmp_path: Path, prefix: str) -> None:
    """uvicorn cannot bind the port after the service has started, so the service stops at once.
    Its consumer-lag watcher was then asking JetStream, and the stop waited for ever on it (a CI
    run's fault test waited 180 s for a service that was neither ready nor gone)."""
    stack = Stack(tmp_path, prefix, ["outcomes"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", stack.ports["outcomes"]))
        taken.listen()
        await stack.launch()
        process = stack.processes["outcomes"]
        try:
            deadline = time.monotonic() + 30
            while process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert process.poll() not in (None, 0), stack.log("outcomes")
            assert "address already in use" in stack.log("outcomes")
        finally:
            await stack.stop()
