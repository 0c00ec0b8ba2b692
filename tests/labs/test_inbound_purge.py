"""Inbound purge (services/labs/purge.py) on the real NATS server and both database backends:
the erasure's handling records one durable job; a pass deletes, from LABS_RESULTS, LABS_REJECTED
and the labs stream's LabResultRejected, exactly the messages that name the erased subject; a
pass that fails halfway leaves the job pending, and the next one finishes it without counting
anything twice. On a private NATS server: the lab streams of the machine's server are shared by
every stack, and any labs service consuming them meanwhile would refuse (and so publish, naming
the subject) the incomplete results published here, changing what the purge finds."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest
from sqlalchemy import select

from contracts.enrollment import PatientDataErased
from services.labs.consumers import enrollment_handler
from services.labs.ingest import Labs
from services.labs.purge import InboundPurger, SubjectMatcher, purge_view, targets
from services.labs.tables import inbound_purges
from shared.broker import LAB_REJECTED_SUBJECT, LAB_RESULTS_SUBJECT, Topology, ensure_streams
from shared.consumer import InboundMessage
from shared.events import CommandContext, Envelope
from shared.settings import SERVICES
from shared.store import EventStore
from tests.fault.infra import NatsServer
from tests.labs.conftest import sql_labs

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def private_nats(tmp_path: Path) -> AsyncIterator[nats.NATS]:
    server = NatsServer(tmp_path / "nats")
    await server.astart()
    client = await nats.connect(server.url)
    try:
        yield client
    finally:
        await client.close()
        server.stop()


def test_a_subject_is_named_as_a_whole_token_or_by_its_field() -> None:
    matcher = SubjectMatcher({"IGA-A-1", "P.7"})
    assert matcher.named_in(b'{"subject_id": "IGA-A-1", "value": 1.2}') == {"IGA-A-1"}
    assert matcher.named_in(b"PID|1||IGA-A-1^^^LAB||") == {"IGA-A-1"}
    assert matcher.named_in(b"subject IGA-A-1. is not enrolled; so is P.7") == {"IGA-A-1", "P.7"}
    for other in (b'{"subject_id": "IGA-A-10"}', b"XIGA-A-1", b"IGA-A-1_2", b"P.7.1", b"IGA-A-1.5"):
        assert matcher.named_in(other) == set(), other
    escaped = b'{"payload": {"subject_id": "IGA\\u002dA-1"}}'  # only the field check sees it
    assert matcher.named_in(escaped) == {"IGA-A-1"}
    malformed = b'{"subject_id": "IGA\\u002dA-1", "value": 1.2'  # as the refusal of malformed JSON read it
    assert matcher.named_in(malformed) == {"IGA-A-1"}
    assert matcher.named_in(b"\xff\xfe not json") == set()


def erased_message(subject_id: str) -> InboundMessage:
    event = PatientDataErased(subject_id=subject_id, erased_on=date(2020, 1, 2))
    envelope = Envelope.wrap(event, stream_id=f"erasure-{subject_id}", stream_version=1, context=CommandContext())
    return InboundMessage(
        subject="t.enrollment.PatientDataErased", data=envelope.model_dump_json().encode(), headers={},
        message_id=str(envelope.event_id), delivery=1, stream="T_ENROLLMENT", stream_sequence=9,
    )


def rejected(subject_id: str | None, raw: str) -> bytes:
    """A LabResultRejected envelope as the outbox publishes it (payload in clear)."""
    return json.dumps({
        "event_id": str(uuid.uuid4()), "event_type": "LabResultRejected", "stream_id": f"rejection-{uuid.uuid4().hex}",
        "payload": {"source": "broker", "code": "unknown_loinc", "reason": "unknown LOINC 9999-9",
                    "subject_id": subject_id, "raw": raw},
    }).encode()


async def publish(js: Any, subject: str, body: bytes) -> int:
    return (await js.publish(subject, body, headers={"Nats-Msg-Id": uuid.uuid4().hex})).seq


async def present(js: Any, stream: str, sequence: int) -> bool:
    try:
        await js.get_msg(stream, sequence)
    except nats.js.errors.NotFoundError:
        return False
    return True


async def test_a_pass_deletes_what_names_the_erased_subject_and_survives_a_failure(
    labs_store: EventStore, private_nats: nats.NATS, topology: Topology, monkeypatch: pytest.MonkeyPatch,
) -> None:
    nats_client = private_nats
    js = nats_client.jetstream()
    await ensure_streams(js, topology.all_streams(SERVICES))
    tag = uuid.uuid4().hex[:6]
    erased, kept = f"IGA-P-{tag}-1", f"IGA-P-{tag}-10"  # the kept id extends the erased one

    # The erasure's handling records the job; a redelivered erasure leaves one job.
    labs = sql_labs()
    woken: list[bool] = []
    for _ in range(2):
        async with labs_store.transaction() as uow:
            await enrollment_handler(labs, lambda: woken.append(True))(uow, [erased_message(erased)])
    assert woken == [True, True]
    (job,) = await jobs(labs_store, labs)
    assert (job["subject_id"], job["status"], job["attempts"]) == (erased, "pending", 0)

    def result(subject_id: str, n: int) -> bytes:
        return json.dumps({"message_id": f"m-{subject_id}-{n}", "subject_id": subject_id, "loinc": "2160-0",
                           "value": 1.1, "unit": "mg/dL", "result_id": f"r-{subject_id}-{n}"}).encode()

    results, rejections, events = (t.stream for t in targets(topology))
    own_rejections = topology.event_subject("labs", "LabResultRejected")
    doomed = {
        results: [await publish(js, LAB_RESULTS_SUBJECT, result(erased, n)) for n in (1, 2, 3)],
        rejections: [await publish(js, LAB_REJECTED_SUBJECT, rejected(erased, "{}")),
                     await publish(js, LAB_REJECTED_SUBJECT, rejected(None, f"PID|1||{erased}^^^"))],
        events: [await publish(js, own_rejections, rejected(erased, "{}"))],
    }
    spared = {
        results: [await publish(js, LAB_RESULTS_SUBJECT, result(kept, 1))],
        rejections: [await publish(js, LAB_REJECTED_SUBJECT, rejected(kept, "{}"))],
        # the labs stream's other events are its log (sealed in production): never touched
        events: [await publish(js, topology.event_subject("labs", "EgfrComputed"), rejected(erased, "{}")),
                 await publish(js, own_rejections, rejected(kept, "{}"))],
    }

    # A pass that fails after its first deletion leaves the job pending, with the error.
    purger = InboundPurger(labs_store, labs, nats_client.jetstream, targets(topology), interval=60)
    deletions = 0
    delete_msg = type(js).delete_msg

    async def failing_delete(self: Any, stream: str, sequence: int) -> bool:
        nonlocal deletions
        deletions += 1
        if deletions > 1:
            raise nats.errors.TimeoutError
        return await delete_msg(self, stream, sequence)

    monkeypatch.setattr(type(js), "delete_msg", failing_delete)
    with pytest.raises(Exception):  # noqa: B017 - the TaskGroup wraps the readers' error
        await purger.run_once()
    monkeypatch.setattr(type(js), "delete_msg", delete_msg)
    (job,) = await jobs(labs_store, labs)
    assert job["status"] == "pending" and job["attempts"] == 1 and "TimeoutError" in job["last_error"]
    assert sum(job["deleted"].values()) == 1  # the one deletion that succeeded is counted

    # The next pass finishes it: every doomed message gone, nothing counted twice — not even
    # a message another replica deletes between this pass's scan and its deletion.
    raced: list[int] = []

    async def racing_delete(self: Any, stream: str, sequence: int) -> bool:
        if not raced:
            raced.append(sequence)
            await delete_msg(self, stream, sequence)  # the other replica
        return await delete_msg(self, stream, sequence)

    monkeypatch.setattr(type(js), "delete_msg", racing_delete)
    assert await purger.run_once() == 1
    monkeypatch.setattr(type(js), "delete_msg", delete_msg)
    assert raced
    for stream, sequences in doomed.items():
        for sequence in sequences:
            assert not await present(js, stream, sequence), (stream, sequence)
    for stream, sequences in spared.items():
        for sequence in sequences:
            assert await present(js, stream, sequence), (stream, sequence)
    (job,) = await jobs(labs_store, labs)
    async with labs_store.engine.connect() as connection:
        pending = (await connection.execute(select(inbound_purges).where(inbound_purges.c.done_at.is_(None)))).all()
    assert job["status"] == "done" and job["last_error"] is None and job["attempts"] == 2
    # every deletion but the raced one counted (the first pass deleted a result)
    assert job["deleted"] == {"labs_results": 3 - 1, "labs_rejected": 2, "labs_events": 1}
    assert pending == []
    assert await purger.run_once() == 0  # nothing pending: a pass does nothing


async def jobs(store: EventStore, labs: Labs) -> list[dict[str, Any]]:
    """The purge jobs as ``GET /v1/admin/erasures`` shows them."""
    async with store.transaction() as uow:
        return [purge_view(job) for job in await labs.tables.purges(uow, 10)]
