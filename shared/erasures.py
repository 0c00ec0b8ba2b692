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

from shared.store import EventStore, UnitOfWork


async def remember_erased(uow: UnitOfWork, subject_ids: Iterable[str]) -> None:
    """Record the subjects as erased in ``uow`` (a subject erased twice keeps its first row) and
    drop their keys from this process's mirror at once."""
    erased = list(dict.fromkeys(subject_ids))
    await uow.erased.remember(erased, datetime.now(UTC))
    for subject_id in erased:
        uow.store.codec.mark_erased(subject_id)


async def erased_subjects(store: EventStore) -> list[str]:
    """Every subject this service has recorded as erased, oldest erasure first."""
    async with store.transaction() as uow:
        return await uow.erased.all()
