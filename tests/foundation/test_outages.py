"""Which failures are outages (shared.outages), told on the real PostgreSQL and NATS errors."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from shared.database import create_engine
from shared.keys import KeyMissing
from shared.outages import Dependency, Outages, outage_of
from tests.fault.infra import cut_database_connections, refuse_connections


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_database_taken_away_is_an_outage_of_the_store(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        held = await engine.connect()
        await held.begin()
        await held.execute(text("SELECT 1"))
        await refuse_connections(database_url)
        errors = []
        for attempt in (held.execute(text("SELECT 1")), _select_one(engine)):
            with pytest.raises(Exception) as caught:
                await attempt
            errors.append(caught.value)
        await held.close()
    finally:
        await refuse_connections(database_url, refuse=False)
        await engine.dispose()
    # mid-transaction on a cut connection, and refused anew with SQLSTATE 55000 (a DBAPIError
    # that is neither an OperationalError nor marked invalidated: the case that was dead-lettered)
    assert [outage_of(error) for error in errors] == [Dependency.STORE, Dependency.STORE]


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_refused_constraint_is_the_messages_own_failure(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("CREATE TABLE t (id int PRIMARY KEY)"))
            await connection.execute(text("INSERT INTO t VALUES (1)"))
        with pytest.raises(IntegrityError) as caught:
            async with engine.begin() as connection:
                await connection.execute(text("INSERT INTO t VALUES (1)"))
    finally:
        await engine.dispose()
    assert outage_of(caught.value) is None


def test_broker_and_key_vault_outages_and_the_messages_own_errors() -> None:
    assert outage_of(nats.errors.NoServersError()) is Dependency.BROKER
    assert outage_of(nats.errors.TimeoutError()) is Dependency.BROKER
    assert outage_of(KeyMissing("IGA-A-001")) is Dependency.KEY_VAULT
    assert outage_of(ConnectionRefusedError(111, "refused")) is Dependency.STORE
    wrapped = RuntimeError("handler failed")
    wrapped.__cause__ = KeyMissing("IGA-A-001")
    assert outage_of(wrapped) is Dependency.KEY_VAULT
    for own in (ValueError("invalid literal for int()"), KeyError("subject_id"), TypeError("None")):
        assert outage_of(own) is None


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_outages_pause_until_the_store_answers_and_say_why(database_url: str) -> None:
    engine = create_engine(database_url)
    outages = Outages({Dependency.STORE: lambda: _select_one(engine)}, first_pause=0.05, keepalive_every=0.1)
    kept_alive = 0

    async def keepalive() -> None:
        nonlocal kept_alive
        kept_alive += 1

    try:
        # a connection lost mid-use while the database answers: no outage, retry at once
        await cut_database_connections(database_url)
        assert await outages.wait_out(Dependency.STORE) is False
        assert outages.problems() == {}

        await refuse_connections(database_url)
        waiters = [asyncio.create_task(outages.wait_out(Dependency.STORE, keepalive))
                   for _ in range(2)]
        await asyncio.sleep(0.5)
        assert not any(waiter.done() for waiter in waiters)
        assert "not currently accepting connections" in outages.problems()["consumers_paused_for_store"]
        assert kept_alive >= 2
        await refuse_connections(database_url, refuse=False)
        assert await asyncio.wait_for(asyncio.gather(*waiters), 10) == [True, True]
        assert outages.problems() == {}
    finally:
        await refuse_connections(database_url, refuse=False)
        await engine.dispose()


async def _select_one(engine) -> None:  # type: ignore[no-untyped-def]
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
