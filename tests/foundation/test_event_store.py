"""Event store conformance: one suite every store passes — in memory, SQLite and PostgreSQL
(the ``backend`` fixture, overridden here with every store backend)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable
from datetime import UTC, date, datetime

import pytest
from sqlalchemy import text

from shared.errors import Conflict
from shared.events import CommandContext, DomainEvent, Envelope, EventRef, Payload, registry
from shared.store import (
    START,
    ConcurrencyError,
    EnrolledPatient,
    EventStore,
    JsonCodec,
    Position,
    UnitOfWork,
    open_store,
)
from shared.store.postgres import PostgresUnitOfWork
from tests.conftest import STORE_BACKENDS
from tests.foundation.following import read_all_written
from tests.foundation.tables import outbox_rows, stored_payloads


@pytest.fixture(params=STORE_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@registry.register
class ThingHappened(DomainEvent):
    """A test event."""

    n: int
    on: date = date(2020, 1, 1)


def things(*numbers: int) -> list[ThingHappened]:
    return [ThingHappened(n=n) for n in numbers]


def patient(subject_id: str, group: str = "A") -> EnrolledPatient:
    return EnrolledPatient(subject_id=subject_id, group=group, sex="F", age_years=50, enrolled_on=date(2014, 3, 2))


async def test_append_and_read_stream_round_trip(store: EventStore) -> None:
    context = CommandContext(actor="tester")
    written = await store.append("thing-1", things(1, 2), expected_version=0, context=context)
    read = await store.read_stream("thing-1")
    assert [e.stream_version for e in read] == [1, 2]
    assert read == written
    assert [e.decode() for e in read] == things(1, 2)
    assert {e.actor for e in read} == {"tester"}
    assert read[0].event_id < read[1].event_id  # UUIDv7: time-ordered
    assert await store.read_stream("no-such-stream") == []


async def test_an_envelope_read_back_behaves_as_the_one_written(store: EventStore) -> None:
    """Envelopes are read back without validating their fields again (``Envelope.from_store``):
    they serialise, copy and compare as the validated ones written."""
    [written] = await store.append("thing-1", things(1), expected_version=0)
    [read] = await store.read_stream("thing-1")
    [stored] = [s.envelope for s in await read_all_written(store, 1)]
    for envelope in (read, stored):
        assert envelope.model_dump_json() == written.model_dump_json()
        assert envelope.model_fields_set == set(Envelope.model_fields)  # as validating the stored row gave
        assert Envelope.model_validate_json(envelope.model_dump_json()) == written
        copied = envelope.model_copy(update={"payload": {"n": 2}})
        assert copied.payload == {"n": 2} and envelope.payload == written.payload
        assert copied.model_fields_set == set(Envelope.model_fields)


async def test_wrong_expected_version_writes_nothing(store: EventStore) -> None:
    await store.append("thing-1", things(1), expected_version=0)
    with pytest.raises(ConcurrencyError) as raised:
        await store.append("thing-1", things(2, 3), expected_version=0)
    assert raised.value.actual == 1
    assert [e.decode() for e in await store.read_stream("thing-1")] == things(1)


@pytest.mark.parametrize("size", [1, 40], ids=["one-statement", "copy"])
async def test_an_append_checks_the_version_whatever_its_size(store: EventStore, size: int) -> None:
    """PostgreSQL appends a few events in one statement that checks the version itself, and
    larger batches by COPY after reading it: both refuse an expected version behind the head
    and one ahead of it (which no unique key would catch), writing nothing, not even outbox rows."""
    await store.append("thing-1", things(0), expected_version=0)
    batch = things(*range(1, size + 1))
    for stale in (0, 5):
        with pytest.raises(ConcurrencyError) as raised:
            await store.append("thing-1", batch, expected_version=stale)
        assert raised.value.actual == 1
    written = await store.append("thing-1", batch, expected_version=1)
    assert [e.decode() for e in await store.read_stream("thing-1")] == things(0) + batch
    assert [row.event_id for row in await outbox_rows(store)][1:] == [e.event_id for e in written]


async def test_two_writers_on_one_stream_exactly_one_wins_each_version(store: EventStore) -> None:
    async def writer(n: int) -> bool:
        try:
            await store.append("contested", things(n), expected_version=0)
            return True
        except ConcurrencyError:
            return False

    outcomes = await asyncio.gather(*(writer(n) for n in range(8)))
    assert outcomes.count(True) == 1
    assert len(await store.read_stream("contested")) == 1


async def test_the_writer_that_loses_the_race_wrote_nothing_at_all(store: EventStore) -> None:
    """Two commands decided on the same history (version 0): one commits, the other raises
    ConcurrencyError, and none of its writes — other streams, inbox, checkpoint — remain."""
    assert await store.read_stream("contested") == []  # both decided on this

    async def writer(n: int) -> str:
        try:
            async with store.transaction() as uow:
                await uow.append(f"side-{n}", things(n), expected_version=0)
                await uow.claim_messages("c", [f"m{n}"])
                await uow.save_checkpoint(f"p{n}", Position(0, n))
                await uow.append("contested", things(n), expected_version=0)
        except ConcurrencyError:
            return "lost"
        return "won"

    outcomes = await asyncio.gather(writer(1), writer(2))
    assert sorted(outcomes) == ["lost", "won"]
    winner, loser = (1, 2) if outcomes[0] == "won" else (2, 1)
    assert [e.decode().n for e in await store.read_stream("contested")] == [winner]
    assert await store.read_stream(f"side-{loser}") == []
    async with store.transaction() as uow:
        assert await uow.claim_messages("c", [f"m{winner}", f"m{loser}"]) == [f"m{loser}"]
        assert await uow.checkpoint(f"p{loser}") == START
        assert await uow.checkpoint(f"p{winner}") == Position(0, winner)
    assert len(await outbox_rows(store)) == 2  # the winner's two events


async def test_a_failed_transaction_leaves_nothing(store: EventStore) -> None:
    called: list[str] = []
    with pytest.raises(RuntimeError):
        async with store.transaction() as uow:
            await uow.append("thing-1", things(1), expected_version=0)
            await uow.append_many([("thing-2", things(2), 0)])
            assert await uow.claim_messages("c1", ["m1"]) == ["m1"]
            await uow.save_checkpoint("proj", Position(0, 7))
            await uow.patients.remember([patient("IGA-A-001")])
            await uow.erased.remember(["IGA-A-002"], datetime.now(UTC))
            uow.on_commit(lambda: called.append("committed"))
            assert len(await uow.read_stream("thing-1")) == 1  # its own writes, seen within
            raise RuntimeError("crash before commit")
    assert await store.read_stream("thing-1") == [] and await store.read_stream("thing-2") == []
    assert [s async for s in store.read_all()] == [] and await store.head() == START
    assert await outbox_rows(store) == []
    async with store.transaction() as uow:
        assert await uow.claim_messages("c1", ["m1"]) == ["m1"]
        assert await uow.checkpoint("proj") == START
        assert await uow.patients.find("IGA-A-001") is None
        assert await uow.erased.all() == []
    assert called == []


async def test_appended_events_get_outbox_rows_in_the_same_transaction(store: EventStore) -> None:
    written = await store.append("thing-1", things(1, 2), expected_version=0)
    rows = await outbox_rows(store)
    assert [row.subject for row in rows] == ["test.ThingHappened", "test.ThingHappened"]
    assert [row.event_id for row in rows] == [e.event_id for e in written]
    assert [store.codec.open(row.body) for row in rows] == written


async def test_events_without_a_subject_get_no_outbox_row(database_url: str) -> None:
    store = open_store(database_url, subject_for=lambda envelope: None if envelope.payload["n"] % 2 else "test.even")
    try:
        await store.append("thing-1", things(1, 2, 3, 4), expected_version=0)
        assert [row.subject for row in await outbox_rows(store)] == ["test.even", "test.even"]
    finally:
        await store.close()


async def test_inbox_claims_a_message_once(store: EventStore) -> None:
    async with store.transaction() as uow:
        assert await uow.claim_messages("c1", ["m1", "m2", "m1"]) == ["m1", "m2"]  # a duplicate within one claim
        assert await uow.claim_messages("c1", ["m2", "m3"]) == ["m3"]
        assert await uow.claim_messages("c2", ["m1"]) == ["m1"]
    async with store.transaction() as uow:
        assert await uow.claim_messages("c1", ["m3", "m1", "m4", "m4"]) == ["m4"]


async def test_inbox_claim_rolls_back_with_the_handler(store: EventStore) -> None:
    with pytest.raises(RuntimeError):
        async with store.transaction() as uow:
            assert await uow.claim_messages("c1", ["m1"]) == ["m1"]
            raise RuntimeError("handler failed")
    async with store.transaction() as uow:
        assert await uow.claim_messages("c1", ["m1"]) == ["m1"]


@pytest.mark.parametrize("first_commits", [True, False])
async def test_a_message_claimed_in_two_transactions_at_once_is_handled_by_one(
    store: EventStore, first_commits: bool
) -> None:
    """Two pull loops (or replicas) may hold copies of one message at once — the shared
    ``labs.results`` stream keeps a resend made after JetStream's de-duplication window. The later
    claim waits for the earlier and takes the message only if that rolled back: never a constraint
    error, which failed the whole batch and sent every message of it down the one-by-one path."""
    claimed, release = asyncio.Event(), asyncio.Event()

    async def earlier() -> list[str]:
        async with store.transaction() as uow:
            got = await uow.claim_messages("c", ["a", "b"])
            claimed.set()
            await release.wait()
            if not first_commits:
                raise RuntimeError("handler failed")
            return got

    async def later() -> list[str]:
        await claimed.wait()
        async with store.transaction() as uow:
            return await uow.claim_messages("c", ["c", "b"])

    first, second = asyncio.create_task(earlier()), asyncio.create_task(later())
    await claimed.wait()
    await asyncio.sleep(0.2)  # the later claim is waiting (PostgreSQL: on the row; SQLite: to begin)
    release.set()
    if first_commits:
        assert await first == ["a", "b"]
        assert await second == ["c"]
    else:
        with pytest.raises(RuntimeError):
            await first
        assert await second == ["c", "b"]


async def test_read_all_pages_in_order_and_resumes(store: EventStore) -> None:
    assert await store.head() == START
    for i in range(25):
        await store.append(f"s-{i % 4}", things(i), expected_version=i // 4)
    assert len(await read_all_written(store, 25)) == 25
    seen = [s async for s in store.read_all(batch_size=7)]
    assert [s.envelope.decode().n for s in seen] == list(range(25))
    assert [s.position for s in seen] == sorted(s.position for s in seen)
    middle = seen[11].position
    rest = [s.envelope.decode().n async for s in store.read_all(middle, batch_size=5)]
    assert rest == list(range(12, 25))
    assert [s.envelope.decode().n async for s in store.read_all(middle, limit=3)] == [12, 13, 14]
    assert [s async for s in store.read_all(seen[-1].position)] == []
    assert await store.head() == seen[-1].position


async def test_checkpoint_is_saved_in_the_transaction(store: EventStore) -> None:
    async with store.transaction() as uow:
        assert await uow.checkpoint("proj") == START
        await uow.save_checkpoint("proj", Position(5, 9))
        await uow.save_checkpoint("proj", Position(6, 10))
        assert await uow.checkpoint("proj") == Position(6, 10)
    async with store.transaction() as uow:
        assert await uow.checkpoint("proj") == Position(6, 10)
        assert await uow.checkpoint("other") == START


async def test_after_commit_callbacks_run_once_committed_and_never_on_rollback(store: EventStore) -> None:
    calls: list[str] = []

    def failing() -> None:
        calls.append("failing")
        raise RuntimeError("a callback's own bug")

    async with store.transaction() as uow:
        await uow.append("thing-1", things(1), expected_version=0)
        uow.on_commit(lambda: calls.append("first"))
        uow.on_commit(failing)
        uow.on_commit(lambda: calls.append("third"))
        assert calls == []  # not before the commit
    assert calls == ["first", "failing", "third"]  # each once, in order; a failing one stops none
    assert len(await store.read_stream("thing-1")) == 1  # and the committed work stays committed

    with pytest.raises(ConcurrencyError):
        async with store.transaction() as uow:
            uow.on_commit(lambda: calls.append("rolled back"))
            await uow.append("thing-1", things(2), expected_version=0)
    assert "rolled back" not in calls


async def test_many_writers_and_a_following_reader_see_every_event_exactly_once(store: EventStore) -> None:
    """The sequence-gap problem: writers hold their transactions open for random times after
    inserting, so later positions often commit first. A reader that follows ``read_all`` and
    checkpoints as it goes must still see every event exactly once."""
    writers, per_writer = 8, 15
    done = asyncio.Event()
    seen: list[int] = []

    async def writer(w: int) -> None:
        for i in range(per_writer):
            async with store.transaction() as uow:
                await uow.append(f"w{w}-{i}", things(w * 1000 + i), expected_version=0)
                if isinstance(uow, PostgresUnitOfWork):
                    await uow.connection.execute(text("SELECT pg_sleep(:s)"), {"s": random.random() * 0.02})
                else:
                    await asyncio.sleep(random.random() * 0.002)

    async def reader() -> None:
        """Follows until every writer has committed and all their events were read. The horizon
        is the PostgreSQL cluster's: another test's open transaction (any database) may hold it
        back for a moment after the last commit, so the end is a count, not one last pass."""
        position = START
        deadline: float | None = None
        while deadline is None or (len(seen) < len(expected) and time.monotonic() < deadline):
            if deadline is None and done.is_set():
                deadline = time.monotonic() + 30
            async for stored in store.read_all(position, batch_size=10):
                seen.append(stored.envelope.decode().n)
                position = stored.position
            await asyncio.sleep(0.001)
        async for stored in store.read_all(position, batch_size=10):  # nothing may come twice
            seen.append(stored.envelope.decode().n)

    expected = sorted(w * 1000 + i for w in range(writers) for i in range(per_writer))
    reading = asyncio.create_task(reader())
    await asyncio.gather(*(writer(w) for w in range(writers)))
    done.set()
    await reading
    assert len(seen) == len(expected)  # nothing twice
    assert sorted(seen) == expected  # nothing skipped


async def test_batch_read_and_append_across_streams(store: EventStore) -> None:
    await store.append("a", things(1), expected_version=0)
    async with store.transaction() as uow:
        current = await uow.read_streams(["a", "b"])
        assert [len(current["a"]), len(current["b"])] == [1, 0]
        await uow.append_many([("a", things(2), 1), ("b", things(3, 4), 0)])
        assert await uow.stream_version("b") == 2  # its own appends, seen within
        assert [e.decode().n for e in (await uow.read_streams(["b", "a"]))["b"]] == [3, 4]
    assert [e.decode().n for e in await store.read_stream("a")] == [1, 2]
    assert [e.stream_version for e in await store.read_stream("b")] == [1, 2]
    with pytest.raises(ConcurrencyError):
        async with store.transaction() as uow:
            await uow.append_many([("c", things(6), 0), ("b", things(5), 0)])  # stale expected version for b
    assert len(await store.read_stream("b")) == 2
    assert await store.read_stream("c") == []  # the whole batch, not just the clashing stream


async def test_transact_runs_the_work_again_after_a_conflict(store: EventStore) -> None:
    """A work that meets a concurrent writer twice (it appends after the version it read, and
    the stream moved on) succeeds on its third run; the runs that failed left nothing."""
    await store.append("contested", things(0), expected_version=0)
    runs = 0

    async def work(uow: UnitOfWork) -> list[Envelope]:
        nonlocal runs
        runs += 1
        await uow.append("side", things(runs), expected_version=0)  # would clash if a failed run had kept it
        seen = await uow.stream_version("contested")
        stale = seen - 1 if runs <= 2 else seen  # as if another writer appended after we read
        return await uow.append("contested", things(100 + runs), expected_version=stale)

    written = await store.transact(work)
    assert runs == 3
    assert [e.decode().n for e in written] == [103]
    assert [e.decode().n for e in await store.read_stream("contested")] == [0, 103]
    assert [e.decode().n for e in await store.read_stream("side")] == [3]


async def test_transact_gives_up_with_a_conflict_the_caller_can_retry(store: EventStore) -> None:
    await store.append("contested", things(0), expected_version=0)
    runs = 0

    async def work(uow: UnitOfWork) -> None:
        nonlocal runs
        runs += 1
        await uow.append("contested", things(runs), expected_version=0)

    with pytest.raises(Conflict, match="stream contested is being changed concurrently; try again") as raised:
        await store.transact(work, retries=3)
    assert runs == 3
    assert raised.value.status_code == 409
    assert len(await store.read_stream("contested")) == 1


async def test_transact_does_not_retry_other_failures(store: EventStore) -> None:
    runs = 0

    async def work(uow: UnitOfWork) -> None:
        nonlocal runs
        runs += 1
        await uow.append("thing-1", things(1), expected_version=0)
        raise ValueError("a rule refused the command")

    with pytest.raises(ValueError):
        await store.transact(work)
    assert runs == 1 and await store.read_stream("thing-1") == []


async def test_patient_register(store: EventStore) -> None:
    async with store.transaction() as uow:
        await uow.patients.remember([patient("IGA-A-001"), patient("IGA-A-002")])
        await uow.patients.remember([patient("IGA-A-001", group="B")])  # known: keeps the first record
        assert await uow.patients.find("IGA-A-001") == patient("IGA-A-001")
        await uow.patients.remember([])
    async with store.transaction() as uow:
        assert await uow.patients.find("IGA-A-001") == patient("IGA-A-001")
        await uow.patients.remove(["IGA-A-001", "IGA-A-404"])
        await uow.patients.remove([])
        assert await uow.patients.find("IGA-A-001") is None
    async with store.transaction() as uow:
        assert await uow.patients.find("IGA-A-001") is None
        assert await uow.patients.find("IGA-A-002") == patient("IGA-A-002")


async def test_erased_register_keeps_each_first_erasure_oldest_first(store: EventStore) -> None:
    first, later = datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 6, 1, tzinfo=UTC)
    async with store.transaction() as uow:
        await uow.erased.remember(["IGA-B-002", "IGA-B-001"], later)
        await uow.erased.remember([], later)
    async with store.transaction() as uow:
        await uow.erased.remember(["IGA-C-003"], first)
        await uow.erased.remember(["IGA-B-002"], first)  # erased before: keeps its first time
        assert await uow.erased.all() == ["IGA-C-003", "IGA-B-001", "IGA-B-002"]
    async with store.transaction() as uow:
        assert await uow.erased.all() == ["IGA-C-003", "IGA-B-001", "IGA-B-002"]


class MarkingCodec(JsonCodec):
    """A codec whose stored bytes are not the JSON, bound to their event, and that must be
    prepared with the stored bytes before it decodes them (as the sealing codec fetches keys)."""

    def __init__(self) -> None:
        self.prepared: set[bytes] = set()

    def encode(self, event: EventRef, payload: Payload) -> bytes:
        return b"marked:" + event.event_id.bytes + super().encode(event, payload)[::-1]

    def decode(self, event: EventRef, data: bytes) -> Payload:
        assert data in self.prepared, "decoded before prepare"
        assert data.startswith(b"marked:" + event.event_id.bytes), "bytes of another event"
        return super().decode(event, data[len(b"marked:") + 16 :][::-1])

    def wire(self, envelope: Envelope, stored: bytes) -> bytes:
        bare = envelope.model_copy(update={"payload": {}})
        return b"wire:" + stored.hex().encode() + b":" + bare.model_dump_json().encode()

    def open(self, body: bytes) -> Envelope:
        _, stored, rest = body.split(b":", 2)
        bare = Envelope.model_validate_json(rest)
        data = bytes.fromhex(stored.decode())
        self.prepared.add(data)
        return bare.model_copy(update={"payload": self.decode(bare.ref, data)})

    async def prepare(self, *, payloads: Iterable[tuple[str, Payload]] = (), stored: Iterable[bytes] = ()) -> None:
        self.prepared.update(stored)


async def test_the_codec_is_used_on_every_path(database_url: str) -> None:
    codec = MarkingCodec()
    store = open_store(database_url, subject_for=lambda e: f"test.{e.event_type}", codec=codec)
    try:
        written = await store.append("a", things(1), expected_version=0)
        async with store.transaction() as uow:
            written += await uow.append_many([("b", things(2), 0)])
        stored = await stored_payloads(store)
        assert all(blob.startswith(b"marked:") for blob in stored.values()) and len(stored) == 2
        assert [codec.open(row.body) for row in await outbox_rows(store)] == written
        async with store.transaction() as uow:
            assert [*await uow.read_stream("a"), *(await uow.read_streams(["b"]))["b"]] == written
        assert [*await store.read_stream("a"), *await store.read_stream("b")] == written
        assert [s.envelope for s in await read_all_written(store, 2)] == written
    finally:
        await store.close()
