"""Migration 0002 (outcomes v2) on a projection written before it: the patient rows get empty
report versions, still read (v2 values at their defaults), and the next batch records the v2
facts of that patient as if the row had always had the column."""

from __future__ import annotations

import asyncio
from datetime import date
from functools import partial
from pathlib import Path

from alembic import command
from sqlalchemy import insert, select

from services.outcomes import handlers, tables
from services.outcomes.domain import PatientOutcome
from services.outcomes.incoming import Incoming
from services.outcomes.projection_sql import SqlProjectionStore
from services.outcomes.projector import ProjectedPatient
from services.outcomes.wire import Meta
from shared.database import alembic_config, ensure_database
from shared.store import SqlEventStore, open_store
from tests.conftest import drop_database, new_database_url
from tests.outcomes.conftest import Feed
from tests.unit.outcomes.outcome_events import SID, adverse_event, enrolled


async def test_rows_written_before_v2_read_after_the_upgrade_and_take_v2_facts(backend: str, tmp_path: Path) -> None:
    url = new_database_url(backend, tmp_path, "outcomes")
    await ensure_database(url)
    await asyncio.to_thread(command.upgrade, alembic_config("outcomes", url), "0001_outcomes")
    feed = Feed()
    enrollment = feed.envelope(enrolled(), f"patient-{SID}")
    row = ProjectedPatient.new(SID)
    row.apply(Meta.of(enrollment), enrollment.decode())
    before_v2 = {k: v for k, v in row.row().items() if k != "report_versions_json"}
    store = open_store(url)
    assert isinstance(store, SqlEventStore)
    try:
        async with store.engine.begin() as connection:
            # the columns 0001 created (a column left out of an INSERT is not sent)
            await connection.execute(insert(tables.patients).values(generation=1, **before_v2))
        await asyncio.to_thread(command.upgrade, alembic_config("outcomes", url), "heads")

        p = tables.patients.c
        async with store.engine.connect() as connection:
            migrated = (await connection.execute(select(p.report_versions_json, p.outcome_json))).one()
        assert migrated.report_versions_json == "{}"
        assert PatientOutcome.model_validate_json(migrated.outcome_json).adverse_events == 0

        report = feed.envelope(adverse_event("AE-1", "insomnia", date(2014, 3, 12), grade=2), f"patient-{SID}")
        item = Incoming.parse("T_ENROLLMENT", 2, "enrollment", report.model_dump_json().encode())
        await store.transact(partial(handlers.project_batch, handlers.ProjectBatch([item]),
                                     projection=SqlProjectionStore()))
        async with store.engine.connect() as connection:
            updated = (await connection.execute(select(p.report_versions_json, p.outcome_json))).one()
        assert updated.report_versions_json == '{"adverse_event":{"AE-1":2}}'
        assert PatientOutcome.model_validate_json(updated.outcome_json).highest_ae_grade == 2
    finally:
        await store.close()
        await drop_database(url)
