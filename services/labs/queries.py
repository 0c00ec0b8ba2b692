"""The SQL side of the :class:`~services.labs.labs_store.LabsStore` port: every statement on the
labs tables (:mod:`services.labs.tables`), on the connection of the caller's unit of work.

Batches are chunked (500 ids per ``IN``) and bulk rows go through ``uow.insert_rows`` (COPY on
PostgreSQL): the broker consumer hands in ~500 results at once (docs/labs.md#throughput).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from services.labs.domain import KnownPatient
from services.labs.labs_store import PURGE_TARGETS, LabsStore, LoggedRejection, ParkedResult, PurgeJob
from services.labs.tables import inbound_purges, lab_rejections, lab_result_index, parked_results
from shared.database import one_of
from shared.moments import as_utc
from shared.schema import known_patients, outbox
from shared.store import SqlUnitOfWork, UnitOfWork

CHUNK = 500
"""Ids per ``IN (…)``: far below any driver's parameter limit."""
_DELETED_COLUMNS = dict(zip(PURGE_TARGETS, ("results_deleted", "rejected_deleted", "events_deleted"), strict=True))
_PARKED = (parked_results.c.id, parked_results.c.source, parked_results.c.message_id, parked_results.c.result_id,
           parked_results.c.subject_id, parked_results.c.payload, parked_results.c.parked_at)


