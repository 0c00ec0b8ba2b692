"""Event store conformance: the same behaviour on PostgreSQL and SQLite (``backend`` fixture)."""

from __future__ import annotations

import asyncio
import random
from datetime import date

import pytest
from sqlalchemy import func, select, text

from shared.events import CommandContext, DomainEvent, registry
from shared.schema import events, outbox
from shared.store import START, ConcurrencyError, EventStore, Position


@registry.register
class ThingHappened(DomainEvent):
    """A test event."""

    n: int
    on: date = date(2020, 1, 1)


def things(*numbers: int) -> list[ThingHappened]:
    return [ThingHappened(n=n) for n in numbers]


async def test_append_and_read_stream_round_trip(store: EventStore) -> None:
    context = CommandContext(actor="tester")
    written = await store.append("thing-1", things(1, 2), expected_version=0, context=context)
    read = await store.read_stream("thing-1")
    assert [e.stream_version for e in read] == [1, 2]
    assert read == written
    assert [e.decode() for e in read] == things(1, 2)
    assert {e.actor for e in read} == {"tester"}
    assert read[0].event_id < read[1].event_id  # UUIDv7: time-ordered


async def test_wrong_expected_version_writes_nothing(store: EventStore) -> None:
    await store.append("thing-1", things(1), expected_version=0)
    with pytest.raises(ConcurrencyError) as raised:
        await store.append("thing-1", things(2, 3), expected_version=0)
    assert raised.value.actual == 1
    assert [e.decode() for e in await store.read_stream("thing-1")] == things(1)


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


async def test_appended_events_get_outbox_rows_in_the_same_transaction(store: EventStore) -> None:
    await store.append("thing-1", things(1, 2), expected_version=0)
    with pytest.raises(RuntimeError):
        async with store.transaction() as uow:
            await uow.append("thing-2", things(3), expected_version=0)
            raise RuntimeError("crash before commit")
    async with store.engine.connect() as connection:
        assert await connection.scalar(select(func.count()).select_from(events)) == 2
        subjects = (await connection.execute(select(outbox.c.subject))).scalars().all()
    assert subjects == ["test.ThingHappened", "test.ThingHappened"]


async def test_inbox_claims_a_message_once(store: EventStore) -> None:
    async with store.transaction() as uow:
        assert await uow.claim_messages("c1", ["m1", "m2", "m1"]) == ["m1", "m2"]
        assert await uow.claim_messages("c1", ["m2", "m3"]) == ["m3"]
        assert await uow.claim_messages("c2", ["m1"]) == ["m1"]


async def test_inbox_claim_rolls_back_with_the_handler(store: EventStore) -> None:
    with pytest.raises(RuntimeError):
        async with store.transaction() as uow:
            assert await uow.claim_messages("c1", ["m1"]) == ["m1"]
            raise RuntimeError("handler failed")
    async with store.transaction() as uow:
        assert await uow.claim_messages("c1", ["m1"]) == ["m1"]


async def test_read_all_pages_in_order_and_resumes(store: EventStore) -> None:
    for i in range(25):
        await store.append(f"s-{i % 4}", things(i), expected_version=i // 4)
    seen = [s async for s in store.read_all(batch_size=7)]
    assert [s.envelope.decode().n for s in seen] == list(range(25))
    middle = seen[11].position
    rest = [s.envelope.decode().n async for s in store.read_all(middle, batch_size=5)]
    assert rest == list(range(12, 25))
    assert await store.head() == seen[-1].position


async def test_checkpoint_is_saved_in_the_transaction(store: EventStore) -> None:
    async with store.transaction() as uow:
        assert await uow.checkpoint("proj") == START
        await uow.save_checkpoint("proj", Position(5, 9))
        await uow.save_checkpoint("proj", Position(6, 10))
    async with store.transaction() as uow:
        assert await uow.checkpoint("proj") == Position(6, 10)


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
                if store.is_postgres:
                    await uow.connection.execute(text("SELECT pg_sleep(:s)"), {"s": random.random() * 0.02})
                else:
                    await asyncio.sleep(random.random() * 0.002)

    async def reader() -> None:
        position = START
        while True:
            finished = done.is_set()
            async for stored in store.read_all(position, batch_size=10):
                seen.append(stored.envelope.decode().n)
                position = stored.position
            if finished:
                return
            await asyncio.sleep(0.001)

    reading = asyncio.create_task(reader())
    await asyncio.gather(*(writer(w) for w in range(writers)))
    done.set()
    await reading
    expected = sorted(w * 1000 + i for w in range(writers) for i in range(per_writer))
    assert len(seen) == len(expected)  # nothing twice
    assert sorted(seen) == expected  # nothing skipped


async def test_batch_read_and_append_across_streams(store: EventStore) -> None:
    await store.append("a", things(1), expected_version=0)
    async with store.transaction() as uow:
        current = await uow.read_streams(["a", "b"])
        assert [len(current["a"]), len(current["b"])] == [1, 0]
        await uow.append_many([("a", things(2), 1), ("b", things(3, 4), 0)])
    assert [e.decode().n for e in await store.read_stream("a")] == [1, 2]
    assert [e.stream_version for e in await store.read_stream("b")] == [1, 2]
    with pytest.raises(ConcurrencyError):
        async with store.transaction() as uow:
            await uow.append_many([("b", things(5), 0)])  # stale expected version
    assert len(await store.read_stream("b")) == 2
