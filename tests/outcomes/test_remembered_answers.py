"""Live cohort answers remembered per projection version (services/outcomes/answers.py): the
same bytes and headers as the answer FastAPI renders, never staler than the rows — a new event,
a batch behind the mark (another replica's, a redelivery) and a rebuild's swap each change what
the next request gets. PostgreSQL only: SQLite rows carry no version, and nothing is remembered."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import httpx
import nats
import pytest

from services.outcomes import statistics
from services.outcomes.queries import OutcomesQueries
from shared.broker import Topology
from shared.store import EventStore
from tests.outcomes.conftest import Feed
from tests.outcomes.mixed_run import Published, publish
from tests.outcomes.serving import caught_up, outcomes_api
from tests.outcomes.test_api import cohort
from tests.outcomes.test_live_projection import project
from tests.outcomes.test_time_travel import rebuilt
from tests.unit.outcomes.outcome_events import enrolled

pytestmark = pytest.mark.timeout(90)

QUESTIONS = ["/v1/cohorts", "/v1/cohorts/A/endpoints", "/v1/cohorts/control/endpoints"]


@pytest.fixture
def backend() -> str:
    return "postgresql"


async def answers(api: httpx.AsyncClient, query: str = "") -> dict[str, httpx.Response]:
    found = {path: await api.get(f"{path}?{query}" if query else path) for path in QUESTIONS}
    assert all(r.status_code == 200 for r in found.values()), {p: r.text for p, r in found.items()}
    return found


def headers(response: httpx.Response, *leaving_out: str) -> list[tuple[str, str]]:
    """In order, but the server's clock (``date``, to the second) and ``leaving_out``."""
    return [(k, v) for k, v in response.headers.multi_items() if k not in ("date", *leaving_out)]


async def test_a_remembered_answer_is_the_rendered_one_and_follows_every_change(
    tmp_path: Path, nats_client: nats.NATS, topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = cohort()
    async with outcomes_api(run, "postgresql", tmp_path, nats_client, topology, monkeypatch) as api:
        computed, remembered = await answers(api), await answers(api)
        for path in QUESTIONS:
            assert remembered[path].content == computed[path].content, path
            assert headers(remembered[path]) == headers(computed[path]), path

        # A lock of the same rows is answered without remembering: FastAPI renders it.
        assert (await api.post("/v1/locks", json={"name": "same-rows"})).status_code == 201
        locked = await answers(api, "lock=same-rows")
        for path in QUESTIONS:
            assert locked[path].content == remembered[path].content, path
            assert headers(locked[path], "x-projection-lock", "x-projection-generation") == headers(
                remembered[path], "x-projection-generation"), path

        # Refusals stay refusals: no key, no answer (remembered or not).
        async with httpx.AsyncClient(base_url=str(api.base_url)) as anonymous:
            assert (await anonymous.get("/v1/cohorts")).status_code == 401

        # A new event applied by the live projection: the next request answers with it.
        newcomer = Feed().envelope(enrolled(sid="IGA-B-001", age=44, enrolled_on=date(2014, 5, 1), baseline=41.0,
                                            group="B"))
        await publish(nats_client.jetstream(), topology, [Published("enrollment", newcomer)])
        await caught_up(api, len(run) + 1)
        after = (await api.get("/v1/cohorts")).json()
        assert {row["group"]: row["n"] for row in after} == {"A": 2, "B": 1, "control": 1}
        assert after != remembered["/v1/cohorts"].json()

        # A rebuild's swap: the same rows in a new generation, said so in the headers.
        before_swap = await answers(api)
        await rebuilt(api)
        swapped = await answers(api)
        for path in QUESTIONS:
            assert swapped[path].content == before_swap[path].content, path
            assert (swapped[path].headers["X-Projection-Generation"]
                    != before_swap[path].headers["X-Projection-Generation"]), path


async def test_a_batch_behind_the_mark_changes_the_answer_key(outcomes_store: EventStore, feed: Feed) -> None:
    """Two replicas share a durable consumer: the batch fetched first may commit last. The
    position is then the same before and after it, the rows are not: the key must differ."""
    early, late = feed.messages(
        "enrollment",
        enrolled(sid="IGA-A-001", age=60, enrolled_on=date(2014, 1, 1), baseline=30.0),
        enrolled(sid="IGA-A-002", age=50, enrolled_on=date(2014, 1, 1), baseline=20.0),
    )
    queries = OutcomesQueries(outcomes_store.engine, Feed.STREAMS)

    async def read() -> tuple[tuple, tuple | None, str, list]:
        async with queries.snapshot() as connection:
            freshness = await queries.freshness(connection)
            rows = statistics.all_cohorts(await queries.outcomes(connection))
        return freshness.answer_key, freshness.live_key, freshness.position, rows

    await project(outcomes_store, "enrollment", [late])
    key, live, position, rows = await read()
    await project(outcomes_store, "enrollment", [early])  # sequence 1, committed after sequence 2
    key_after, live_after, position_after, rows_after = await read()
    assert position_after == position and rows_after != rows
    assert key_after != key and live_after != live and live is not None
