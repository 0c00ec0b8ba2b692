"""One conformance case for the labs port (services/labs/labs_store.py): the same use cases, on the
same inputs, leave the same answers in the SQL tables (SQLite, PostgreSQL) as in the in-memory
tables the handler unit tests run on (tests/unit/labs/test_labs_handlers.py). If the fake drifts
from the tables, those tests would prove nothing: this fails instead."""

from __future__ import annotations

from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from services.labs import handlers
from services.labs.ingest import Labs, Refusal
from services.labs.inputs import LabRejection
from services.labs.labs_memory import MemoryLabsStore
from services.labs.queries import SqlLabsStore
from shared.store import EventStore, open_store
from tests.labs.conftest import enroll
from tests.labs.test_ingest import result

NOW = datetime(2024, 1, 1, tzinfo=UTC)


async def scenario(store: EventStore, labs: Labs) -> dict[str, Any]:
    """Every method of the port, through the use cases; returns what the port answers after each."""
    seen: dict[str, Any] = {}

    async def read(name: str, query: Any) -> None:
        async with store.transaction() as uow:
            seen[name] = await query(uow)

    async def run(command: Any, handler: Any) -> Any:
        return await store.transact(lambda uow: handler(command, uow, labs=labs))

    await enroll(store, labs, "IGA-A-001")
    refusal = Refusal(LabRejection("unknown LOINC", "unknown_loinc", subject_id="IGA-A-003", message_id="m9"),
                      "broker", "{}")
    await run(handlers.IngestResults([
        result("m1", result_id="r-1"), result("m2", result_id="r-2", subject_id="IGA-A-002"),
        result("m3", result_id="r-3", subject_id="IGA-A-003"), result("m3", result_id="r-3", subject_id="IGA-A-003"),
    ], [refusal, Refusal(LabRejection("malformed JSON", "malformed_json"), "broker", "{x")], now=NOW), handlers.ingest_results)
    await read("result_ids", lambda uow: labs.tables.result_ids_of(uow, "IGA-A-001"))
    await read("parked", lambda uow: labs.tables.parked_for(uow, "IGA-A-002"))
    await read("parked_count", labs.tables.parked_count)
    await enroll(store, labs, "IGA-A-002")  # releases r-2
    await read("parked_after_release", labs.tables.parked_count)
    await read("known", lambda uow: labs.tables.known_patients(uow, ["IGA-A-001", "IGA-A-002", "IGA-A-404"]))
    swept = await run(handlers.SweepParked(NOW + timedelta(days=2)), handlers.sweep_parked)  # r-3 expires
    seen["swept"] = (len(swept.released), swept.expired, swept.still_parked)
    await read("rejections", lambda uow: labs.tables.rejections(uow, limit=10))
    await read("rejections_of_code", lambda uow: labs.tables.rejections(uow, limit=10, code="unknown_loinc"))
    await run(handlers.EraseSubjects(["IGA-A-009"], NOW), handlers.erase_subjects)
    await run(handlers.EraseSubjects(["IGA-A-003"], NOW + timedelta(minutes=1)), handlers.erase_subjects)
    await run(handlers.EraseSubjects(["IGA-A-003"], NOW + timedelta(hours=1)), handlers.erase_subjects)  # a redelivery
    await read("rejections_after_erasure", lambda uow: labs.tables.rejections(uow, limit=10))
    seen["started"] = await run(handlers.StartPurges(limit=10), handlers.start_purges)
    await run(handlers.CountPurged("labs_rejected", {"IGA-A-003": 2}), handlers.count_purged)
    await run(handlers.FinishPurges(["IGA-A-009"], error="TimeoutError()"), handlers.finish_purges)
    await run(handlers.FinishPurges(["IGA-A-003"], now=NOW), handlers.finish_purges)
    await read("pending", labs.tables.pending_purges)
    await read("purges", lambda uow: labs.tables.purges(uow, 10))
    return seen


def comparable(seen: dict[str, Any]) -> dict[str, Any]:
    """Ids and event ids are the store's own; everything else must be equal."""
    out = dict(seen)
    out["parked"] = [asdict(replace(p, id=0)) for p in seen["parked"]]
    for name in ("rejections", "rejections_of_code", "rejections_after_erasure"):
        out[name] = [{**asdict(r), "event_id": None} for r in seen[name]]
    out["purges"] = [asdict(job) for job in seen["purges"]]
    return out


async def test_the_sql_tables_answer_as_the_in_memory_ones(labs_store: EventStore) -> None:
    sql = comparable(await scenario(labs_store, Labs(SqlLabsStore(), timedelta(days=1))))
    memory = comparable(await scenario(open_store("memory://"), Labs(MemoryLabsStore(), timedelta(days=1))))
    assert sql == memory
    assert (sql["result_ids"], sql["parked_count"], sql["parked_after_release"]) == (["r-1"], 2, 1)
    assert sorted(sql["known"]) == ["IGA-A-001", "IGA-A-002"]
    assert sql["swept"] == (0, 1, 0) and sql["pending"] == 1
    assert [r["code"] for r in sql["rejections"]] == ["unknown_subject", "malformed_json", "unknown_loinc"]
    assert [r["code"] for r in sql["rejections_after_erasure"]] == ["malformed_json"]
    assert sql["started"] == ["IGA-A-009", "IGA-A-003"]
    assert [(j["subject_id"], j["attempts"], j["done_at"] is not None) for j in sql["purges"]] == [
        ("IGA-A-003", 1, True), ("IGA-A-009", 1, False)]
