"""A three-node NATS JetStream cluster on loopback, from the committed deploy/nats/ configuration
(cluster/nats-{1,2,3}.conf with accounts.conf: routes authenticated by the route password, a user
per service, the ``lab`` and ``operator`` users), for tests/fault/test_cluster.py.

Each node runs the configuration as committed except its JetStream store directory (the
container's ``/data``) and its ports (free loopback ports given on the command line). A node can
be SIGKILLed and started again on the same ports — with its store wiped, so that it has to catch
up from its peers by RAFT, as a node whose disk was replaced does.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import nats
from nats.js.api import StreamInfo

from shared.broker import nats_connect_options
from shared.settings import SERVICES
from tests.conftest import free_port
from tests.fault.infra import NATS_SERVER
from tests.stack import ROOT

NATS_DIR = ROOT / "deploy" / "nats"
NODES = ("nats-1", "nats-2", "nats-3")
USERS = (*SERVICES, "lab", "operator", "sys")
LOG_TROUBLE = re.compile(r"authentication error|authorization violation|permissions violation|user not found",
                         re.IGNORECASE)
"""What a node logs when a client (or a route) is refused: none of it may appear in the run."""


@dataclass
class ClusterNode:
    name: str
    directory: Path
    client_port: int
    route_port: int
    monitor_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def store(self) -> Path:
        return self.directory / "store"

    @property
    def log_path(self) -> Path:
        return self.directory / "nats-server.log"

    def monitor(self, endpoint: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/{endpoint}", timeout=2) as response:
            return json.loads(response.read())

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class NatsCluster:
    """``start()`` the three nodes; ``url(user)`` is ``NATS_URL`` for one of accounts.conf's users
    (all three nodes, comma-separated); ``kill``/``start_node`` one node."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.passwords = {user: f"pw-{user}-{os.urandom(6).hex()}" for user in USERS}
        self.route_password = os.urandom(16).hex()
        self.nodes = {name: ClusterNode(name, directory / name, free_port(), free_port(), free_port()) for name in NODES}
        self._write_configuration()

    def _write_configuration(self) -> None:
        conf = self.directory / "conf"
        (conf / "cluster").mkdir(parents=True, exist_ok=True)
        shutil.copy(NATS_DIR / "accounts.conf", conf / "accounts.conf")
        for node in self.nodes.values():
            text = (NATS_DIR / "cluster" / f"{node.name}.conf").read_text()
            patched, count = re.subn(r'store_dir:\s*"/data"', f'store_dir: "{node.store}"', text)
            assert count == 1, f"{node.name}.conf: expected exactly one store_dir"
            (conf / "cluster" / f"{node.name}.conf").write_text(patched)

    def env(self) -> dict[str, str]:
        routes = ", ".join(f"nats-route://route:{self.route_password}@127.0.0.1:{node.route_port}"
                           for node in self.nodes.values())
        inherited = {key: value for key, value in os.environ.items() if not key.startswith("NATS_")}
        return {**inherited, **{f"NATS_{user.upper()}_PASSWORD": pw for user, pw in self.passwords.items()},
                "NATS_ROUTE_PASSWORD": self.route_password, "NATS_CLUSTER_ROUTES": f"[{routes}]"}

    def url(self, user: str) -> str:
        """``NATS_URL`` as ``user``: every node, the credentials on the first."""
        first, *others = self.nodes.values()
        credentials = f"{quote(user, safe='')}:{quote(self.passwords[user], safe='')}@"
        return ",".join([f"nats://{credentials}127.0.0.1:{first.client_port}",
                         *(f"nats://127.0.0.1:{node.client_port}" for node in others)])

    # --- processes --------------------------------------------------------------------------

    async def start(self, timeout: float = 60.0) -> None:
        for name in self.nodes:
            self.start_node(name)
        await self.wait_meta_leader(timeout)

    def start_node(self, name: str, *, wipe: bool = False) -> None:
        node = self.nodes[name]
        if wipe:
            shutil.rmtree(node.store, ignore_errors=True)
        node.store.mkdir(parents=True, exist_ok=True)
        config = self.directory / "conf" / "cluster" / f"{name}.conf"
        argv = [str(NATS_SERVER), "-c", str(config), "-a", "127.0.0.1", "-p", str(node.client_port),
                "-m", str(node.monitor_port), "--cluster", f"nats://127.0.0.1:{node.route_port}"]
        log = node.log_path.open("ab")
        node.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env())
        log.close()
        deadline = time.monotonic() + 20
        while True:
            if node.process.poll() is not None:
                raise RuntimeError(f"{name} exited with {node.process.returncode}: {node.log_path.read_text()[-3000:]}")
            try:
                node.monitor("varz")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not listen: {node.log_path.read_text()[-3000:]}") from None
                time.sleep(0.1)

    def kill(self, name: str) -> None:
        """SIGKILL: what a crashed machine does to its node."""
        process = self.nodes[name].process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(10)

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.running:
                assert node.process is not None
                node.process.terminate()
        for node in self.nodes.values():
            if node.process is not None:
                try:
                    node.process.wait(10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()

    async def wait_meta_leader(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        meta: dict[str, Any] = {}
        while time.monotonic() < deadline:
            for node in self.nodes.values():
                if not node.running:
                    continue
                try:
                    meta = node.monitor("jsz").get("meta_cluster", {})
                except OSError:
                    continue
                if meta.get("leader") and meta.get("cluster_size") == len(self.nodes):
                    return str(meta["leader"])
            await asyncio.sleep(0.25)
        raise TimeoutError(f"no JetStream meta leader within {timeout} s: {meta}")

    def log_trouble(self) -> list[str]:
        """Every authentication or permission error the nodes logged."""
        return [f"{node.name}: {line}" for node in self.nodes.values() if node.log_path.exists()
                for line in node.log_path.read_text(errors="replace").splitlines() if LOG_TROUBLE.search(line)]

    # --- JetStream, as the operator ---------------------------------------------------------

    async def operator(self) -> nats.NATS:
        return await nats.connect(**nats_connect_options(self.url("operator"), connect_timeout=3,
                                                         max_reconnect_attempts=-1, reconnect_time_wait=0.5))

    async def streams(self, client: nats.NATS) -> list[StreamInfo]:
        js = client.jetstream(timeout=5)
        return sorted(await js.streams_info(), key=lambda info: info.config.name or "")

    async def move_leader(self, client: nats.NATS, stream: str, to: str, timeout: float = 30.0) -> None:
        """Make ``to`` the leader of ``stream`` (a stepdown with a preferred peer, repeated until
        it holds: the election may pick another)."""
        js = client.jetstream(timeout=5)
        deadline = time.monotonic() + timeout
        while (leader := (await js.stream_info(stream)).cluster.leader) != to:  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{stream}: leader stays {leader}, not {to}")
            request = {"placement": {"preferred": to}}
            await client.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", json.dumps(request).encode(), timeout=5)
            await asyncio.sleep(1.0)
