"""Generates docs/metrics.md from the live Prometheus registry, so the catalogue cannot drift.

``python -m nephrotrack.metricdocs`` imports every service's app module (whatever they register
is registered then), walks ``prometheus_client.REGISTRY`` and rewrites the file; a test fails
when it is out of date. Every label must have an entry in :data:`LABELS` saying which values it
takes — a new label cannot be added without saying why its cardinality is bounded.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"

SERVICE_MODULES = tuple(f"services.{name}.app" for name in ("enrollment", "pulse", "cells", "labs", "outcomes"))

LABELS: dict[str, str] = {
    "event_type": "an event type name of this service (`PatientEnrolled`, …: the closed set in docs/events.md)",
    "subject_prefix": "the published subject without its last token (the event type): "
    "`<prefix>.<service>` (`nephrotrack.labs`), or `labs` for `labs.rejected`",
    "consumer": "a durable consumer, `<prefix>-<service>-<source>` (e.g. `nephrotrack-outcomes-labs`): "
    "a handful per service",
    "route": "the route *template* (`/v1/patients/{subject_id}`), never the path; `unmatched` for a "
    "path no route matches, `(refused)` for a request refused before routing (authentication)",
    "method": "the HTTP method",
    "status": "the status class: `2xx`, `3xx`, `4xx`, `5xx`",
    "code": "a protocol deviation code (`DOSE_ABOVE_DAILY_MAX`, …: the `DeviationCode` enum)",
    "source": "for lab results, the input channel (`broker`, `mllp`, `fhir`); for projection lag, "
    "the source service (`enrollment`, `pulse`, `cells`, `labs`)",
    "stream": "where the inbound purge deleted a message: `labs_results`, `labs_rejected`, `labs_events` "
    "(the labs stream's `LabResultRejected`)",
    "dependency": "what a service's consumers wait for in an outage: `store`, `broker`, `key_vault` "
    "(shared/outages.py)",
    "origin": "where a live outcomes batch's patient came from: `remembered` (kept in memory, their row "
    "unchanged since) or `read` (parsed from their row)",
    "reason": "a lab rejection code (`unknown_loinc`, `unknown_unit`, …: a closed set in the labs service)",
    "grade": "an adverse event's CTCAE v5 grade: `1` … `5`",
    "treatment_related": "`true` when the adverse event names an intervention with a possible, probable or "
    "definite causality (the contract's *treatment-related*), else `false`",
}

UNITS = {"_seconds": "seconds", "_bytes": "bytes"}

HEADER = """# Metrics

Generated from the live Prometheus registry by `python -m nephrotrack.metricdocs`; do not edit
by hand (a test fails when this file is stale).

Every service serves `GET /metrics` (Prometheus text format) on its HTTP port. All services
share one catalogue (`shared/metrics.py`): a metric a service has nothing to report about stays
at zero or absent there. Prometheus adds `job`, `instance` and `service` labels when it scrapes
(`deploy/prometheus/prometheus.yml`); the Grafana dashboard and the alert rules in `deploy/`
use the names below.

**Cardinality.** Every label takes values from a closed set (the table at the end says which);
no subject id, lot id, result id or message id is ever a label value — they are unbounded and,
for subject ids, pseudonymous study data. `tests/ops/test_metric_labels.py` drives a whole stack
(unknown ids, 404s, lab rejections) and checks every scraped series against an allow-list.

**Definitions.**
- *Consumer lag* (`nephrotrack_consumer_pending_messages`): JetStream's `num_pending` of the
  durable consumer — messages in its stream not yet delivered to it — read every 5 s by each
  service for each of its consumers; `nephrotrack_consumer_ack_pending_messages` counts those
  delivered but not yet acknowledged.
- *Projection lag* (outcomes service, refreshed every 5 s):
  `nephrotrack_projection_lag_events{source}` is the source service's stream head sequence minus
  the last sequence applied to the projection the API serves (the active generation, so a
  rebuild in progress does not count). `nephrotrack_projection_lag_seconds` is **0 when every
  source is caught up**; otherwise, over the sources that are behind, the largest
  `now − recorded_at` of the oldest message not applied yet — how long a fact has been waiting to
  reach the statistics. (If that message cannot be read, the source's newest applied event
  stands in for it, an upper bound.) It is deliberately not "now − the newest applied event":
  that would read hours for a moment after every quiet night.
