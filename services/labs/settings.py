"""The labs service's settings, read from the environment by :class:`LabsSettings` (no stray
``os.environ`` reads)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class LabsSettings(BaseSettings):
    """The labs service's own settings (environment variables)."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    unknown_patient_wait_seconds: float = Field(
        default=86_400, gt=0, alias="NEPHROTRACK_LABS_UNKNOWN_PATIENT_WAIT_SECONDS"
    )
    """How long a result for a subject the labs service has not seen enrolled is held."""
    park_sweep_seconds: float | None = Field(default=None, gt=0, alias="NEPHROTRACK_LABS_PARK_SWEEP_SECONDS")
    """How often parked results are checked (default: a quarter of the wait, 0.2-10 s)."""
    batch_size: int = Field(default=500, ge=1, le=5000, alias="NEPHROTRACK_LABS_BATCH_SIZE")
    consumer_workers: int = Field(default=2, ge=1, le=16, alias="NEPHROTRACK_LABS_CONSUMER_WORKERS")
    """Concurrent pull loops (each its own transaction) on the ``labs.results`` durable consumer."""
    purge_interval_seconds: float = Field(default=30, gt=0, alias="NEPHROTRACK_LABS_PURGE_INTERVAL_SECONDS")
    """How often pending inbound purges are looked for (an erasure handled by this process
    starts its purge at once; this catches the rest, e.g. jobs left by a crash)."""
    mllp_idle_timeout_seconds: float = Field(default=60, gt=0, alias="NEPHROTRACK_MLLP_IDLE_TIMEOUT_SECONDS")
    """How long an MLLP connection may wait between messages (lab systems reconnect when closed)."""
    mllp_read_timeout_seconds: float = Field(default=30, gt=0, alias="NEPHROTRACK_MLLP_READ_TIMEOUT_SECONDS")
    """Deadline of one MLLP frame, from its first byte to its end block."""
    mllp_max_connections: int = Field(default=100, ge=1, alias="NEPHROTRACK_MLLP_MAX_CONNECTIONS")
    mllp_max_connections_per_address: int = Field(
        default=10, ge=1, alias="NEPHROTRACK_MLLP_MAX_CONNECTIONS_PER_ADDRESS"
    )
    """So that one peer address cannot take all ``mllp_max_connections`` and lock the labs out."""

    @property
    def sweep_interval(self) -> float:
        if self.park_sweep_seconds is not None:
            return self.park_sweep_seconds
        return min(10.0, max(0.2, self.unknown_patient_wait_seconds / 4))
