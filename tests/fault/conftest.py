"""Fixtures of the fault suite: a private NATS server per test (see tests/fault/infra.py) and a
stack of the five services on PostgreSQL pointed at it."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.settings import SERVICES
from tests.fault.infra import FaultStack, NatsServer
from tests.fault.send import Target

FULL = os.environ.get("NEPHROTRACK_FAULTS", "").lower() == "full"
"""``NEPHROTRACK_FAULTS=full`` (set by ``make test-faults``): the long scenarios, thousands of
inputs each. Without it only the short scenario runs (part of ``make test``)."""

full_only = pytest.mark.skipif(not FULL, reason="long fault scenario: run with NEPHROTRACK_FAULTS=full (make test-faults)")


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    await server.astart()
    yield server
    server.stop()


STACK_ENV = {"NEPHROTRACK_UNKNOWN_PATIENT_WAIT_SECONDS": "20"}


@pytest.fixture
async def stack(tmp_path: Path, nats_server: NatsServer, request: pytest.FixtureRequest) -> AsyncIterator[FaultStack]:
    """The five services on PostgreSQL; a test marked ``@pytest.mark.stack_env(NAME="value")``
    adds environment variables of its own."""
    marker = request.node.get_closest_marker("stack_env")
    stack = FaultStack(tmp_path, f"f{uuid.uuid4().hex[:10]}", SERVICES, backend="postgresql",
                       nats_url=nats_server.url, extra_env={**STACK_ENV, **(marker.kwargs if marker else {})})
    try:
        await stack.start()
        yield stack
    finally:
        await stack.stop()


def target_of(stack: FaultStack, nats_url: str, *, extra: dict[str, list[str]] | None = None,
              mllp_ports: list[int] | None = None) -> Target:
    urls = {service: [stack.url(service)] for service in SERVICES}
    for service, more in (extra or {}).items():
        urls[service] = urls[service] + more
    return Target(urls=urls, mllp_ports=mllp_ports or [stack.mllp_port], nats_url=nats_url)
