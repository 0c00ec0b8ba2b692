"""Erased subjects, remembered by each service in its own database.

Why: a process learns an erasure from the ``PatientDataErased`` it handles and from the key
bucket's purge marker (shared/keys.py), and forgets the key in its mirror. Should the key's purge
have failed (broker unreachable, a permission missing: enrollment's key purge job retries it), the
key is still in the bucket, and a process that restarts would load it again and read the erased
patient's data. So every service records the erased subject in the transaction that handles the
erasure (:func:`remember_erased`) and tells its key vault at start-up (``Service.start``, through
:func:`erased_subjects`): the key stays forgotten whatever the bucket holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from shared.schema import erased_subjects as erased_table
from shared.store import EventStore, UnitOfWork


async def remember_erased(uow: UnitOfWork, subject_ids: Iterable[str]) -> None:
    """Record the subjects as erased in ``uow`` (a subject erased twice keeps its first row) and
    drop their keys from this process's mirror at once."""
    now = datetime.now(UTC)
    rows = [{"subject_id": subject_id, "erased_at": now} for subject_id in dict.fromkeys(subject_ids)]
    if not rows:
        return
    insert = pg_insert if uow.store.is_postgres else sqlite_insert
    await uow.connection.execute(insert(erased_table).on_conflict_do_nothing(), rows)
    for row in rows:
        uow.store.codec.forget(row["subject_id"])


async def erased_subjects(store: EventStore) -> list[str]:
    """Every subject this service has recorded as erased, oldest erasure first."""
    async with store.engine.connect() as connection:
        query = select(erased_table.c.subject_id).order_by(erased_table.c.erased_at, erased_table.c.subject_id)
        return list((await connection.execute(query)).scalars())
