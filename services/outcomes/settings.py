"""The outcomes service's own settings (environment variables), read by its composition root."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OutcomesSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    batch_size: int = Field(default=10_000, ge=1, le=10_000, alias="NEPHROTRACK_OUTCOMES_BATCH_SIZE")
    """Most messages per live batch (one transaction): a fetch takes what is waiting, up to this,
    so the batch grows with the backlog. A batch loads, locks and rewrites each patient it
    touches once — with the patient's whole history — so under a burst of lab results the cost
    per result falls with the batch: 2,000 instead of the consumers' 200 took the labs
    benchmark's projection from ~420 to ~1,340 results/s (docs/labs.md#throughput), 10,000
    (the consumers' ``max_ack_pending``) further (docs/performance.md, "End to end, live"). A
    quiet stream waits no longer than before: what is there is handed over at once, or after the
    consumers' 0.2 s batch timeout."""

    max_pause_seconds: float = Field(default=0.0, ge=0, le=10, alias="NEPHROTRACK_OUTCOMES_MAX_PAUSE_SECONDS")
    """After a batch that was not full, the live consumer waits as long as the batch took, at
    most this, before fetching the next (``shared.consumer.pause_after``): the messages arriving
    meanwhile make one batch, so a patient is rewritten once per twice as many results, for a
    freshness delay of up to one batch's time. 0 (the default) fetches again at once: since
    a remembered patient costs what is new since the last batch rather than their whole
    history, the pause's delay costs the labs benchmark more than its saved work gains
    (docs/performance.md, "End to end, live")."""

    remembered_results: int = Field(default=100_000, ge=0, alias="NEPHROTRACK_OUTCOMES_REMEMBERED_RESULTS")
    """How many eGFR results' worth of patients the live projection keeps in memory between
    batches (on PostgreSQL), so that a patient it wrote is neither read back nor re-derived
    from their whole history by the next batch while their row is unchanged
    (services/outcomes/remembered.py): about 1.8 KB each, so ~180 MB at the default bound (the
    k8s manifest gives outcomes 512 MiB). 0 keeps none."""

    as_of_timeout_seconds: float = Field(default=120.0, gt=0, alias="NEPHROTRACK_AS_OF_TIMEOUT_SECONDS")
    """Longest an ``as_of`` replay of the log may take before the request answers 503: a replay
    reads every source stream from its start (docs/time-travel.md, "Cost")."""
    as_of_cached: int = Field(default=4, ge=1, le=64, alias="NEPHROTRACK_AS_OF_CACHED")
    """``as_of`` projections kept in memory (least recently used dropped), by time, each caught up
    with what was published since when asked for again; each holds every patient's facts and
    timeline as of then."""
