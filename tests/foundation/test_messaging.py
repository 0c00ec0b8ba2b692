"""Outbox relay and durable consumers against the real NATS JetStream server."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nats
import nats.js.errors
import pytest
from nats.js.api import StreamConfig
from prometheus_client import REGISTRY
from sqlalchemy import text

from shared.broker import Topology, ensure_streams, make_broker
from shared.consumer import DurableConsumer, InboundMessage, one_by_one
from shared.outages import Dependency, Outages
from shared.relay import AckCollector, OutboxRelay
from shared.store import MEMORY_URL, EventStore, UnitOfWork, open_store
from tests.conftest import NATS_URL, STORE_BACKENDS
from tests.fault.infra import refuse_connections
from tests.foundation.test_event_store import things

pytestmark = pytest.mark.usefixtures("nats_client")


async def stream_messages(js: nats.js.JetStreamContext, stream: str) -> list[nats.aio.msg.Msg]:
    info = await js.stream_info(stream)
    return [await js.get_msg(stream, seq) for seq in range(info.state.first_seq, info.state.last_seq + 1)] if info.state.messages else []


async def make_stream(js: nats.js.JetStreamContext, name: str, subject: str, duplicate_window: float = 600) -> None:
    await js.add_stream(StreamConfig(name=name, subjects=[subject], duplicate_window=duplicate_window))


async def test_relay_publishes_each_outbox_row_with_its_event_id(store: EventStore, nats_client: nats.NATS, prefix: str) -> None:
    js = nats_client.jetstream()
    await make_stream(js, f"{prefix}_OUT".upper(), "test.>")
    written = await store.append("thing-1", things(1, 2, 3), expected_version=0)
    relay = OutboxRelay(store, nats_client, batch_size=2)
    assert await relay.publish_batch() == 2
    assert await relay.publish_batch() == 1
    assert await relay.publish_batch() == 0
    messages = await stream_messages(js, f"{prefix}_OUT".upper())
    assert [m.headers["Nats-Msg-Id"] for m in messages] == [str(e.event_id) for e in written]
    await js.delete_stream(f"{prefix}_OUT".upper())


async def test_relay_crash_after_publish_before_delete_duplicates_nothing(
    store: EventStore, nats_client: nats.NATS, prefix: str
) -> None:
    js = nats_client.jetstream()
    stream = f"{prefix}_OUT".upper()
    await make_stream(js, stream, "test.>")
    await store.append("thing-1", things(1, 2), expected_version=0)

    class CrashAfterPublish(OutboxRelay):
        async def _delete(self, connection, acked):  # type: ignore[no-untyped-def]
            raise ConnectionError("killed between publish and delete")

    with pytest.raises(ConnectionError):
        await CrashAfterPublish(store, nats_client).publish_batch()
    assert await OutboxRelay(store, nats_client).publish_batch() == 2  # republished after "restart"
    assert len(await stream_messages(js, stream)) == 2  # broker de-duplicated by Nats-Msg-Id
    await js.delete_stream(stream)


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_relay_vacuums_the_outbox_it_empties(store: EventStore, nats_client: nats.NATS, prefix: str) -> None:
    """A queue table's dead rows: without the relay's own VACUUM (autovacuum may be off, as it is
    on the development machine) every round of rows would take new pages, 4 rounds 4× the space."""
    js = nats_client.jetstream()
    stream = f"{prefix}_OUT".upper()
    await make_stream(js, stream, "test.>")
    relay = OutboxRelay(store, nats_client, batch_size=500, vacuum_every=1_000)
    vacuums = REGISTRY.get_sample_value("nephrotrack_outbox_vacuum_duration_seconds_count") or 0
    pages = []
    for round_ in range(4):
        await store.append(f"thing-{round_}", things(*range(1_000)), expected_version=0)
        async with store.engine.connect() as connection:
            pages.append(await connection.scalar(text("SELECT pg_relation_size('outbox') / 8192")))
        while await relay.publish_batch():
            pass
    assert pages[0] > 5 and pages[-1] < 2 * pages[0], pages
    assert REGISTRY.get_sample_value("nephrotrack_outbox_vacuum_duration_seconds_count") == vacuums + 4
    assert len(await stream_messages(js, stream)) == 4_000
    await js.delete_stream(stream)


async def test_the_in_memory_store_has_no_relay_and_says_so(nats_client: nats.NATS) -> None:
    with pytest.raises(TypeError, match="the outbox relay publishes a SQL store's outbox table; MemoryEventStore has none"):
        OutboxRelay(open_store(MEMORY_URL), nats_client)


RELAY_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, nats
    from shared.database import create_engine
    from shared.relay import OutboxRelay
    from shared.store import open_store

    async def main():
        client = await nats.connect(sys.argv[2])
        store = open_store(sys.argv[1])
        relay = OutboxRelay(store, client, batch_size=50)
        while await relay.publish_batch():
            pass
        print("drained", flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_relay_process_killed_repeatedly_delivers_every_event_once(
    store: EventStore, database_url: str, nats_client: nats.NATS, prefix: str, tmp_path: Path
) -> None:
    js = nats_client.jetstream()
    stream = f"{prefix}_OUT".upper()
    await make_stream(js, stream, "test.>")
    total = 0
    for batch in range(20):
        written = await store.append(f"thing-{batch}", things(*range(100)), expected_version=0)
        total += len(written)
    script = tmp_path / "relay.py"
    script.write_text(RELAY_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    kills = 0
    for _ in range(30):
        process = subprocess.Popen([sys.executable, str(script), database_url, NATS_URL], env=env, stdout=subprocess.PIPE)
        try:
            output, _ = process.communicate(timeout=1.0 + kills * 0.1)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            continue
        if b"drained" in output:
            break
    else:
        pytest.fail("relay never drained the outbox")
    messages = await stream_messages(js, stream)
    ids = [m.headers["Nats-Msg-Id"] for m in messages]
    assert len(ids) == total and len(set(ids)) == total
    await js.delete_stream(stream)


async def _consume(
    store: EventStore, topology: Topology, stream_name: str, handler, **options  # type: ignore[no-untyped-def]
) -> tuple[object, DurableConsumer]:
    broker = make_broker(NATS_URL, name="test")
    consumer = DurableConsumer(
        name=f"{topology.prefix}-c",
        stream=topology.service_stream("src"),
        subject=topology.service_subjects("src"),
        handler=one_by_one(handler),
        store=store,
        dead_letter_subject=topology.dead_letter_subject(f"{topology.prefix}-c"),
        **options,
    )
    consumer.attach(broker)
    await broker.connect()
    await ensure_streams(broker.connection.jetstream(), [topology.dead_letter_stream])
    await broker.start()
    return broker, consumer


@pytest.mark.parametrize("backend", STORE_BACKENDS)  # handlers run on every store
async def test_consumer_inbox_gives_one_effect_per_message_id(
    store: EventStore, nats_client: nats.NATS, topology: Topology
) -> None:
    js = nats_client.jetstream()
    stream = topology.service_stream("src").name
    # A tiny duplicate window lets the same message id reach the stream twice, as after a
    # relay restart long after the first publish: only the inbox can stop the second effect.
    await make_stream(js, stream, topology.service_subjects("src"), duplicate_window=0.1)
    effects: list[str] = []

    async def handler(uow: UnitOfWork, message: InboundMessage) -> None:
        effects.append(message.message_id)

    broker, _ = await _consume(store, topology, stream, handler)
    subject = topology.event_subject("src", "Thing")
    for message_id in ["a", "b", "a", "c", "b"]:
        await js.publish(subject, b"{}", headers={"Nats-Msg-Id": message_id})
        await asyncio.sleep(0.15)
    assert len(await stream_messages(js, stream)) == 5
    for _ in range(100):
        if len(effects) >= 3:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    await broker.stop()  # type: ignore[attr-defined]
    assert sorted(effects) == ["a", "b", "c"]


@pytest.mark.parametrize("backend", STORE_BACKENDS)  # handlers run on every store
async def test_failing_message_is_retried_then_dead_lettered_without_blocking_others(
    store: EventStore, nats_client: nats.NATS, topology: Topology
) -> None:
    js = nats_client.jetstream()
    stream = topology.service_stream("src").name
    await make_stream(js, stream, topology.service_subjects("src"))
    async def handler(uow: UnitOfWork, message: InboundMessage) -> None:
        # The effect is a write in the handler's transaction: rolled back with a failed batch.
        await uow.append("handled", things(int(message.data)), await uow.stream_version("handled"))

    broker, _ = await _consume(store, topology, stream, handler, max_deliver=3, backoff_seconds=(0.1, 0.2))
    subject = topology.event_subject("src", "Thing")
    for body in [b"1", b"poison", b"2"]:
        await js.publish(subject, body, headers={"Nats-Msg-Id": body.decode()})
    dead = await js.pull_subscribe(f"{topology.prefix}.dlq.>", durable=None, stream=topology.dead_letter_stream.name)
    letters = await dead.fetch(1, timeout=10)
    await broker.stop()  # type: ignore[attr-defined]
    assert [e.decode().n for e in await store.read_stream("handled")] == [1, 2]
    assert letters[0].data == b"poison"
    assert "invalid literal for int" in letters[0].headers["Nephrotrack-Error"]
    assert letters[0].headers["Nephrotrack-Deliveries"] == "3"


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_database_taken_away_longer_than_the_backoff_dead_letters_nothing(
    store: EventStore, database_url: str, nats_client: nats.NATS, topology: Topology
) -> None:
    """Messages arriving while the consumer's database refuses connections for longer than its
    whole back-off: each is handled once when the database is back; none is dead-lettered, none
    spent a delivery, and the outage was visible while it lasted (issue 15, point 1)."""
    js = nats_client.jetstream()
    stream = topology.service_stream("src").name
    await make_stream(js, stream, topology.service_subjects("src"))

    async def handler(uow: UnitOfWork, message: InboundMessage) -> None:
        await uow.append("handled", things(int(message.data)), await uow.stream_version("handled"))

    outages = Outages({Dependency.STORE: store.ping}, first_pause=0.1, max_pause=0.5)
    broker, consumer = await _consume(store, topology, stream, handler, max_deliver=2, backoff_seconds=(0.1,),
                                      outages=outages, batch_size=3)
    subject = topology.event_subject("src", "Thing")
    try:
        await js.publish(subject, b"1", headers={"Nats-Msg-Id": "1"})
        await _wait_for(lambda: _handled(store), [1])
        await refuse_connections(database_url)
        for n in range(2, 8):
            await js.publish(subject, str(n).encode(), headers={"Nats-Msg-Id": str(n)})
        await asyncio.sleep(2.0)  # 20 times the whole back-off
        assert "consumers_paused_for_store" in outages.problems()
        await refuse_connections(database_url, refuse=False)
        await _wait_for(lambda: _handled(store), [1, 2, 3, 4, 5, 6, 7])
    finally:
        await refuse_connections(database_url, refuse=False)
        await broker.stop()  # type: ignore[attr-defined]
    dead = (await js.stream_info(topology.dead_letter_stream.name)).state.messages
    info = await js.consumer_info(stream, consumer.name)
    assert dead == 0
    assert info.num_redelivered == 0 and info.num_ack_pending == 0
    assert outages.problems() == {}


async def _handled(store: EventStore) -> list[int]:
    try:
        return [e.decode().n for e in await store.read_stream("handled")]  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - the database may still be coming back
        return []


async def _wait_for(read, expected, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while (found := await read()) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"{found} != {expected}"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("backend", STORE_BACKENDS)  # handlers run on every store
async def test_an_over_long_message_id_is_deduplicated_by_its_digest_without_failing_its_batch(
    store: EventStore, nats_client: nats.NATS, topology: Topology
) -> None:
    """A ``Nats-Msg-Id`` longer than the inbox column (200) failed the whole batch's inbox insert
    on PostgreSQL, and every batch-mate was retried alone. Its digest keys the inbox instead: the
    batch is handled once, in one transaction, and the same id sent again has no second effect."""
    js = nats_client.jetstream()
    stream = topology.service_stream("src").name
    await make_stream(js, stream, topology.service_subjects("src"), duplicate_window=0.1)
    subject = topology.event_subject("src", "Thing")
    long_id = "L" * 300
    ids = ["a", "b", long_id, "c", "d"]
    for message_id in ids:
        await js.publish(subject, message_id.encode(), headers={"Nats-Msg-Id": message_id})
    handled: list[tuple[UnitOfWork, InboundMessage]] = []

    async def handler(uow: UnitOfWork, message: InboundMessage) -> None:
        handled.append((uow, message))

    async def handled_data(count: int) -> list[bytes]:
        for _ in range(100):
            if len(handled) >= count:
                break
            await asyncio.sleep(0.05)
        return [message.data for _, message in handled]

    broker, _ = await _consume(store, topology, stream, handler)
    first = await handled_data(len(ids))
    await asyncio.sleep(0.15)  # past JetStream's duplicate window: only the inbox can stop the copy
    for message_id in (long_id, "e"):
        await js.publish(subject, message_id.encode(), headers={"Nats-Msg-Id": message_id})
    later = await handled_data(len(ids) + 1)
    await asyncio.sleep(0.3)
    await broker.stop()  # type: ignore[attr-defined]
    assert first == [message_id.encode() for message_id in ids]
    assert len({id(uow) for uow, _ in handled[: len(ids)]}) == 1  # one transaction: never retried alone
    assert handled[2][1].message_id == "sha256:" + hashlib.sha256(long_id.encode()).hexdigest()
    assert later == first + [b"e"] and len(handled) == len(ids) + 1


async def test_ack_collector_returns_each_stream_sequence_and_each_refusal(nats_client: nats.NATS, prefix: str) -> None:
    """The relay's batch publisher: every message's own outcome, in order — a stored message
    its stream sequence, a duplicate (same Nats-Msg-Id) the sequence it was first stored at, a
    subject no stream captures the no-responders error — never one batch-wide verdict."""
    js = nats_client.jetstream()
    stream = f"{prefix}_ACKS".upper()
    await make_stream(js, stream, f"{prefix}.acks.>")
    collector = AckCollector(nats_client)
    first = await collector.publish(
        [(f"{prefix}.acks.a", b"1", "id-1"), (f"{prefix}.nowhere", b"2", "id-2"), (f"{prefix}.acks.b", b"3", "id-3")], 5
    )
    assert first[0] == 1 and first[2] == 2
    assert isinstance(first[1], nats.js.errors.NoStreamResponseError)
    again = await collector.publish([(f"{prefix}.acks.a", b"1", "id-1"), (f"{prefix}.acks.c", b"4", "id-4")], 5)
    assert again == [1, 3]
    assert (await js.stream_info(stream)).state.messages == 3
    await js.delete_stream(stream)


async def test_ack_collector_returns_a_refusal_among_acknowledgements_instead_of_raising_it(
    nats_client: nats.NATS, prefix: str,
) -> None:
    """A refusal JetStream answers with an error body (here a message over the stream's size
    limit; in a cluster, "duplicate message id is in process" when two relays publish one row)
    is that message's outcome: it once raised out of the collector and dropped the batch's other
    acknowledgements, which the relay then published again."""
    js = nats_client.jetstream()
    stream = f"{prefix}_SMALL".upper()
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{prefix}.small.>"], max_msg_size=64))
    outcome = await AckCollector(nats_client).publish(
        [(f"{prefix}.small.a", b"1", "id-1"), (f"{prefix}.small.b", b"x" * 100, "id-2"), (f"{prefix}.small.c", b"3", "id-3")], 5
    )
    assert outcome[0] == 1 and outcome[2] == 2
    assert isinstance(outcome[1], nats.js.errors.APIError) and outcome[1].err_code == 10054
    await js.delete_stream(stream)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_two_relays_on_one_sqlite_database_never_delete_an_event_they_did_not_publish(
    store: EventStore, nats_client: nats.NATS, prefix: str,
) -> None:
    """Two replicas of a service share its SQLite database and both relay its outbox. While one
    waits for JetStream's acknowledgements, the other publishes and deletes the same rows; a new
    event committed then takes a freed id (SQLite numbers a new row one above the largest id left).
    Deleting by id alone, the first relay deleted that event's row unpublished: four lab results
    and four pulse doses never reached outcomes in a `nephrotrack cluster` run."""
    js = nats_client.jetstream()
    stream = f"{prefix}_OUT".upper()
    await make_stream(js, stream, "test.>")
    await store.append("thing-1", things(1, 2), expected_version=0)
    other = OutboxRelay(store, nats_client)
    committed_meanwhile = []

    class AcknowledgedLate(AckCollector):
        async def publish(self, messages, timeout):  # type: ignore[no-untyped-def]
            outcome = await super().publish(messages, timeout)
            assert await other.publish_batch() == 2
            committed_meanwhile.extend(await store.append("thing-2", things(3), expected_version=0))
            return outcome

    relay = OutboxRelay(store, nats_client)
    relay.acks = AcknowledgedLate(nats_client)
    assert await relay.publish_batch() == 2
    assert await other.publish_batch() == 1  # the event committed meanwhile is still there, and goes out
    published = [m.headers["Nats-Msg-Id"] for m in await stream_messages(js, stream)]
    assert published[-1] == str(committed_meanwhile[0].event_id) and len(published) == 3
    await js.delete_stream(stream)
