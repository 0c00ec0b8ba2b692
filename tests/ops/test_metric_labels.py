"""Metric label cardinality stays bounded, whatever the traffic.

A whole stack (five services as processes on PostgreSQL, over the machine's NATS) gets ordinary
traffic and the kind that tempts a label to carry an id: unknown subjects and lots (404),
duplicates (409), invalid bodies (422), refused lab results on every channel, paths no route
matches. Then every service's ``/metrics`` is scraped and every series checked:

- its label names are exactly the allow-listed ones for its metric (a new metric or label must
  be added here on purpose, after thinking about its cardinality — see docs/metrics.md);
- no label value looks like, or is, a subject id, lot id, result id or message id (UUIDs, long
  hex runs, ``LOT-…``, the ids this test used);
- closed-set labels take values from their closed sets;
- and the operations brief's metrics are all there, live: consumer lag from JetStream for every
  durable consumer, projection lag (back to 0 once the projection caught up), process metrics.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contracts.deviations import DeviationCode
from services.outcomes.projector import SOURCES
from shared.database import migrate
from shared.events import registry
from shared.settings import SERVICES
from tests.stack import Stack, eventually

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("nats_client"), pytest.mark.timeout(240)]

# metric family -> its label names (histogram buckets add `le`). Process/runtime collectors too.
ALLOWED_LABELS: dict[str, frozenset[str]] = {
    name: frozenset(labels)
    for name, labels in {
        "nephrotrack_events_appended": {"event_type"},
        "nephrotrack_events_published": {"subject_prefix"},
        "nephrotrack_publish_failures": set(),
        "nephrotrack_outbox_backlog": set(),
        "nephrotrack_outbox_oldest_unsent_age_seconds": set(),
        "nephrotrack_outbox_vacuum_duration_seconds": set(),
        "nephrotrack_messages_consumed": {"consumer"},
        "nephrotrack_messages_acked": {"consumer"},
        "nephrotrack_messages_duplicate": {"consumer"},
        "nephrotrack_messages_redelivered": {"consumer"},
        "nephrotrack_messages_dead_lettered": {"consumer"},
        "nephrotrack_handler_duration_seconds": {"consumer"},
        "nephrotrack_consumer_pending_messages": {"consumer"},
        "nephrotrack_consumer_ack_pending_messages": {"consumer"},
        "nephrotrack_consumer_outage_retries": {"consumer", "dependency"},
        "nephrotrack_dependency_up": {"dependency"},
        "nephrotrack_http_request_duration_seconds": {"route", "method", "status"},
        "nephrotrack_protocol_deviations": {"code"},
        "nephrotrack_serious_adverse_events": {"grade", "treatment_related"},
        "nephrotrack_lab_results_accepted": {"source"},
        "nephrotrack_lab_results_rejected": {"source", "reason"},
        "nephrotrack_lab_results_duplicate": {"source"},
        "nephrotrack_lab_results_parked": set(),
        "nephrotrack_erasure_purges_pending": set(),
        "nephrotrack_erasure_key_purges_pending": set(),
        "nephrotrack_erasure_purge_scanned_messages": set(),
        "nephrotrack_erasure_purge_deleted_messages": {"stream"},
        "nephrotrack_projection_lag_events": {"source"},
        "nephrotrack_projection_lag_seconds": set(),
        "nephrotrack_outcomes_remembered_results": set(),
        "nephrotrack_outcomes_patients_locked": {"origin"},
        "process_cpu_seconds": set(),
        "process_virtual_memory_bytes": set(),
        "process_resident_memory_bytes": set(),
        "process_start_time_seconds": set(),
        "process_open_fds": set(),
        "process_max_fds": set(),
        "python_gc_objects_collected": {"generation"},
        "python_gc_objects_uncollectable": {"generation"},
        "python_gc_collections": {"generation"},
        "python_info": {"implementation", "major", "minor", "patchlevel", "version"},
    }.items()
}

LAB_CHANNELS = {"broker", "mllp", "fhir"}
HTTP_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}
ID_PATTERNS = [
    re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"),  # UUIDs: message/event ids
    re.compile(r"[0-9a-fA-F]{16,}"),  # long hex runs: lot ids are LOT-<32 hex>
    re.compile(r"\bLOT-", re.IGNORECASE),
    re.compile(r"\b(IGA|CTRL|OPS)-"),  # subject-id shapes of the seed cohort and of this test
    re.compile(r"\d{6,}"),  # record-number-like digit runs
]
ROUTE = re.compile(r"^(unmatched|\(refused\)|/[A-Za-z0-9_./{}:-]*)$")  # (refused): before routing, by auth
WORD = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

_numbers = itertools.count(1)
_LETTERS = str.maketrans("0123456789", "ghijklmnop")


class Traffic:
    """Drives the stack through its public interfaces, remembering every id it used."""

    def __init__(self, stack: Stack, client: httpx.AsyncClient, prefix: str) -> None:
        self.stack, self.client, self.prefix = stack, client, prefix
        self.ids: set[str] = set()

    def new(self, kind: str) -> str:
        value = f"{kind}-{self.prefix.translate(_LETTERS)}-{next(_numbers):03d}"
        self.ids.add(value)
        return value

    async def call(self, method: str, service: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self.client.request(method, f"{self.stack.url(service)}{path}", **kwargs)

    async def enroll(self, subject_id: str, group: str) -> None:
        body = {"subject_id": subject_id, "sex": "F", "age_years": 58, "weight_kg": 50.0, "group": group,
                "enrolled_on": "2014-03-02", "baseline_egfr": 27.0, "lee_grade": "IV"}
        response = await self.call("POST", "enrollment", "/v1/patients", json=body)
        assert response.status_code == 201, response.text
        assert (await self.call("POST", "enrollment", "/v1/patients", json=body)).status_code == 409

    async def lab_known_to_labs(self, subject_id: str) -> bool:
        response = await self.call("GET", "labs", f"/v1/patients/{subject_id}/results")
        return response.status_code == 200 and response.json().get("enrolled") is True

    def lab_result(self, subject_id: str, **changes: Any) -> dict[str, Any]:
        body = {"message_id": self.new("MSG"), "subject_id": subject_id, "lab_id": "LAB1", "loinc": "2160-0",
                "value": 2.1, "unit": "mg/dL", "collected_at": "2015-06-01T08:30:00Z", "status": "final",
                "result_id": self.new("RES")}
        return {**body, **changes}

    def mllp(self, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.stack.mllp_port), timeout=30) as sock:
            sock.sendall(data)
            received = b""
            while b"\x1c\r" not in received:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
            return received


async def drive(traffic: Traffic) -> None:
    call = traffic.call
    a, b, control = traffic.new("OPS"), traffic.new("OPS"), traffic.new("OPS")
    for subject, group in ((a, "A"), (b, "B"), (control, "control")):
        await traffic.enroll(subject, group)
    unknown = traffic.new("OPS")
    # enrollment: 404 (unknown subject), 422 (invalid), a clinical event
    assert (await call("POST", "enrollment", f"/v1/patients/{unknown}/events",
                       json={"type": "death", "on": "2016-01-01"})).status_code == 404
    assert (await call("POST", "enrollment", "/v1/patients", json={"subject_id": unknown})).status_code == 422
    assert (await call("GET", "enrollment", f"/v1/patients/{unknown}")).status_code == 404
    assert (await call("POST", "enrollment", f"/v1/patients/{control}/events",
                       json={"type": "dialysis_started", "on": "2016-05-01"})).status_code == 201
    # a serious adverse event under an id of the site's (never a label), then its follow-up
    serious = {"term": "pneumonia", "onset_on": "2014-04-01", "grade": 3, "serious": True, "related_to": ["mp_pulse"],
               "causality": "possible", "outcome": "recovering", "resolved_on": None}
    ae_path = f"/v1/patients/{a}/adverse-events/{traffic.new('AE')}"
    assert (await call("PUT", "enrollment", ae_path, json=serious)).status_code == 201
    assert (await call("PUT", "enrollment", ae_path, json={**serious, "outcome": "recovered"})).status_code == 200
    # pulse: three days, one of them a deviation (1250 mg); unknown subject
    for day, dose in ((1, 1000), (2, 1250), (3, 1000)):
        response = await call("POST", "pulse", f"/v1/patients/{a}/pulse-doses", json={
            "cycle": 1, "day": day, "given_on": f"2014-03-{9 + day:02d}", "dose_mg": dose, "weight_kg": 50.0})
        assert response.status_code == 201, response.text
    await call("POST", "pulse", f"/v1/patients/{unknown}/pulse-doses", json={
        "cycle": 1, "day": 1, "given_on": "2014-03-10", "dose_mg": 1000, "weight_kg": 50.0})
    # cells: harvest -> release -> infuse; an unknown lot; an unreleased lot
    harvest = await call("POST", "cells", f"/v1/patients/{b}/harvests", json={"harvested_on": "2015-01-05", "fat_grams": 120})
    assert harvest.status_code == 201, harvest.text
    lot = harvest.json()["lot_id"]
    traffic.ids.add(lot)
    unreleased = (await call("POST", "cells", f"/v1/patients/{b}/harvests",
                             json={"harvested_on": "2015-02-05", "fat_grams": 110})).json()["lot_id"]
    traffic.ids.add(unreleased)
    assert (await call("POST", "cells", f"/v1/lots/{lot}/release",
                       json={"cell_count": 3.1e7, "viability_pct": 92})).status_code in (200, 201)
    assert (await call("POST", "cells", f"/v1/patients/{b}/infusions",
                       json={"lot_id": lot, "given_on": "2015-02-01", "cell_count": 3.0e7})).status_code == 201
    assert (await call("POST", "cells", f"/v1/patients/{b}/infusions",
                       json={"lot_id": unreleased, "given_on": "2015-03-01", "cell_count": 3.0e7})).status_code == 422
    missing_lot = "LOT-" + "0123456789ABCDEF" * 2
    traffic.ids.add(missing_lot)
    assert (await call("POST", "cells", f"/v1/lots/{missing_lot}/release",
                       json={"cell_count": 3.1e7, "viability_pct": 92})).status_code == 404
    assert (await call("GET", "cells", f"/v1/lots/{missing_lot}")).status_code == 404
    # labs: accepted, duplicate, refused (unknown LOINC, unit mismatch, invalid), parked; FHIR; MLLP
    await eventually(lambda: traffic.lab_known_to_labs(a), timeout=30)
    good = traffic.lab_result(a)
    assert (await call("POST", "labs", "/v1/results", json=good)).status_code == 201
    assert (await call("POST", "labs", "/v1/results", json=good)).status_code == 200
    for bad in (traffic.lab_result(a, loinc="9999-9"), traffic.lab_result(a, unit="furlongs"),
                traffic.lab_result(a, status="final?")):
        assert (await call("POST", "labs", "/v1/results", json=bad)).status_code == 422
    await call("POST", "labs", "/v1/results", json=traffic.lab_result(unknown))  # parked or refused
    observation = {
        "resourceType": "Observation", "identifier": [{"value": traffic.new("OBS")}], "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]},
        "subject": {"reference": f"Patient/{a}"}, "effectiveDateTime": "2015-07-01T09:30:10+01:00",
        "valueQuantity": {"value": 2.2, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
    }
    fhir = {"content-type": "application/fhir+json"}
    assert (await call("POST", "labs", "/fhir/Observation", json=observation, headers=fhir)).status_code == 201
    wrong_unit = {**observation, "identifier": [{"value": traffic.new("OBS")}],
                  "valueQuantity": {"value": 2.2, "unit": "parsec", "system": "http://unitsofmeasure.org", "code": "pc"}}
    assert (await call("POST", "labs", "/fhir/Observation", json=wrong_unit, headers=fhir)).status_code == 422
    assert (await call("POST", "labs", "/fhir/Observation", content=b"{not json", headers=fhir)).status_code == 400
    control_id = traffic.new("MSH")
    ack = await asyncio.to_thread(traffic.mllp, b"\x0bMSH|^~\\&|LIS|LAB|||20150601||ORU^R01|" + control_id.encode()
                                  + b"|P|2.5.1\rPID|1||" + a.encode() + b"\rOBX|1|NM|9999-9^Nonsense^LN||1|x|||||F\r\x1c\r")
    assert b"MSA|A" in ack
    # outcomes: known and unknown patients, an unknown group, a path no route matches
    await eventually(lambda: _outcome_known(traffic, a), timeout=40)
    assert (await call("GET", "outcomes", f"/v1/patients/{unknown}")).status_code == 404
    assert (await call("GET", "outcomes", "/v1/cohorts/Z/survival")).status_code == 404
    assert (await call("GET", "outcomes", "/v1/cohorts")).status_code == 200
    for service in SERVICES:
        # no route: 404, or 403 where authorisation refuses unknown paths before routing
        assert (await call("GET", service, f"/no/such/{unknown}/{lot}")).status_code in (403, 404)


async def _outcome_known(traffic: Traffic, subject_id: str) -> bool:
    response = await traffic.call("GET", "outcomes", f"/v1/patients/{subject_id}")
    return response.status_code == 200 and response.json()["pulse_cycles"] == 1


async def start(stack: Stack) -> None:
    """``stack.start()`` with more patience: five services importing at once on a busy
    two-core machine can take longer than its 40 s."""
    for service, url in stack.database_urls.items():
        await asyncio.to_thread(migrate, service, url)
    for service in stack.services:
        stack.start_service(service)
    await stack.wait_ready(stack.services, timeout=120)


def parse(text: str) -> list[tuple[str, str, dict[str, str]]]:
    """(family, sample name, labels) of every sample."""
    return [(family.name, sample.name, sample.labels)
            for family in text_string_to_metric_families(text) for sample in family.samples]


async def scrape(traffic: Traffic) -> dict[str, list[tuple[str, str, dict[str, str]]]]:
    scraped = {}
    for service in SERVICES:
        response = await traffic.call("GET", service, "/metrics")
        assert response.status_code == 200, f"{service} /metrics: {response.status_code}"
        scraped[service] = parse(response.text)
    return scraped


def check_labels(service: str, samples: list[tuple[str, str, dict[str, str]]], prefix: str, used: set[str]) -> None:
    consumers = {f"{prefix}-{s}-{source}".replace(".", "-") for s in SERVICES for source in (*SERVICES, "results")}
    for family, name, labels in samples:
        if family.endswith("_created") and family.removesuffix("_created") in ALLOWED_LABELS:
            family = family.removesuffix("_created")  # a counter's creation time, its own family in text format
        assert family in ALLOWED_LABELS, f"{service}: {family} is not in the allow-list (its labels: {sorted(labels)})"
        names = set(labels) - ({"le"} if name.endswith("_bucket") else set())
        assert names == ALLOWED_LABELS[family], f"{service}: {name} has labels {sorted(labels)}"
        for label, value in labels.items():
            where = f"{service}: {name}{{{label}={value!r}}}"
            assert value not in used and not any(i in value for i in used if len(i) > 4), f"{where} carries an id"
            if family.startswith("nephrotrack_"):
                bare = value.replace(prefix, "<prefix>")  # the test's random subject prefix is no id
                leaks = [p.pattern for p in ID_PATTERNS if p.search(bare)]
                assert not leaks, f"{where} looks like an id ({leaks})"
            match label:
                case "status":
                    assert value in {"1xx", "2xx", "3xx", "4xx", "5xx"}, where
                case "method":
                    assert value in HTTP_METHODS, where
                case "route":
                    assert ROUTE.match(value), where
                case "consumer":
                    assert value in consumers, where
                case "grade":  # CTCAE v5
                    assert value in {"1", "2", "3", "4", "5"}, where
                case "treatment_related":
                    assert value in {"true", "false"}, where
                case "code":
                    assert value in {c.value for c in DeviationCode}, where
                case "event_type":
                    assert registry.knows(value), where
                case "source" if family == "nephrotrack_projection_lag_events":
                    assert value in SOURCES, where
                case "source":
                    assert value in LAB_CHANNELS, where
                case "reason":
                    assert WORD.match(value), where
                case "origin":  # where a live batch's patient came from (services/outcomes/remembered.py)
                    assert value in {"remembered", "read"}, where
                case "dependency":  # what consumers wait for in an outage (shared/outages.py)
                    assert value in {"store", "broker", "key_vault"}, where
                case "stream":  # where the erasure purge deleted messages
                    assert value in {"labs_results", "labs_rejected", "labs_events"}, where
                case "subject_prefix":  # the subject without its last token
                    assert value in {f"{prefix}.{s}" for s in SERVICES} | {"labs"}, where


def values(samples: list[tuple[str, str, dict[str, str]]], text: str) -> list[dict[str, str]]:
    return [labels for _, name, labels in samples if name == text]


async def test_every_metric_label_is_bounded_and_every_operational_metric_is_live(tmp_path: Path, prefix: str) -> None:
    stack = Stack(tmp_path, prefix, SERVICES, backend="postgresql")
    try:
        await start(stack)
        async with stack.client(timeout=30) as client:
            traffic = Traffic(stack, client, prefix)
            await drive(traffic)

            async def caught_up() -> dict[str, Any] | None:
                scraped = await scrape(traffic)
                outcomes = scraped["outcomes"]
                lags = {labels["source"] for labels in values(outcomes, "nephrotrack_projection_lag_events")}
                text = (await traffic.call("GET", "outcomes", "/metrics")).text
                zero = all(
                    line.endswith(" 0.0")
                    for line in text.splitlines()
                    if line.startswith(("nephrotrack_projection_lag_events{", "nephrotrack_projection_lag_seconds "))
                )
                pending = values(outcomes, "nephrotrack_consumer_pending_messages")
                return scraped if lags == set(SOURCES) and zero and len(pending) == len(SOURCES) else None

            scraped = await eventually(caught_up, timeout=60, interval=1)

        used = traffic.ids
        for service, samples in scraped.items():
            check_labels(service, samples, prefix, used)
            assert len(samples) < 2000, f"{service} exposes {len(samples)} series"
            names = {name for _, name, _ in samples}
            assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= names, f"{service}: no process metrics"
            assert "nephrotrack_http_request_duration_seconds_bucket" in names, service

        # every durable consumer's lag is read from JetStream
        for service, sources in {"outcomes": SOURCES, "labs": ("results",)}.items():
            pending = {labels["consumer"] for labels in values(scraped[service], "nephrotrack_consumer_pending_messages")}
            assert {f"{prefix}-{service}-{source}" for source in sources} <= pending, (service, pending)
        # 404s are recorded under their route template, never their path
        routes = {(labels["route"], labels["status"])
                  for labels in values(scraped["outcomes"], "nephrotrack_http_request_duration_seconds_count")}
        assert ("/v1/patients/{subject_id}", "4xx") in routes, routes
        assert {("unmatched", "4xx"), ("(refused)", "4xx")} & routes, routes
        labs = scraped["labs"]
        reasons = {(labels["source"], labels["reason"]) for labels in values(labs, "nephrotrack_lab_results_rejected_total")}
        assert {source for source, _ in reasons} >= {"fhir", "mllp"} and len(reasons) >= 3, reasons
        assert values(labs, "nephrotrack_lab_results_accepted_total"), "no accepted lab results counted"
        codes = {labels["code"] for labels in values(scraped["pulse"], "nephrotrack_protocol_deviations_total")}
        assert DeviationCode.DOSE_ABOVE_DAILY_MAX.value in codes, codes
        serious = values(scraped["enrollment"], "nephrotrack_serious_adverse_events_total")
        assert len(serious) == 10 and {"grade": "3", "treatment_related": "true"} in serious, serious
        appended = {labels["event_type"] for labels in values(scraped["enrollment"], "nephrotrack_events_appended_total")}
        assert {"PatientEnrolled", "DialysisStarted"} <= appended, appended
    finally:
        await stack.stop()