class SqlLabsStore(LabsStore):
    """Stateless: every call works on the connection of the unit of work it is given."""

    async def known_patients(self, uow: UnitOfWork, subject_ids: Sequence[str]) -> dict[str, KnownPatient]:
        connection, postgres = _connection(uow), _is_postgres(uow)
        columns = (known_patients.c.subject_id, known_patients.c.sex, known_patients.c.age_years,
                   known_patients.c.enrolled_on)
        ids = list(dict.fromkeys(subject_ids))
        found: dict[str, KnownPatient] = {}
        for start in range(0, len(ids), CHUNK):
            query = select(*columns).where(one_of(known_patients.c.subject_id, ids[start : start + CHUNK],
                                                  postgres=postgres))
            for row in await connection.execute(query):
                found[row.subject_id] = KnownPatient(row.subject_id, row.sex, row.age_years, row.enrolled_on)
        return found

    async def index_results(self, uow: UnitOfWork, rows: Sequence[tuple[str, str]]) -> None:
        await _sql_uow(uow).insert_rows(
            lab_result_index, [{"result_id": result_id, "subject_id": subject_id} for result_id, subject_id in rows]
        )

    async def result_ids_of(self, uow: UnitOfWork, subject_id: str) -> list[str]:
        query = select(lab_result_index.c.result_id).where(lab_result_index.c.subject_id == subject_id)
        return list((await _connection(uow).execute(query)).scalars())

    async def park(self, uow: UnitOfWork, parked: Sequence[ParkedResult]) -> None:
        if parked:
            rows = [
                {"source": p.source, "message_id": p.message_id, "result_id": p.result_id,
                 "subject_id": p.subject_id, "payload": p.payload, "parked_at": p.parked_at}
                for p in parked
            ]
            await _connection(uow).execute(_sql_uow(uow).store.insert_ignoring(parked_results), rows)

    async def take_parked_for(self, uow: UnitOfWork, subject_ids: Sequence[str]) -> list[ParkedResult]:
        ids = list(dict.fromkeys(subject_ids))
        taken: list[ParkedResult] = []
        for start in range(0, len(ids), CHUNK):
            taken += await _take(uow, parked_results.c.subject_id.in_(ids[start : start + CHUNK]))
        return taken

    async def take_parked_of_known(self, uow: UnitOfWork) -> list[ParkedResult]:
        return await _take(uow, parked_results.c.subject_id.in_(select(known_patients.c.subject_id)))

    async def take_parked_before(self, uow: UnitOfWork, moment: datetime) -> list[ParkedResult]:
        return await _take(uow, parked_results.c.parked_at < moment)

    async def parked_for(self, uow: UnitOfWork, subject_id: str) -> list[ParkedResult]:
        query = select(*_PARKED).where(parked_results.c.subject_id == subject_id).order_by(parked_results.c.id)
        return [_parked(row) for row in await _connection(uow).execute(query)]

    async def parked_count(self, uow: UnitOfWork) -> int:
        return int(await _connection(uow).scalar(select(func.count()).select_from(parked_results)) or 0)

    async def log_rejections(self, uow: UnitOfWork, rows: Sequence[LoggedRejection]) -> None:
        if rows:
            await _connection(uow).execute(
                insert(lab_rejections),
                [asdict(row) for row in rows],
            )

    async def rejections(
        self, uow: UnitOfWork, *, limit: int, source: str | None = None, code: str | None = None
    ) -> list[LoggedRejection]:
        query = select(lab_rejections).order_by(lab_rejections.c.id.desc()).limit(limit)
        if source:
            query = query.where(lab_rejections.c.source == source)
        if code:
            query = query.where(lab_rejections.c.code == code)
        return [
            LoggedRejection(row.event_id, as_utc(row.recorded_at), row.source, row.code, row.reason, row.message_id,
                            row.subject_id, row.raw_preview)
            for row in await _connection(uow).execute(query)
        ]

    async def publish_also(self, uow: UnitOfWork, rows: Sequence[dict[str, Any]]) -> None:
        await _sql_uow(uow).insert_rows(outbox, rows)

    async def delete_about(self, uow: UnitOfWork, subject_ids: Sequence[str]) -> None:
        for table in (parked_results, lab_rejections):
            await _connection(uow).execute(delete(table).where(table.c.subject_id.in_(subject_ids)))

    async def request_purges(self, uow: UnitOfWork, subject_ids: Sequence[str], now: datetime) -> None:
        rows = [{"subject_id": subject_id, "requested_at": now} for subject_id in dict.fromkeys(subject_ids)]
        if rows:
            await _connection(uow).execute(_sql_uow(uow).store.insert_ignoring(inbound_purges), rows)

    async def start_purges(self, uow: UnitOfWork, limit: int) -> list[str]:
        connection = _connection(uow)
        subject_ids = list((await connection.execute(
            select(inbound_purges.c.subject_id).where(inbound_purges.c.done_at.is_(None))
            .order_by(inbound_purges.c.requested_at).limit(limit)
        )).scalars())
        if subject_ids:
            await connection.execute(
                update(inbound_purges).where(inbound_purges.c.subject_id.in_(subject_ids))
                .values(attempts=inbound_purges.c.attempts + 1)
            )
        return subject_ids

    async def finish_purges(self, uow: UnitOfWork, subject_ids: Sequence[str], now: datetime) -> None:
        await _connection(uow).execute(
            update(inbound_purges).where(inbound_purges.c.subject_id.in_(subject_ids))
            .values(done_at=now, last_error=None)
        )

    async def fail_purges(self, uow: UnitOfWork, subject_ids: Sequence[str], error: str) -> None:
        await _connection(uow).execute(
            update(inbound_purges).where(inbound_purges.c.subject_id.in_(subject_ids)).values(last_error=error)
        )

    async def count_purged(self, uow: UnitOfWork, target: str, deleted: Mapping[str, int]) -> None:
        name = _DELETED_COLUMNS[target]
        column = inbound_purges.c[name]
        for subject_id, count in deleted.items():
            await _connection(uow).execute(
                update(inbound_purges).where(inbound_purges.c.subject_id == subject_id).values({name: column + count})
            )

    async def pending_purges(self, uow: UnitOfWork) -> int:
        query = select(func.count()).select_from(inbound_purges).where(inbound_purges.c.done_at.is_(None))
        return int(await _connection(uow).scalar(query) or 0)

    async def purges(self, uow: UnitOfWork, limit: int) -> list[PurgeJob]:
        query = select(inbound_purges).order_by(inbound_purges.c.requested_at.desc()).limit(limit)
        return [
            PurgeJob(
                row.subject_id, as_utc(row.requested_at), as_utc(row.done_at) if row.done_at else None,
                row.attempts, row.last_error,
                {label: getattr(row, column) for label, column in _DELETED_COLUMNS.items()},
            )
            for row in await _connection(uow).execute(query)
        ]


async def _take(uow: UnitOfWork, where: Any) -> list[ParkedResult]:
    rows = await _connection(uow).execute(delete(parked_results).where(where).returning(*_PARKED))
    return sorted((_parked(row) for row in rows), key=lambda parked: parked.id)


def _parked(row: Any) -> ParkedResult:
    return ParkedResult(row.source, row.message_id, row.result_id, row.subject_id, row.payload,
                        as_utc(row.parked_at), row.id)


def _sql_uow(uow: UnitOfWork) -> SqlUnitOfWork:
    if not isinstance(uow, SqlUnitOfWork):
        raise TypeError(f"the SQL labs tables need a SQL unit of work, not {type(uow).__name__} "
                        "(an in-memory event store goes with MemoryLabsStore)")
    return uow


def _connection(uow: UnitOfWork) -> AsyncConnection:
    return _sql_uow(uow).connection


def _is_postgres(uow: UnitOfWork) -> bool:
    return _sql_uow(uow).store.is_postgres
