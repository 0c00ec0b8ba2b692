"""The event store's statements are planned for each run's values, with statistics (PostgreSQL).

asyncpg prepares every statement; left to ``plan_cache_mode = auto``, PostgreSQL settles after
five runs on a generic plan, made for the table as it then was (empty) and blind to the values.
The labs inbox probe paid that on every batch (docs/labs.md#throughput); ``shared.database``
plans each run instead. A plan is only as good as the table's statistics: services analyse
their tables themselves (``analyze_stale_tables``), autovacuum may be off.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from shared.database import analyze_stale_tables, create_engine, one_of
from shared.schema import events, inbox
from shared.store import EventStore, PostgresEventStore
from tests.foundation.test_event_store import things

pytestmark = pytest.mark.parametrize("backend", ["postgresql"])

IDS = ", ".join(f"'m-{n}'" for n in range(500))
PROBE = "SELECT message_id FROM inbox WHERE consumer = $1 AND message_id = ANY($2)"


async def test_a_statement_run_again_is_planned_for_its_values(store: EventStore) -> None:
    """The labs inbox probe, prepared and run batch after batch while the inbox grows. Under a
    generic plan (made after five runs, for the table as it then was) the 500 ids are a
    parameter, compared one by one against every entry the plan reads: 176 ms a probe at
    20,000 rows here, against 4 ms planned with the values, whose array PostgreSQL hashes."""
    async with store.engine.connect() as connection:
        await connection.exec_driver_sql(f"PREPARE probe(varchar, varchar[]) AS {PROBE}")
        for batch in range(8):  # past the five runs after which a generic plan may be kept
            await connection.exec_driver_sql(f"EXECUTE probe('labs', ARRAY[{IDS}])")
            await connection.exec_driver_sql(
                f"INSERT INTO inbox SELECT 'labs', 'b{batch}-' || n, now() FROM generate_series(1, 500) AS n"
            )
        plan = "\n".join(row[0] for row in await connection.exec_driver_sql(f"EXPLAIN EXECUTE probe('labs', ARRAY[{IDS}])"))
    assert "$2" not in plan, plan  # the ids themselves are in the plan: it was made for this run


async def test_one_of_binds_the_ids_as_one_array_on_postgresql(store: EventStore) -> None:
    """``= ANY($1)``: one statement whatever the number of ids (an IN list was a new statement
    for every length), with the same rows as IN."""
    ids = [f"m-{n}" for n in range(700)]
    async with store.engine.begin() as connection:
        await connection.exec_driver_sql("INSERT INTO inbox SELECT 'c', 'm-' || n, now() FROM generate_series(0, 9) AS n")
        query = inbox.select().where(one_of(inbox.c.message_id, ids, postgres=True))
        assert "= ANY" in str(query.compile(dialect=connection.dialect))
        assert sorted(row.message_id for row in await connection.execute(query)) == sorted(f"m-{n}" for n in range(10))


async def test_every_service_connection_plans_each_run(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            assert await connection.scalar(text("SHOW plan_cache_mode")) == "force_custom_plan"
    finally:
        await engine.dispose()


async def test_a_lone_append_is_planned_once_and_its_plan_kept(store: EventStore) -> None:
    """A lone append's one statement has one good plan whatever its values: its connections
    keep PostgreSQL's plan cache (a generic plan after five runs), where planning it for each run
    cost 0.10–0.12 ms of server CPU per append."""
    assert isinstance(store, PostgresEventStore)
    for n in range(8):
        await store.append(f"lone-{n}", things(n), 0)
    async with store._lone_append_engine().connect() as connection:
        assert await connection.scalar(text("SHOW plan_cache_mode")) == "auto"
        generic, custom = (await connection.execute(text(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement LIKE 'WITH head AS%'"
        ))).one()
    assert generic >= 3 and custom <= 5, (generic, custom)
    assert [e.stream_version for e in await store.read_stream("lone-7")] == [1]


async def test_batch_reads_use_the_index_once_the_tables_are_analysed(store: EventStore) -> None:
    """Labs reads the streams of a batch's 500 result ids in one query. On a table never analysed
    (autovacuum off, or not come round yet) PostgreSQL takes 500 keys to match every row and scans
    the whole event log for each batch; ``analyze_stale_tables`` gives it the statistics, after
    which the same query looks the keys up in the (stream_id, stream_version) index."""
    async with store.engine.connect() as connection:
        # 50,000 events of a lab log's width (a sealed payload is ~700 bytes).
        await connection.exec_driver_sql(
            "INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, occurred_at, "
            "recorded_at, correlation_id, actor, payload) SELECT gen_random_uuid(), 'labresult-r' || n / 2, "
            "1 + n % 2, 'EgfrComputed', 1, now(), now(), gen_random_uuid(), 'labs', "
            "convert_to(repeat('x', 700), 'UTF8') FROM generate_series(1, 50000) AS n"
        )
        await connection.commit()
        # A backend reports its row counts to the statistics views within seconds; now, here.
        await connection.exec_driver_sql("SELECT pg_stat_force_next_flush()")
        await connection.commit()
        await connection.exec_driver_sql("SELECT 1")
        await connection.commit()
    query = events.select().where(
        one_of(events.c.stream_id, [f"labresult-x{n}" for n in range(500)], postgres=True)
    ).order_by(events.c.stream_id, events.c.stream_version)

    async def plan() -> str:
        async with store.engine.connect() as connection:
            compiled = query.compile(dialect=connection.dialect, compile_kwargs={"literal_binds": True})
            lines = [row[0] for row in await connection.exec_driver_sql(f"EXPLAIN {compiled}")]
        return "\n".join(line for line in lines if "Cond" not in line and "Filter" not in line)  # not the 500 ids

    assert "Seq Scan on events" in await plan()  # the problem: without statistics, the whole log
    assert "events" in await analyze_stale_tables(store.engine)
    after = await plan()
    assert "Seq Scan" not in after and "uq_events_stream_version" in after, after
