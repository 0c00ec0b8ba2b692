"""``nephrotrack_projection_lag_events`` / ``_seconds`` measure what docs/metrics.md says.

Against the real JetStream and both database backends: events waiting in a source stream are
counted per source, the seconds are those of the oldest event not applied yet (not of the
newest one applied), both drop to 0 once the projection's marks reach the stream heads, and an
oldest message that cannot be read any more falls back to the newest applied event's age.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts.pulse import PulseDoseAdministered
from services.outcomes.lag import projection_lag
from services.outcomes.projection_sql import SqlProjectionStore
from services.outcomes.projector import ProjectionChanges, SourceMark
from services.outcomes.queries import OutcomesQueries
from services.outcomes.rebuild.wiring import default_streams
from shared.broker import Topology, ensure_streams
from shared.database import migrate
from shared.events import CommandContext, Envelope
from shared.settings import SERVICES
from shared.store import SqlEventStore, open_store
from tests.conftest import drop_database, new_database_url

NOW = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)


@pytest.fixture
async def store(backend: str, tmp_path: Path) -> AsyncIterator[SqlEventStore]:
    url = new_database_url(backend, tmp_path, "outcomes")
    await asyncio.to_thread(migrate, "outcomes", url)
    store = open_store(url)
    assert isinstance(store, SqlEventStore)
    yield store
    await store.close()
    await drop_database(url)


@pytest.fixture
def engine(store: SqlEventStore) -> AsyncEngine:
    return store.engine


def dose(day: int, recorded_at: datetime) -> Envelope:
    event = PulseDoseAdministered(subject_id="S-LAG-001", cycle=1, day=day, given_on=f"2014-03-{9 + day:02d}",
                                  dose_mg=1000, weight_kg=50.0, mg_per_kg=20.0)
    envelope = Envelope.wrap(event, stream_id="pulse-S-LAG-001", stream_version=day, context=CommandContext())
    return envelope.model_copy(update={"recorded_at": recorded_at})


async def mark(store: SqlEventStore, stream: str, sequence: int, recorded_at: datetime, generation: int = 1) -> None:
    changes = ProjectionChanges({})
    changes.marks[stream] = SourceMark(sequence, recorded_at)
    async with store.transaction() as uow:
        await SqlProjectionStore().write_changes(uow, generation, changes)


async def test_projection_lag_counts_waiting_events_and_ages_the_oldest(
    store: SqlEventStore, engine: AsyncEngine, nats_client: nats.NATS, topology: Topology
) -> None:
    js = nats_client.jetstream()
    await ensure_streams(js, topology.all_streams(SERVICES))
    streams = default_streams(topology)
    queries = OutcomesQueries(engine, streams)
    caught_up = await projection_lag(js, queries, NOW)
    assert caught_up.events == dict.fromkeys(streams, 0) and caught_up.seconds == 0

    recorded = [NOW - timedelta(minutes=30), NOW - timedelta(minutes=20), NOW - timedelta(minutes=10)]
    for day, at in enumerate(recorded, start=1):
        await js.publish(topology.event_subject("pulse", "PulseDoseAdministered"), dose(day, at).model_dump_json().encode())

    behind = await projection_lag(js, queries, NOW)
    assert behind.events == {**dict.fromkeys(streams, 0), "pulse": 3}
    assert behind.seconds == 30 * 60  # the oldest waiting event, not the newest applied one (none)

    await mark(store, streams["pulse"], 1, recorded[0])  # the first one applied
    one_applied = await projection_lag(js, queries, NOW)
    assert one_applied.events["pulse"] == 2 and one_applied.seconds == 20 * 60

    await js.delete_msg(streams["pulse"], 2)  # the oldest waiting one is gone from the stream
    fallback = await projection_lag(js, queries, NOW)
    assert fallback.events["pulse"] == 2 and fallback.seconds == 30 * 60  # newest applied: an upper bound

    await mark(store, streams["pulse"], 3, recorded[2])
    done = await projection_lag(js, queries, NOW)
    assert done.events == dict.fromkeys(streams, 0) and done.seconds == 0


async def test_the_lag_of_the_served_generation_is_measured(
    store: SqlEventStore, engine: AsyncEngine, nats_client: nats.NATS, topology: Topology
) -> None:
    """A rebuild's generation catching up does not hide the served one's lag."""
    js = nats_client.jetstream()
    await ensure_streams(js, topology.all_streams(SERVICES))
    streams = default_streams(topology)
    await js.publish(topology.event_subject("pulse", "PulseDoseAdministered"),
                     dose(1, NOW - timedelta(minutes=5)).model_dump_json().encode())
    await mark(store, streams["pulse"], 1, NOW - timedelta(minutes=5), generation=2)  # not the active one
    async with store.transaction() as uow:
        assert (await SqlProjectionStore().state(uow)).active_generation == 1
    lag = await projection_lag(js, OutcomesQueries(engine, streams), NOW)
    assert lag.events["pulse"] == 1 and lag.seconds == 5 * 60
