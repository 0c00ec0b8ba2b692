"""Fixtures of the fuzz suite: one stack of the five services on PostgreSQL, over a private NATS
server (fuzzing ``labs.results`` on the machine's shared NATS would feed garbage to every other
stack's labs service, since the contract's lab subjects are shared by every prefix), shared by
the suite's tests (short timeouts and small connection limits, so the limits tests are quick).

``NEPHROTRACK_FUZZ=full`` turns the bounded CI budgets into tens of thousands of cases (the
counts reached are recorded in docs/robustness.md).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.settings import SERVICES
from tests.fault.infra import FaultStack, NatsServer

FULL = os.environ.get("NEPHROTRACK_FUZZ", "").lower() == "full"


def budget(ci: int, full: int) -> int:
    """Examples per target: ``ci`` normally, ``full`` under NEPHROTRACK_FUZZ=full."""
    return full if FULL else ci


@pytest.fixture(scope="package")
async def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FaultStack]:
    tmp_path: Path = tmp_path_factory.mktemp("fuzz")
    server = NatsServer(tmp_path / "nats")
    await server.astart()
    stack = FaultStack(
        tmp_path, f"z{uuid.uuid4().hex[:10]}", SERVICES, backend="postgresql", nats_url=server.url,
        extra_env={
            "NEPHROTRACK_UNKNOWN_PATIENT_WAIT_SECONDS": "0.2",  # commands for unknown patients: 404 at once
            "NEPHROTRACK_MLLP_READ_TIMEOUT_SECONDS": "3",
            "NEPHROTRACK_MLLP_IDLE_TIMEOUT_SECONDS": "5",
            "NEPHROTRACK_BODY_TIMEOUT_SECONDS": "3",
            "NEPHROTRACK_HEAD_TIMEOUT_SECONDS": "3",
            "NEPHROTRACK_HTTP_MAX_CONCURRENCY": "64",
            "NEPHROTRACK_MLLP_MAX_CONNECTIONS": "16",
        },
    )
    stack.nats_server = server  # type: ignore[attr-defined]
    try:
        await stack.start()
        yield stack
    finally:
        await stack.stop()
        server.stop()
