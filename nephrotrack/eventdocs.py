"""Generates docs/events.md from the event models themselves, so the catalogue cannot drift.

``python -m nephrotrack.eventdocs`` rewrites the file; a test fails when it is out of date.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, get_args

from contracts import cells, deviations, enrollment, labs, pulse
from services.labs import events as labs_private
from services.outcomes import locks as outcomes_private
from shared.events import DomainEvent

DOC = Path(__file__).resolve().parents[1] / "docs" / "events.md"

PUBLISHERS: dict[str, tuple[type[DomainEvent], ...]] = {
    "enrollment": enrollment.EVENTS,
    "pulse": (*pulse.EVENTS, *deviations.EVENTS),
    "cells": (*cells.EVENTS, *deviations.EVENTS),
    "labs": (*labs.EVENTS, *labs_private.EVENTS),
    "outcomes": outcomes_private.EVENTS,
}
"""The events each service records: the contract's (``contracts``) and its own private ones."""

HEADER = """# Events

Generated from the event models by `python -m nephrotrack.eventdocs`; do not edit by hand.
Each service also serves this as an AsyncAPI 3 document at `GET /asyncapi.json`.

Every event travels in an **envelope** (JSON): `event_id` (UUIDv7, also the `Nats-Msg-Id`
header), `event_type`, `schema_version`, `stream_id`, `stream_version`, `occurred_at`,
`recorded_at`, `correlation_id`, `causation_id`, `actor`, `payload` (the fields below).
A payload about a patient (one with a `subject_id`) is sealed with that patient's data key:
on the broker it reads `{"$sealed": "<base64>"}`, which the services open transparently; only
`PatientDataErased` and `LabResultRejected` travel in clear (docs/erasure.md).
`actor` is who did it: `<role>:<key fingerprint>` (first 8 hex digits of the API key's SHA-256,
never the key) for an HTTP command, else the channel or service that reacted (`labs:broker`,
`labs:mllp`, `enrollment`). `GET /v1/audit` (role operator) lists a service's events by actor.

Subjects: `<prefix>.<service>.<EventType>` (prefix `nephrotrack` unless
`NEPHROTRACK_SUBJECT_PREFIX` says otherwise), in the JetStream stream `<PREFIX>_<SERVICE>`.
Fixed by the contract: lab results in on `labs.results` (stream `LABS_RESULTS`), refusals out on
`labs.rejected` (stream `LABS_REJECTED`). Dead letters: `<prefix>.dlq.<consumer>`.

An event's meaning never changes: a new shape is a new `schema_version`, and an upcaster turns
stored older payloads into it when they are read.
"""


def _type_name(annotation: Any) -> str:
    text = str(annotation) if get_args(annotation) else getattr(annotation, "__name__", str(annotation))
    return text.replace("typing.", "").replace("datetime.", "").replace("contracts.enrollment.", "")


def _in_order(models: Iterable[type[DomainEvent]]) -> list[type[DomainEvent]]:
    return sorted(models, key=lambda model: model.event_type)


def render() -> str:
    parts = [HEADER]
    for service, models in PUBLISHERS.items():
        parts.append(f"\n## {service}\n")
        for model in _in_order(models):
            subject = "labs.rejected (also " if model.event_type == "LabResultRejected" else ""
            subject += f"`<prefix>.{service}.{model.event_type}`" + (")" if subject else "")
            if not model.published:
                subject = f"none: kept in the {service} store, not published"
            doc = " ".join((model.__doc__ or "").split())
            parts.append(f"\n### {model.event_type} (v{model.schema_version})\n\nSubject: {subject}\n")
            if doc:
                parts.append(f"\n{doc}\n")
            parts.append("\n| field | type | required |\n|---|---|---|\n")
            for name, field in model.model_fields.items():
                required = "yes" if field.is_required() else "no"
                parts.append(f"| `{name}` | `{_type_name(field.annotation)}` | {required} |\n")
    return "".join(parts)


def main() -> int:
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render())
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
