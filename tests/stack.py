"""Run services as real processes for integration tests, the way ``nephrotrack run`` and
docker-compose do: one process per service, each with its own database, over a real NATS.

Ports are picked free, and a per-test subject prefix keeps each stack's events to itself, so a
test stack can run beside anything else on the machine (including the machine's own NATS).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import httpx
import nats

from shared.database import migrate
from shared.settings import DEFAULT_PORTS
from tests.conftest import NATS_URL, drop_database, free_port, new_database_url

ROOT = Path(__file__).resolve().parents[1]

# One key holding every role, so a test's client can do what the test needs; tests of the
# roles themselves configure separate keys.
TEST_API_KEY = "nephrotrack-test-key"
TEST_API_KEYS = ",".join(f"{role}:{TEST_API_KEY}" for role in ("staff", "analyst", "operator"))
AUTH_HEADERS = {"Authorization": f"Bearer {TEST_API_KEY}"}


class Stack:
    def __init__(
        self,
        tmp_path: Path,
        prefix: str,
        services: Iterable[str],
        *,
        backend: str = "postgresql",
        nats_url: str = NATS_URL,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.services = list(services)
        self.prefix = prefix
        self.tmp_path = tmp_path
        self.ports = {service: free_port() for service in DEFAULT_PORTS}
        self.mllp_port = free_port()
        self.database_urls = {service: new_database_url(backend, tmp_path, service) for service in self.services}
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "NATS_URL": nats_url,
            "NEPHROTRACK_SUBJECT_PREFIX": prefix,
            "NEPHROTRACK_VAR": str(tmp_path / "var"),
            "NEPHROTRACK_MLLP_PORT": str(self.mllp_port),
            "NEPHROTRACK_API_KEYS": TEST_API_KEYS,
            **{f"NEPHROTRACK_{s.upper()}_PORT": str(p) for s, p in self.ports.items()},
            **{f"DATABASE_URL_{s.upper()}": url for s, url in self.database_urls.items()},
            **(extra_env or {}),
        }
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def client(self, **options: object) -> httpx.AsyncClient:
        """An HTTP client that authenticates with the test key (every role)."""
        return httpx.AsyncClient(headers=AUTH_HEADERS, **options)  # type: ignore[arg-type]

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    async def start(self) -> None:
        await self.launch()
        await self.wait_ready(self.services)

    async def launch(self) -> None:
        """Migrate the databases and start the service processes, without waiting for them."""
        for service, url in self.database_urls.items():
            await asyncio.to_thread(migrate, service, url)
        for service in self.services:
            self.start_service(service)

    def service_env(self, service: str) -> dict[str, str]:
        """The environment of ``service``'s processes (the same for all here; a stack whose broker
        has a user per service gives each its own ``NATS_URL``)."""
        return self.env

    def start_service(self, service: str) -> None:
        log = open(self.tmp_path / f"{service}.log", "ab")  # noqa: SIM115 - closed with the process
        self.processes[service] = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"], env=self.service_env(service), stdout=log,
            stderr=subprocess.STDOUT, cwd=ROOT,
        )

    def kill(self, service: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes[service]
        process.send_signal(sig)
        process.wait(10)

    async def wait_ready(self, services: Iterable[str], timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(services)
        async with self.client(timeout=2) as client:  # /readyz needs the operator role
            while pending:
                for service in list(pending):
                    if self.processes[service].poll() is not None:
                        raise RuntimeError(f"{service} exited:\n{self.log(service)}")
                    try:
                        if (await client.get(f"{self.url(service)}/readyz")).status_code == 200:
                            pending.discard(service)
                    except httpx.HTTPError:
                        pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not ready after {timeout}s: {pending}\n" + "\n".join(self.log(s) for s in pending))
                await asyncio.sleep(0.2)

    def log(self, service: str) -> str:
        path = self.tmp_path / f"{service}.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""

    async def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        for url in self.database_urls.values():
            await drop_database(url)


async def eventually(check, timeout: float = 20.0, interval: float = 0.2):  # type: ignore[no-untyped-def]
    """Poll an async ``check`` until it returns a truthy value (returned) or time runs out."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = await check()
            if last:
                return last
        except (httpx.HTTPError, AssertionError, KeyError, IndexError) as exc:
            last = exc
        await asyncio.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout}s; last: {last!r}")


@contextlib.asynccontextmanager
async def running(stack: Stack) -> AsyncIterator[nats.js.JetStreamContext]:
    """The stack started, and JetStream on its NATS for the test to read; on exit the stack is
    stopped and the streams of its subject prefix deleted."""
    client = await nats.connect(stack.env["NATS_URL"])
    try:
        await stack.start()
        yield client.jetstream()
    finally:
        await stack.stop()
        js = client.jetstream()
        for name in [s.config.name for s in await js.streams_info()]:
            if name.startswith(stack.prefix.upper()):
                await js.delete_stream(name)
        await client.drain()
