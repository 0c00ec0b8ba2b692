"""Finishing erasures: the key of every erased subject is purged from the key bucket, until it is.

The erasure endpoint records ``PatientDataErased`` first (never lost), then deletes the patient's
key (:meth:`shared.keys.KeyVault.erase`). If that deletion fails — the broker unreachable, a
permission missing — the erasure still stands: every service remembers the subject as erased and
never opens their data again, even after a restart (shared/erasures.py). But the key itself
is still in the bucket, where a backup or a reader of the bucket finds it. So this background
task re-runs ``KeyVault.erase`` for every erased subject each interval, until the bucket holds
the purge marker; ``erase`` is idempotent, and for a key already purged costs one read.
"""

from __future__ import annotations

import asyncio
from typing import Literal
from uuid import UUID

import structlog
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared import metrics
from shared.erasures import erased_subjects
from shared.keys import KeyVault
from shared.store import EventStore
from shared.tasks import woken

log = structlog.get_logger(__name__)

KeyPurge = Literal["done", "pending"]


class EnrollmentSettings(BaseSettings):
    """The enrollment service's own settings (environment variables)."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    key_purge_interval_seconds: float = Field(
        default=60, gt=0, alias="NEPHROTRACK_ENROLLMENT_KEY_PURGE_INTERVAL_SECONDS"
    )
    """How often the keys of erased subjects are checked and purged if still present."""


class KeyPurger:
    """Purges erased subjects' keys: at once for an erasure (:meth:`purge`), then every
    ``interval`` seconds for all of them (:meth:`run`, a ``service.background`` task)."""

    def __init__(self, store: EventStore, vault: KeyVault, *, interval: float) -> None:
        self.store = store
        self.vault = vault
        self.interval = interval
        self._wake = asyncio.Event()

    async def purge(self, subject_id: str, erasure_id: UUID) -> KeyPurge:
        """Purge one erased subject's key now; ``pending`` when that failed (logged, and the
        next pass, started at once, tries again and counts it)."""
        try:
            await self.vault.erase(subject_id)
        except Exception as error:  # noqa: BLE001 - the erasure is recorded; the passes finish it
            log.warning("erasure recorded but its key purge failed; retried by the key purge job",
                        erasure_event_id=str(erasure_id), error=repr(error))  # no subject ids in logs
            self._wake.set()
            return "pending"
        return "done"

    async def run(self) -> None:
        """Pass after pass until cancelled."""
        while True:
            self._wake.clear()
            try:
                await self.run_once()
            except Exception as error:  # noqa: BLE001 - database unreachable: the next pass retries
                log.warning("key purge pass failed; will retry", error=repr(error))
            await woken(self._wake, self.interval)

    async def run_once(self) -> int:
        """One pass over every erased subject; returns how many keys are still not purged."""
        pending = 0
        for subject_id in await erased_subjects(self.store):
            try:
                await self.vault.erase(subject_id)
            except Exception as error:  # noqa: BLE001 - stays pending for the next pass
                pending += 1
                last_error = error
        metrics.ERASURE_KEY_PURGES_PENDING.set(pending)
        if pending:
            log.warning("erased subjects' keys still in the key bucket", pending=pending, error=repr(last_error))
        return pending
