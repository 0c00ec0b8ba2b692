"""The outcomes service's own settings (environment variables), read by its composition root."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OutcomesSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    batch_size: int = Field(default=2000, ge=1, le=10_000, alias="NEPHROTRACK_OUTCOMES_BATCH_SIZE")
    """Messages per live batch (one transaction) when a backlog is waiting. A batch loads, locks
    and rewrites each patient it touches once, so under a burst of lab results the cost per
    result falls with the batch: 2,000 instead of the consumers' 200 took the labs benchmark's
    projection from ~420 to ~1,340 results/s (docs/labs.md#throughput). A quiet stream waits no
    longer than before: a partial batch is handed over after the consumers' 0.2 s batch timeout."""
