"""The event store's statements are planned for each run's values (PostgreSQL).

asyncpg prepares every statement; left to ``plan_cache_mode = auto``, PostgreSQL settles after
five runs on a generic plan, made for the table as it then was (empty) and blind to the values.
The labs inbox probe paid that on every batch (docs/labs.md#throughput); ``shared.database``
plans each run instead.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from shared.database import create_engine, one_of
from shared.schema import inbox
from shared.store import EventStore

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
