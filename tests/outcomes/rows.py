"""Reading projection rows back, for assertions (a generation's rows, the live outcome of one patient)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.outcomes import tables
from services.outcomes.domain import PatientOutcome


async def generation_rows(engine: AsyncEngine, generation: int) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of a generation, without the generation column, in key order."""
    found = {}
    async with engine.connect() as connection:
        for table in tables.GENERATION_TABLES:
            columns = [c for c in table.c if c.name != "generation"]
            keys = [c for c in table.primary_key.columns if c.name != "generation"]
            rows = await connection.execute(select(*columns).where(table.c.generation == generation).order_by(*keys))
            found[table.name] = [tuple(row) for row in rows]
    return found


async def state(engine: AsyncEngine) -> Any:
    async with engine.connect() as connection:
        return (await connection.execute(select(tables.projection_state))).one()


async def outcome(engine: AsyncEngine, subject_id: str, generation: int = 1) -> PatientOutcome | None:
    p = tables.patients.c
    async with engine.connect() as connection:
        value = await connection.scalar(
            select(p.outcome_json).where(p.generation == generation, p.subject_id == subject_id)
        )
    return PatientOutcome.model_validate_json(value) if value else None


async def checkpoints(engine: AsyncEngine, generation: int = 1) -> dict[str, int]:
    s = tables.sources.c
    async with engine.connect() as connection:
        rows = await connection.execute(select(s.source, s.last_sequence).where(s.generation == generation))
        return {row.source: row.last_sequence for row in rows}


async def timeline(engine: AsyncEngine, subject_id: str, generation: int = 1) -> list[tuple[str, dict[str, Any]]]:
    t = tables.timeline.c
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(t.kind, t.detail_json).where(t.generation == generation, t.subject_id == subject_id)
            .order_by(t.occurred_on, t.recorded_at)
        )
        return [(row.kind, json.loads(row.detail_json)) for row in rows]
