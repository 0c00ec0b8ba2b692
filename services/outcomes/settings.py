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

    as_of_timeout_seconds: float = Field(default=120.0, gt=0, alias="NEPHROTRACK_AS_OF_TIMEOUT_SECONDS")
    """Longest an ``as_of`` replay of the log may take before the request answers 503: a replay
    reads every source stream from its start (docs/time-travel.md, "Cost")."""
    as_of_cached: int = Field(default=4, ge=1, le=64, alias="NEPHROTRACK_AS_OF_CACHED")
    """``as_of`` projections kept in memory (least recently used dropped), by time, each caught up
    with what was published since when asked for again; each holds every patient's facts and
    timeline as of then."""
