"""``labs.results`` through the labs service's durable consumer and broker handler, on PostgreSQL and
SQLite over the machine's NATS: what one odd message does to the batch it arrives in."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats
from sqlalchemy import func, select

from services.labs.catalogue import MAX_ID_CHARS
from services.labs.consumers import results_handler
from shared.broker import Topology, ensure_streams, make_broker
from shared.consumer import DurableConsumer, InboundMessage
from shared.schema import events
from shared.store import EventStore, UnitOfWork
from tests.conftest import NATS_URL
from tests.foundation.test_messaging import make_stream
from tests.labs.conftest import enroll, sql_labs
from tests.labs.test_ingest import SUBJECT, rejected_events, scalar


def body(message_id: str, result_id: str) -> bytes:
    return json.dumps({
        "message_id": message_id, "subject_id": SUBJECT, "lab_id": "LAB1", "loinc": "2160-0", "value": 2.1,
        "unit": "mg/dL", "collected_at": "2015-06-01T08:30:00Z", "status": "final", "result_id": result_id,
    }).encode()


async def egfr_count(store: EventStore) -> int:
    return await scalar(store, select(func.count()).where(events.c.event_type == "EgfrComputed"))


async def until(check: Any, timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)


async def test_an_over_long_message_id_is_refused_and_its_batch_mates_accepted_in_the_batch(
    labs_store: EventStore, nats_client: nats.NATS, topology: Topology
) -> None:
    """A 300-character ``Nats-Msg-Id`` (= its ``message_id``) among nine good results: on
    PostgreSQL its inbox row failed the batch, the nine were retried one by one and it was
    dead-lettered after five tries. Now the batch is handled once: nine results recorded, the
    long one refused (``bad_message_id``) on ``labs.rejected``, and sent again, it has no effect."""
    labs = sql_labs()
    await enroll(labs_store, labs, SUBJECT)
    js = nats_client.jetstream()
    stream = topology.service_stream("src")
    await make_stream(js, stream.name, topology.service_subjects("src"), duplicate_window=0.1)
    subject = topology.event_subject("src", "LabResult")
    long_id = "M" * 300
    ids = [f"M-{i}" for i in range(4)] + [long_id] + [f"M-{i}" for i in range(4, 9)]
    for n, message_id in enumerate(ids):
        await js.publish(subject, body(message_id, f"R-{n}"), headers={"Nats-Msg-Id": message_id})

    batches: list[list[InboundMessage]] = []
    handle = results_handler(labs)

    async def recording(uow: UnitOfWork, messages: list[InboundMessage]) -> None:
        batches.append(list(messages))
        await handle(uow, messages)

    name = f"{topology.prefix}-labs"
    broker = make_broker(NATS_URL, name="test")
    DurableConsumer(name=name, stream=stream, subject=topology.service_subjects("src"), handler=recording,
                    store=labs_store, dead_letter_subject=topology.dead_letter_subject(name)).attach(broker)
    await broker.connect()
    await ensure_streams(broker.connection.jetstream(), [topology.dead_letter_stream])
    await broker.start()
    try:
        await until(lambda: _rejections_and_results(labs_store, 1, 9))
        await asyncio.sleep(0.15)  # past JetStream's duplicate window: only the inbox can stop the copy
        await js.publish(subject, body(long_id, "R-again"), headers={"Nats-Msg-Id": long_id})
        await js.publish(subject, body("M-last", "R-last"), headers={"Nats-Msg-Id": "M-last"})
        await until(lambda: _rejections_and_results(labs_store, 1, 10))
        await asyncio.sleep(0.3)
    finally:
        await broker.stop()

    assert [len(batch) for batch in batches[:1]] == [len(ids)]  # one batch, never retried message by message
    assert await egfr_count(labs_store) == 10
    (refused,) = await rejected_events(labs_store)
    assert refused.code == "bad_message_id"
    assert refused.reason == f"message_id is 300 characters long; the limit is {MAX_ID_CHARS}"
    assert refused.raw == body(long_id, "R-4").decode()
    assert sum(len(batch) for batch in batches) == len(ids) + 1  # the copy of the long one never reached labs


async def _rejections_and_results(store: EventStore, rejections: int, results: int) -> bool:
    return len(await rejected_events(store)) >= rejections and await egfr_count(store) >= results
