"""Beyond one machine (issue 19): the stack on a three-node NATS JetStream cluster with every
stream and the key bucket replicated three times, two replicas of every service — and mid-load
the node that leads the labs streams and the key bucket is SIGKILLed together with one replica
of each service, then started again with its store wiped, so it catches up from its peers by RAFT.

The nodes run the committed deploy/nats/ configuration (cluster/nats-{1,2,3}.conf, accounts.conf):
each service connects as its own user to ``NATS_URL`` = all three nodes, the lab systems as
``lab``. Checked and printed: sent / accepted / rejected, lost = 0, duplicated = 0, the rebuilt
projection equal to the live one, every message the log (service and lab streams) held before
the loss still there,
every enrolled patient's key still in the bucket, no dead letter, every stream with
``num_replicas=3`` and all its replicas
current within 60 s of the node's return, no surviving service exited, no 5xx but 503 with
``Retry-After``, no authentication or permission error in the nodes' logs, and the longest
outage each client saw.

Sensitivity: the same scenario with ``NEPHROTRACK_STREAM_REPLICAS=1`` fails (the wiped node took
the only copy of its streams, and of every patient's key, with it) — :func:`test_one_replica_loses_data`.
The numbers of both runs are in docs/robustness.md. Before all that, one client shows the
failover itself: credentials on the first node of ``NATS_URL`` only, that node killed, the client
goes on at another as the same user. ``make test`` runs that and the short scenario;
``make test-faults`` (``NEPHROTRACK_FAULTS=full``) the long one and the sensitivity run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest

from shared.broker import Topology, ensure_streams, nats_connect_options
from shared.keys import bucket_name, key_name
from shared.settings import SERVICES
from tests.fault.cluster import NatsCluster
from tests.fault.conftest import STACK_ENV, full_only
from tests.fault.infra import FaultStack
from tests.fault.load import PatientPlan, make_plan
from tests.fault.send import Ledger, Sender, Target
from tests.fault.verify import converge, read_stream, rebuild_and_compare

pytestmark = [pytest.mark.fault, pytest.mark.slow]

PREFIX = "nephrotrack"  # the prefix deploy/nats/accounts.conf's permissions name
TOPOLOGY = Topology(PREFIX)
KEY_STREAM = f"KV_{bucket_name(TOPOLOGY)}"
LABS_STREAMS = (TOPOLOGY.lab_results_stream.name, TOPOLOGY.service_stream("labs").name)
CATCH_UP_SECONDS = 60.0


class ClusterStack(FaultStack):
    """The five services on PostgreSQL against the cluster, each as its own NATS user."""

    def __init__(self, tmp_path: Path, cluster: NatsCluster, replicas: int) -> None:
        super().__init__(tmp_path, PREFIX, SERVICES, backend="postgresql", nats_url=cluster.url("operator"),
                         extra_env={**STACK_ENV, "NEPHROTRACK_STREAM_REPLICAS": str(replicas)})
        self.cluster = cluster

    def service_env(self, service: str) -> dict[str, str]:
        return {**self.env, "NATS_URL": self.cluster.url(service)}

    def logs(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.log_paths())


@dataclass
class Outcome:
    """What one run found; ``failures`` empty when it held."""

    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def check(self, holds: bool, failure: str) -> None:
        if not holds:
            self.failures.append(failure)

    def say(self, line: str) -> None:
        print(line)
        self.lines.append(line)


async def replicas_current(cluster: NatsCluster, client: nats.NATS, timeout: float) -> tuple[float, list[str]]:
    """Seconds until every stream has three replicas, all current with no lag (or ``timeout``),
    and what was still behind then."""
    started = time.monotonic()
    while True:
        behind = []
        try:
            for info in await cluster.streams(client):
                replicas = (info.cluster.replicas if info.cluster else None) or []
                if info.config.num_replicas != 3 or len(replicas) != 2:
                    behind.append(f"{info.config.name}: num_replicas={info.config.num_replicas}, "
                                  f"{len(replicas) + 1} peers")
                behind += [f"{info.config.name}: {peer.name} current={peer.current} lag={peer.lag}"
                           for peer in replicas if not peer.current or peer.offline or peer.lag]
        except Exception as error:  # the cluster may still be electing
            behind = [repr(error)]
        waited = time.monotonic() - started
        if not behind or waited > timeout:
            return waited, behind
        await asyncio.sleep(1.0)


LOG_STREAMS = (*(TOPOLOGY.service_stream(service).name for service in SERVICES),
               TOPOLOGY.lab_results_stream.name, TOPOLOGY.lab_rejected_stream.name)


async def log_contents(cluster: NatsCluster) -> dict[str, set[str]]:
    """The messages of every stream of the log (service events, lab inputs and refusals), by
    ``Nats-Msg-Id`` (every publisher of ours sets one)."""
    contents = {}
    for stream in LOG_STREAMS:
        messages = await read_stream(cluster.url("operator"), stream)
        contents[stream] = {headers.get("Nats-Msg-Id") or f"{subject}:{hash(data)}" for subject, data, headers in messages}
    return contents


def missing_from_the_log(before: dict[str, set[str]], after: dict[str, set[str]]) -> dict[str, int]:
    """Per stream: messages it held before the loss and holds no longer."""
    return {stream: len(held - after.get(stream, set())) for stream, held in before.items() if held - after.get(stream, set())}


async def keys_lost(client: nats.NATS, ledger: Ledger, plans: list[PatientPlan]) -> int:
    """Enrolled patients whose data key the bucket no longer holds: their data are unreadable to
    any process that starts from now on (a restarted service, a rebuild of its own)."""
    kv = await client.jetstream(timeout=5).key_value(bucket_name(TOPOLOGY))
    lost = 0
    for plan in plans:
        if f"enroll:{plan.subject_id}" not in ledger.accepted:
            continue
        try:
            await kv.get(key_name(plan.subject_id))
        except nats.js.errors.KeyNotFoundError:
            lost += 1
    return lost


async def cluster_scenario(tmp_path: Path, replicas: int, plans: list[PatientPlan], *, down_for: float,
                           label: str, load_deadline: float = 600.0) -> Outcome:
    outcome = Outcome()
    cluster = NatsCluster(tmp_path / "cluster")
    await cluster.start()
    operator = await cluster.operator()
    stack = ClusterStack(tmp_path, cluster, replicas)
    try:
        # a stream from before NEPHROTRACK_STREAM_REPLICAS, with one replica: the services raise it
        await ensure_streams(operator.jetstream(), [TOPOLOGY.lab_rejected_stream])
        await stack.start()
        second = {service: stack.start_instance(service, 2) for service in SERVICES}
        for name in second.values():
            await stack.wait_instance_ready(name)
        survivors = {service: [f"http://127.0.0.1:{stack.extra_ports[name]}"] for service, name in second.items()}
        target = Target(urls={service: [stack.url(service), *survivors[service]] for service in SERVICES},
                        mllp_ports=[stack.mllp_port, stack.extra_mllp_ports[second["labs"]]],
                        nats_url=cluster.url("lab"), reader_nats_url=cluster.url("operator"))

        js = operator.jetstream(timeout=5)
        victim = (await js.stream_info(KEY_STREAM)).cluster.leader  # type: ignore[union-attr]
        assert victim is not None
        if replicas > 1:
            for stream in LABS_STREAMS:
                await cluster.move_leader(operator, stream, victim)
        hosted = [info.config.name for info in await cluster.streams(operator)
                  if info.cluster and victim in {info.cluster.leader, *(p.name for p in info.cluster.replicas or [])}]
        outcome.say(f"[{label}] victim {victim} leads {KEY_STREAM} and holds {', '.join(sorted(hosted))}")
        caught_up: list[tuple[float, list[str]]] = []
        logged: list[dict[str, set[str]]] = []  # the log just before the loss
        moved: list[str] = []  # the services' users connected to the victim when it died

        async def faults(sender: Sender) -> None:
            await sender.wait_progress(0.3)
            while sum(f"enroll:{plan.subject_id}" in sender.ledger.accepted for plan in plans) < len(plans) // 2:
                await asyncio.sleep(0.1)  # mid-load for the clinics too: half the cohort enrolled
            logged.append(await log_contents(cluster))
            connections = cluster.nodes[victim].monitor("connz?auth=true&limit=1024").get("connections") or []
            moved.extend(c["authorized_user"] for c in connections if c.get("authorized_user") in SERVICES)
            cluster.kill(victim)
            for service in SERVICES:
                stack.kill(service)
            await asyncio.sleep(down_for)
            cluster.start_node(victim, wipe=True)
            caught_up.append(await replicas_current(cluster, operator, CATCH_UP_SECONDS))

        started = time.monotonic()
        ledger = Ledger()
        async with Sender(target, ledger) as sender:
            load = asyncio.create_task(sender.send(plans))
            await faults(sender)
            try:  # a client retries an input for up to 5 min: after a loss, a patient's inputs may each wait that long
                await asyncio.wait_for(load, max(1.0, load_deadline - (time.monotonic() - started)))
            except TimeoutError:
                outcome.check(False, f"the load did not finish within {load_deadline:.0f} s: "
                                     f"{ledger.total - ledger.answered} inputs unanswered")
        outcome.say(f"[{label}] load: {ledger.answered} of {ledger.total} inputs answered in "
                    f"{time.monotonic() - started:.1f} s")

        alive = Target(urls=survivors, mllp_ports=[stack.extra_mllp_ports[second["labs"]]],
                       nats_url=target.nats_url, reader_nats_url=target.reader_nats_url)
        report = await converge(alive, plans, ledger, timeout=180)
        outcome.say(f"[{label}] {report.summary()}")
        outcome.check(report.ok and report.lost == 0 and report.duplicated == 0,
                      f"{report.summary()}\n" + "\n".join(report.problems[:15]))
        try:
            differences = await rebuild_and_compare(alive, [p.subject_id for p in plans], timeout=180)
        except (AssertionError, TimeoutError) as error:
            differences = [f"rebuild did not finish: {error}"]
        outcome.say(f"[{label}] rebuild == live: {not differences}")
        outcome.check(not differences, "rebuilt projection differs from the live one:\n" + "\n".join(differences[:10]))

        gone = missing_from_the_log(logged[0], await log_contents(cluster))
        keys = await keys_lost(operator, ledger, plans)
        dead = (await operator.jetstream(timeout=5).stream_info(TOPOLOGY.dead_letter_stream.name)).state.messages
        outcome.say(f"[{label}] messages of the log before the loss missing after it: {gone or 'none'}; "
                    f"patients' keys lost from the bucket: {keys}; dead letters: {dead}")
        outcome.check(not gone, f"messages of the log lost: {gone}")
        outcome.check(keys == 0, f"patients' keys lost from the bucket: {keys}")
        outcome.check(dead == 0, f"messages dead-lettered: {dead}")

        waited, behind = caught_up[0]
        infos = await cluster.streams(operator)
        outcome.say(f"[{label}] streams (replicas, first sequence): "
                    + ", ".join(f"{i.config.name}=R{i.config.num_replicas}@{i.state.first_seq}" for i in infos)
                    + f"; every replica current {waited:.1f} s after {victim} returned"
                    + (f" — NOT within {CATCH_UP_SECONDS:.0f} s: {behind[:5]}" if behind else ""))
        outcome.check(not behind, f"replicas not current within {CATCH_UP_SECONDS:.0f} s: {behind[:10]}")
        if replicas > 1:
            outcome.check("raising the replicas of a stream" in stack.logs(),
                          f"{TOPOLOGY.lab_rejected_stream.name} created with one replica was not raised (logged)")

        outcome.say(f"[{label}] service connections on {victim} when it died: {len(moved)} "
                    f"({', '.join(sorted(set(moved))) or 'none'}; a surviving replica's reconnects to another node "
                    f"with the credentials NATS_URL gives once)")
        exited = [name for name, process in stack.extra.items() if process.poll() is not None]
        outcome.check(not exited, f"services exited: {exited}")
        bad = {answer: n for answer, n in ledger.server_errors.items() if not answer.endswith(" 503")}
        outcome.check(not bad, f"server errors other than 503 with Retry-After: {bad}")
        trouble = cluster.log_trouble()
        outcome.check(not trouble, "authentication or permission errors in the node logs:\n" + "\n".join(trouble[:10]))
        outcome.say(f"[{label}] survivors exited: {exited or 'none'}; 5xx: {dict(ledger.server_errors) or 'none'}; "
                    f"auth/permission errors in node logs: {len(trouble)}; longest outage per client (s): "
                    f"{dict(sorted(ledger.outages.items())) or 'none'}")
        return outcome
    finally:
        await operator.close()
        await stack.stop()
        cluster.stop()


def assert_held(outcome: Outcome) -> None:
    assert not outcome.failures, "\n\n".join(outcome.failures)


# --------------------------------------------------------------------------- make test


async def test_a_client_whose_node_dies_reconnects_to_another_and_authenticates(tmp_path: Path) -> None:
    """``NATS_URL`` with the credentials on the first node only: the client connected to that node
    goes on, after it is SIGKILLed, on another node of the list — as the same user."""
    cluster = NatsCluster(tmp_path / "cluster")
    await cluster.start()
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    client = await nats.connect(**nats_connect_options(cluster.url("labs"), dont_randomize=True,
                                                       reconnected_cb=on_reconnect, reconnect_time_wait=0.2))
    try:
        first = client.connected_url
        assert first is not None and first.port == cluster.nodes["nats-1"].client_port
        assert first.username is None, "the credentials travel as options, not in the server's URL"
        cluster.kill("nats-1")
        await asyncio.wait_for(reconnected.wait(), 30)
        assert client.connected_url is not None and client.connected_url.port != first.port
        deadline = time.monotonic() + 30
        while True:  # the labs user's JetStream answers there, once the meta leader is elected again
            try:
                assert await client.jetstream(timeout=2).account_info() is not None
                break
            except nats.errors.TimeoutError:
                if time.monotonic() > deadline:
                    raise
    finally:
        await client.close()
        cluster.stop()
    assert not cluster.log_trouble(), cluster.log_trouble()


async def test_node_with_the_labs_and_key_leaders_lost_with_its_disk_short(tmp_path: Path) -> None:
    """The CI version: a few hundred inputs; the leader node is away 5 s and comes back empty."""
    assert_held(await cluster_scenario(tmp_path, 3, make_plan(6, 40, seed=29), down_for=5.0, label="R3 short"))


# --------------------------------------------------------------------------- make test-faults


@full_only
async def test_node_with_the_labs_and_key_leaders_lost_with_its_disk(tmp_path: Path) -> None:
    assert_held(await cluster_scenario(tmp_path, 3, make_plan(24, 100, seed=31), down_for=20.0, label="R3"))


@full_only
async def test_one_replica_loses_data(tmp_path: Path) -> None:
    """Sensitivity: with ``NEPHROTRACK_STREAM_REPLICAS=1`` the same loss is not survived."""
    outcome = await cluster_scenario(tmp_path, 1, make_plan(24, 100, seed=31), down_for=20.0, label="R1",
                                     load_deadline=240.0)
    print("[R1] failed as it must:\n  " + "\n  ".join(failure.splitlines()[0] for failure in outcome.failures))
    assert outcome.failures
    data = [f for f in outcome.failures
            if f.startswith(("sent=", "rebuilt projection differs", "messages of the log lost", "patients' keys lost",
                             "messages dead-lettered"))]
    assert data, f"R1 failed only on its replica count, not on the data: {outcome.failures}"
