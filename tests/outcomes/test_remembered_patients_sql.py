"""The live projection's remembered patients on the real databases: a patient written by this
process is used again only while their row is the row it wrote, so another replica's write and a
rolled-back batch are never lost, and the rows stay those of a store that remembers nothing."""

from __future__ import annotations

import asyncio
from datetime import date
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.outcomes.projection_sql import SqlProjectionStore
from services.outcomes.projections import LiveProjection
from services.outcomes.remembered import RememberedPatients
from shared.consumer import InboundMessage
from shared.database import migrate
from shared.store import EventStore, open_store
from tests.conftest import drop_database, new_database_url
from tests.outcomes.conftest import Feed
from tests.outcomes.rows import generation_rows, outcome
from tests.unit.outcomes.outcome_events import SID, dose, egfr, enrolled


async def project(store: EventStore, projection: SqlProjectionStore, source: str, messages: list[InboundMessage]) -> None:
    async with store.transaction() as uow:
        await LiveProjection(source, projection)(uow, messages)


def locked(origin: str) -> float:
    return REGISTRY.get_sample_value("nephrotrack_outcomes_patients_locked_total", {"origin": origin}) or 0.0


def lab(feed: Feed, result_id: str, value: float, collected: str, version: int = 2) -> InboundMessage:
    event = egfr(result_id, value, collected)
    return feed.message("labs", feed.envelope(event, f"labresult-{result_id}", version))


async def test_a_write_by_another_replica_is_read_not_overwritten(
    outcomes_store: EventStore, feed: Feed, backend: str
) -> None:
    replica, other = SqlProjectionStore(RememberedPatients(1_000)), SqlProjectionStore(RememberedPatients(1_000))
    await project(outcomes_store, replica, "enrollment", feed.messages("enrollment", enrolled()))
    await project(outcomes_store, replica, "labs", [lab(feed, "R1", 27.0, "2014-03-01")])
    assert len(replica.remembered) == (1 if backend == "postgresql" else 0)  # SQLite rows have no version
    await project(outcomes_store, other, "pulse", feed.messages("pulse", dose(date(2014, 3, 10))))
    read_before = locked("read")
    await project(outcomes_store, replica, "labs", [lab(feed, "R2", 39.0, "2020-03-01")])
    assert locked("read") - read_before == (1 if backend == "postgresql" else 0)  # not taken from memory
    values = await outcome(outcomes_store.engine, SID)
    assert values is not None
    assert (values.pulse_cycles, values.baseline_egfr, values.post_egfr) == (1, 27.0, 39.0)


async def test_a_rolled_back_batch_leaves_nothing_the_next_one_trusts(
    outcomes_store: EventStore, feed: Feed
) -> None:
    projection = SqlProjectionStore(RememberedPatients(1_000))
    await project(outcomes_store, projection, "enrollment", feed.messages("enrollment", enrolled()))
    await project(outcomes_store, projection, "labs", [lab(feed, "R1", 27.0, "2014-03-01")])

    class Crash(Exception):
        pass

    with pytest.raises(Crash):
        async with outcomes_store.transaction() as uow:
            await LiveProjection("labs", projection)(uow, [lab(feed, "R2", 99.0, "2020-03-01")])
            raise Crash  # after the rows were written and the patient remembered, before the commit
    await project(outcomes_store, projection, "labs", [lab(feed, "R3", 39.0, "2021-03-01")])
    row = (await generation_rows(outcomes_store.engine, 1))["outcome_patients"][0]
    assert '"R2"' not in row[2] and '"R3"' in row[2]  # facts_json


async def test_rows_are_those_a_store_remembering_nothing_writes(backend: str, tmp_path: Path) -> None:
    rows = []
    for remembered in (RememberedPatients(1_000), None):
        url = new_database_url(backend, tmp_path, "outcomes")
        await asyncio.to_thread(migrate, "outcomes", url)
        store = open_store(url)
        try:
            projection = SqlProjectionStore(remembered)
            replay = Feed()
            await project(store, projection, "enrollment", replay.messages("enrollment", enrolled()))
            taken_before = locked("remembered")
            for n in range(5):
                await project(store, projection, "labs", [lab(replay, f"R{n}", 30.0 + n, f"201{n}-03-01")])
            await project(store, projection, "labs", [lab(replay, "R2", 20.0, "2012-03-01", version=3)])  # a correction
            assert locked("remembered") - taken_before == (6 if remembered and backend == "postgresql" else 0)
            rows.append((await generation_rows(store.engine, 1))["outcome_patients"])
        finally:
            await store.close()
            await drop_database(url)
    assert rows[0] == rows[1]
