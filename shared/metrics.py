"""Prometheus metrics shared by every service (catalogue: docs/metrics.md).

Labels are bounded by design: event types, consumer names, codes and reasons come from
closed sets in the code; subject ids never appear in a label.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_APPENDED = Counter(
    "nephrotrack_events_appended_total", "Events appended to this service's store.", ["event_type"]
)
EVENTS_PUBLISHED = Counter(
    "nephrotrack_events_published_total", "Outbox events published to the broker.", ["subject_prefix"]
)
PUBLISH_FAILURES = Counter(
    "nephrotrack_publish_failures_total", "Outbox publish attempts that failed (will be retried)."
)
OUTBOX_BACKLOG = Gauge("nephrotrack_outbox_backlog", "Outbox rows not yet published.")
OUTBOX_OLDEST_AGE = Gauge(
    "nephrotrack_outbox_oldest_unsent_age_seconds", "Age of the oldest unpublished outbox row."
)
OUTBOX_VACUUM_SECONDS = Histogram(
    "nephrotrack_outbox_vacuum_duration_seconds",
    "Time one VACUUM of the outbox by the relay took (PostgreSQL; every 20,000 rows it deleted).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
MESSAGES_CONSUMED = Counter(
    "nephrotrack_messages_consumed_total", "Broker messages received by a durable consumer.", ["consumer"]
)
MESSAGES_ACKED = Counter(
    "nephrotrack_messages_acked_total", "Broker messages handled and acknowledged.", ["consumer"]
)
MESSAGES_DUPLICATE = Counter(
    "nephrotrack_messages_duplicate_total", "Messages skipped because the inbox had them already.", ["consumer"]
)
MESSAGES_REDELIVERED = Counter(
    "nephrotrack_messages_redelivered_total", "Messages whose handling failed and that were scheduled again.", ["consumer"]
)
MESSAGES_DEAD_LETTERED = Counter(
    "nephrotrack_messages_dead_lettered_total", "Messages sent to the dead-letter subject after the last try.", ["consumer"]
)
HANDLER_SECONDS = Histogram(
    "nephrotrack_handler_duration_seconds",
    "Time to handle one batch of messages in one transaction.",
    ["consumer"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CONSUMER_PENDING = Gauge(
    "nephrotrack_consumer_pending_messages", "Messages not yet delivered to a durable consumer (JetStream).", ["consumer"]
)
CONSUMER_ACK_PENDING = Gauge(
    "nephrotrack_consumer_ack_pending_messages", "Messages delivered but not yet acknowledged.", ["consumer"]
)
HTTP_REQUESTS = Histogram(
    "nephrotrack_http_request_duration_seconds",
    "HTTP requests by route template, method and status class.",
    ["route", "method", "status"],
)
PROTOCOL_DEVIATIONS = Counter(
    "nephrotrack_protocol_deviations_total",
    "ProtocolDeviationDetected events recorded by this service (pulse, cells), by deviation code.",
    ["code"],
)
LAB_RESULTS_ACCEPTED = Counter(
    "nephrotrack_lab_results_accepted_total",
    "Lab results the labs service accepted (recorded; duplicates and parked results not included), by source.",
    ["source"],
)
LAB_RESULTS_REJECTED = Counter(
    "nephrotrack_lab_results_rejected_total",
    "Lab inputs refused and published on labs.rejected, by source and rejection code (a closed set).",
    ["source", "reason"],
)
LAB_RESULTS_DUPLICATE = Counter(
    "nephrotrack_lab_results_duplicate_total",
    "Lab results that had been seen before (same message id for the result id): no effect, by source.",
    ["source"],
)
LAB_RESULTS_PARKED = Gauge(
    "nephrotrack_lab_results_parked",
    "Lab results held because their subject is not enrolled (yet) with the labs service.",
)
SERIOUS_ADVERSE_EVENTS = Counter(
    "nephrotrack_serious_adverse_events_total",
    "Enrollment: adverse events reported serious (counted once each, when a report first makes one serious), "
    "by CTCAE grade (1-5) and treatment_related (true/false).",
    ["grade", "treatment_related"],
)
ERASURE_PURGES_PENDING = Gauge(
    "nephrotrack_erasure_purges_pending",
    "Labs: erased patients whose lab messages in clear (labs.results, labs.rejected, the labs stream's "
    "LabResultRejected) are not yet deleted from the broker (docs/erasure.md).",
)
ERASURE_KEY_PURGES_PENDING = Gauge(
    "nephrotrack_erasure_key_purges_pending",
    "Enrollment: erasures recorded whose patient key is still in the key bucket (its purge failed; "
    "the key purge job retries it, docs/erasure.md).",
)
ERASURE_PURGE_SCANNED = Counter(
    "nephrotrack_erasure_purge_scanned_messages_total",
    "Labs: messages read by inbound-purge passes (the scan's progress).",
)
ERASURE_PURGE_DELETED = Counter(
    "nephrotrack_erasure_purge_deleted_messages_total",
    "Labs: messages naming an erased patient deleted from the broker (secure erase), by stream.",
    ["stream"],
)
PROJECTION_LAG_EVENTS = Gauge(
    "nephrotrack_projection_lag_events",
    "Outcomes projection: messages in a source service's stream not yet applied to the projection "
    "the API serves (stream head sequence minus the last applied sequence), by source service.",
    ["source"],
)
PROJECTION_LAG_SECONDS = Gauge(
    "nephrotrack_projection_lag_seconds",
    "Outcomes projection: 0 when every source stream is applied up to its head; otherwise how long "
    "the oldest event not yet applied has been waiting (now minus its recorded_at), over all sources.",
)
OUTCOMES_REMEMBERED_RESULTS = Gauge(
    "nephrotrack_outcomes_remembered_results",
    "Outcomes: eGFR results' worth of patients the live projection keeps in memory between batches "
    "(at most NEPHROTRACK_OUTCOMES_REMEMBERED_RESULTS; PostgreSQL only).",
)
OUTCOMES_PATIENTS_LOCKED = Counter(
    "nephrotrack_outcomes_patients_locked_total",
    "Outcomes: patients live batches locked, by origin: remembered (their row unchanged since this "
    "process wrote it) or read (parsed from their row); PostgreSQL only.",
    ["origin"],
)
DEPENDENCY_UP = Gauge(
    "nephrotrack_dependency_up",
    "0 while the service's consumers are paused waiting for a dependency (store, broker, key_vault) to answer.",
    ["dependency"],
)
CONSUMER_OUTAGE_RETRIES = Counter(
    "nephrotrack_consumer_outage_retries_total",
    "Batches handled again after an outage of a dependency (spends none of the messages' delivery attempts).",
    ["consumer", "dependency"],
)