- *Outbox*: `nephrotrack_outbox_backlog` rows not yet published; the age of the oldest is the
  time since it was committed. The relay vacuums the outbox itself on PostgreSQL (a queue table's
  dead rows must not wait for autovacuum, which may be off): `nephrotrack_outbox_vacuum_duration_seconds`
  times each of those vacuums.

Units: `_seconds` metrics are in seconds, `_bytes` in bytes; counters (`_total`) and the other
gauges count what their description says. Counters and histograms also expose a `_created`
sample (when the series was created: prometheus_client's default).
"""


def _import_services() -> None:
    for module in SERVICE_MODULES:
        importlib.import_module(module)


def _unit(name: str) -> str:
    base = name.removesuffix("_total")
    for suffix, unit in UNITS.items():
        if base.endswith(suffix):
            return unit
    return "–" if base.endswith("_info") else "count"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _wrapper_rows(wrapper: MetricWrapperBase) -> list[tuple[str, str, tuple[str, ...], str]]:
    rows = []
    for family in wrapper.describe():
        name = family.name + ("_total" if family.type == "counter" else "")
        doc = family.documentation
        if family.type == "histogram":
            bounds = getattr(wrapper, "_upper_bounds", [])
            finite = ", ".join(f"{b:g}" for b in bounds if b != float("inf"))
            doc += f" Buckets (le): {finite}, +Inf."
        rows.append((name, family.type, tuple(getattr(wrapper, "_labelnames", ())), doc))
    return rows


def _collector_rows(collector: Any) -> list[tuple[str, str, tuple[str, ...], str]]:
    rows = []
    for family in collector.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = sorted({label for sample in family.samples for label in sample.labels})
        rows.append((name, family.type, tuple(labels), family.documentation))
    return rows


def catalogue() -> tuple[list[tuple[str, str, tuple[str, ...], str]], list[tuple[str, str, tuple[str, ...], str]]]:
    """(nephrotrack metrics, process/runtime metrics), each sorted by name: (name, type, labels, help)."""
    _import_services()
    ours, runtime = [], []
    for collector in list(REGISTRY._collector_to_names):  # the registry's collectors (no public list)
        if isinstance(collector, MetricWrapperBase):
            ours.extend(_wrapper_rows(collector))
        else:
            runtime.extend(_collector_rows(collector))
    return sorted(ours), sorted(runtime)


def render() -> str:
    ours, runtime = catalogue()
    used = {label for rows in (ours,) for _, _, labels, _ in rows for label in labels}
    undocumented = used - LABELS.keys()
    if undocumented:
        raise ValueError(f"labels without a description of their values in LABELS: {sorted(undocumented)}")
    parts = [HEADER, "\n## nephrotrack metrics\n\n| name | type | labels | unit | meaning |\n|---|---|---|---|---|\n"]
    for name, kind, labels, doc in ours:
        label_text = ", ".join(f"`{label}`" for label in labels) or "–"
        parts.append(f"| `{name}` | {kind} | {label_text} | {_unit(name)} | {_cell(doc)} |\n")
    parts.append("\n## Label values\n\n| label | values |\n|---|---|\n")
    for label in sorted(used):
        parts.append(f"| `{label}` | {_cell(LABELS[label])} |\n")
    parts.append(
        "\n## Process and runtime\n\nprometheus_client's default collectors, in every service process "
        "(the `process_*` ones on Linux).\n\n| name | type | labels | unit | meaning |\n|---|---|---|---|---|\n"
    )
    for name, kind, labels, doc in runtime:
        label_text = ", ".join(f"`{label}`" for label in labels) or "–"
        parts.append(f"| `{name}` | {kind} | {label_text} | {_unit(name)} | {_cell(doc)} |\n")
    return "".join(parts)


def main() -> int:
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render())
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
