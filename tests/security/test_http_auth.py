"""HTTP authentication and roles (README, "Security"): every service's real app, in process, with
one key per role — each role refused where it does not belong (401 without a key or with an
unknown one, 403 with a key that lacks the role) and let through where it does; ``/healthz`` open;
events record ``<role>:<key fingerprint>``, never the key; ``GET /v1/audit`` lists who did what.

The apps run without their lifespan (no broker): "let through" means the answer is neither 401 nor
403 — what the route itself then says (200, 404, 503 …) is the other tests' business.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from sqlalchemy import select

from shared.auth import (
    ANY_ROLE,
    DENIED,
    MALFORMED,
    OPEN,
    AuthConfigError,
    KeyRing,
    fingerprint,
    parse_api_keys,
    required_roles,
)
from shared.database import migrate
from shared.schema import events
from shared.service import Service
from shared.settings import SERVICES
from tests.conftest import NATS_URL, drop_database, free_port, new_database_url
from tests.stack import ROOT

KEYS = {
    "staff": "staff-key-5f1d2c7a9b3e",
    "analyst": "analyst-key-8c4e1a6f2d0b",
    "operator": "operator-key-3a9d7e2c5f18",
    "lab": "lab-key-6b2f8d1e4c7a",
}
SPEC = ",".join(f"{role}:{key}" for role, key in KEYS.items())
UNKNOWN_KEY = "not-a-configured-key-0000"


def bearer(role_or_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS.get(role_or_key, role_or_key)}"}


ENROLL = {
    "subject_id": "IGA-A-001", "sex": "F", "age_years": 58, "weight_kg": 61.5, "group": "A",
    "enrolled_on": "2014-03-02", "baseline_egfr": 27.0, "lee_grade": "IV",
}


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    roles: frozenset[str]  # the roles that may make it
    body: Any = None


def call(method: str, path: str, *roles: str, body: Any = None) -> Call:
    return Call(method, path, frozenset(roles), body)


OPERATIONS = [call("GET", "/readyz", "operator"), call("GET", "/metrics", "operator"),
              call("GET", "/asyncapi.json", "operator"), call("GET", "/v1/audit", "operator"),
              call("GET", "/openapi.json", *ANY_ROLE), call("GET", "/docs", *ANY_ROLE)]

ROUTES: dict[str, list[Call]] = {
    "enrollment": [
        call("POST", "/v1/patients", "staff", body=ENROLL),
        call("POST", "/v1/patients/IGA-A-001/events", "staff", body={"type": "withdrawn", "on": "2016-05-01"}),
        call("GET", "/v1/patients/IGA-A-001", "staff", "analyst"),
    ],
    "pulse": [
        call("POST", "/v1/patients/IGA-A-001/pulse-doses", "staff",
             body={"cycle": 1, "day": 1, "given_on": "2014-03-10", "dose_mg": 1000, "weight_kg": 61.5}),
        call("GET", "/v1/patients/IGA-A-001/pulse-cycles", "staff", "analyst"),
    ],
    "cells": [
        call("POST", "/v1/patients/IGA-A-001/harvests", "staff", body={"harvested_on": "2014-06-01", "fat_grams": 120}),
        call("POST", "/v1/lots/LOT-1/release", "staff", body={"cell_count": 3.1e7, "viability_pct": 92}),
        call("GET", "/v1/lots/LOT-1", "staff", "analyst"),
        call("GET", "/v1/patients/IGA-A-001/infusions", "staff", "analyst"),
    ],
    "labs": [
        call("POST", "/fhir/Observation", "staff", "lab", body={"resourceType": "Patient"}),
        call("POST", "/fhir", "staff", "lab", body={"resourceType": "Patient"}),
        call("POST", "/v1/results", "staff", "lab", body={"message_id": "m"}),
        call("GET", "/v1/rejections", "staff", "analyst"),
        call("GET", "/v1/patients/IGA-A-001/results", "staff", "analyst"),
    ],
    "outcomes": [
        call("GET", "/v1/cohorts", "analyst"),
        call("GET", "/v1/patients/IGA-A-001", "analyst"),
        call("GET", "/v1/export/patients.csv", "analyst"),
        call("GET", "/v1/export/sdtm/dm.xpt", "analyst"),
        call("GET", "/v1/export/adam/adtte.json", "analyst"),
        call("GET", "/v1/freshness", "analyst"),
        *(call("GET", f"/v1/cohorts/A/{route}", "analyst") for route in ("biopsies", "safety", "endpoints", "slopes")),
        call("GET", "/v1/admin/rebuild", "operator"),
        call("POST", "/v1/admin/rebuild", "operator"),
    ],
}


# --- the apps -----------------------------------------------------------------------------------------

_key_buckets: list[tuple[Any, Service]] = []


async def _app(name: str, tmp_path: Path, backend: str = "sqlite") -> tuple[Any, Service, str]:
    url = new_database_url(backend, tmp_path, name)
    await asyncio.to_thread(migrate, name, url)
    service = Service(name, database=url)
    app = importlib.import_module(f"services.{name}.app").create_app(service)
    # No lifespan (no broker) here, but enrollment needs the patients' key bucket to enrol.
    client = await nats.connect(NATS_URL)
    _key_buckets.append((client, service))
    await service.vault.connect(client.jetstream())
    return app, service, url


@pytest.fixture(autouse=True)
async def _forget_key_buckets() -> AsyncIterator[None]:
    yield
    while _key_buckets:
        client, service = _key_buckets.pop()
        with contextlib.suppress(Exception):
            await client.jetstream().delete_stream(service.vault.stream)
        await client.close()


def _client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://service", timeout=30)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[str | None], None]:
    monkeypatch.setenv("NEPHROTRACK_VAR", str(tmp_path / "var"))
    monkeypatch.setenv("NEPHROTRACK_MLLP_PORT", str(free_port()))
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:1")  # never connected: no lifespan here
    monkeypatch.setenv("NEPHROTRACK_SUBJECT_PREFIX", f"t{uuid.uuid4().hex[:10]}")  # its own key bucket
    monkeypatch.setenv("NEPHROTRACK_UNKNOWN_PATIENT_WAIT_SECONDS", "0")  # unknown patients: 404 at once

    def set_keys(spec: str | None) -> None:
        if spec is None:
            monkeypatch.delenv("NEPHROTRACK_API_KEYS", raising=False)
        else:
            monkeypatch.setenv("NEPHROTRACK_API_KEYS", spec)

    set_keys(SPEC)
    return set_keys


async def _send(client: httpx.AsyncClient, c: Call, headers: dict[str, str]) -> httpx.Response:
    if c.body is None:
        return await client.request(c.method, c.path, headers=headers)
    return await client.request(c.method, c.path, json=c.body, headers=headers)


# --- every service, every role --------------------------------------------------------------------

@pytest.mark.parametrize("name", SERVICES)
async def test_each_role_is_refused_where_it_does_not_belong_and_let_through_where_it_does(
    env: Callable[[str | None], None], tmp_path: Path, name: str
) -> None:
    app, service, _ = await _app(name, tmp_path)
    async with _client(app) as client:
        health = await client.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok", "/healthz is open"

        for c in [*OPERATIONS, *ROUTES[name]]:
            what = f"{name}: {c.method} {c.path}"
            missing = await _send(client, c, {})
            assert missing.status_code == 401, f"{what} without a key: {missing.status_code}"
            assert missing.json() == {"detail": MALFORMED}
            assert missing.headers["www-authenticate"].startswith("Bearer")
            for header in (bearer(UNKNOWN_KEY), {"Authorization": KEYS["staff"]}, {"Authorization": "Basic eDp5"}):
                wrong = await _send(client, c, header)
                assert wrong.status_code == 401, f"{what} with {header}: {wrong.status_code}"
                assert wrong.json() == {"detail": MALFORMED}
            for role in KEYS:
                answer = await _send(client, c, bearer(role))
                if role in c.roles:
                    assert answer.status_code not in (401, 403), f"{what} as {role}: {answer.status_code} {answer.text}"
                else:
                    assert answer.status_code == 403, f"{what} as {role}: {answer.status_code}"
                    detail = answer.json()["detail"]
                    assert detail.startswith("role ") and " required for " in detail, detail
                    assert KEYS[role] not in detail

        # Not in the policy: refused for everyone (unknown paths are not probed past the keys).
        for method, path in (("GET", "/nope"), ("GET", "/v2/patients"), ("DELETE", "/metrics"), ("PUT", "/healthz/x")):
            assert (await client.request(method, path)).status_code == 401
            for role in KEYS:
                refused = await client.request(method, path, headers=bearer(role))
                assert refused.status_code == 403, f"{name}: {method} {path} as {role}"
    await service.store.engine.dispose()


async def test_one_key_may_hold_several_roles(env: Callable[[str | None], None], tmp_path: Path) -> None:
    env(f"staff:{KEYS['staff']},analyst:{KEYS['staff']},operator:{KEYS['operator']}")
    app, service, _ = await _app("enrollment", tmp_path)
    try:
        async with _client(app) as client:
            created = await client.post("/v1/patients", json=ENROLL, headers=bearer("staff"))
            assert created.status_code == 201, created.text
            assert (await client.get("/v1/patients/IGA-A-001", headers=bearer("staff"))).status_code == 200
            assert (await client.get("/readyz", headers=bearer("staff"))).status_code == 403
            trail = (await client.get("/v1/audit", headers=bearer("operator"))).json()
            assert trail[0]["actor"] == f"staff:{fingerprint(KEYS['staff'])}"
    finally:
        await service.store.engine.dispose()


async def test_without_api_keys_a_service_fails_closed(env: Callable[[str | None], None], tmp_path: Path) -> None:
    env(None)
    app, service, _ = await _app("enrollment", tmp_path)
    try:
        async with _client(app) as client:
            assert (await client.get("/healthz")).status_code == 200
            for method, path in (("GET", "/readyz"), ("GET", "/metrics"), ("POST", "/v1/patients"),
                                 ("GET", "/v1/patients/IGA-A-001"), ("GET", "/openapi.json")):
                refused = await client.request(method, path, headers=bearer("staff"))
                assert refused.status_code == 401, (method, path)
                assert "NEPHROTRACK_API_KEYS is unset" in refused.json()["detail"]
    finally:
        await service.store.engine.dispose()


# --- who did what -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_events_record_the_principal_and_the_audit_lists_who_did_what(
    env: Callable[[str | None], None], tmp_path: Path, backend: str
) -> None:
    app, service, url = await _app("enrollment", tmp_path, backend)
    staff = f"staff:{fingerprint(KEYS['staff'])}"
    try:
        async with _client(app) as client:
            before = datetime.now(UTC) - timedelta(seconds=1)
            for n in range(1, 4):
                body = {**ENROLL, "subject_id": f"IGA-A-00{n}"}
                assert (await client.post("/v1/patients", json=body, headers=bearer("staff"))).status_code == 201
            withdrawn = await client.post("/v1/patients/IGA-A-002/events", json={"type": "withdrawn", "on": "2016-05-01"},
                                          headers={**bearer("staff"), "X-Correlation-Id": "0193b7a2-0000-7000-8000-000000000001"})
            assert withdrawn.status_code == 201, withdrawn.text

            trail = await client.get("/v1/audit", headers=bearer("operator"))
            assert trail.status_code == 200
            entries = trail.json()
            assert [e["event_type"] for e in entries] == ["PatientWithdrawn", *["PatientEnrolled"] * 3]  # newest first
            assert [e["stream_id"] for e in entries[1:]] == ["patient-IGA-A-003", "patient-IGA-A-002", "patient-IGA-A-001"]
            assert {e["actor"] for e in entries} == {staff}
            assert entries[0]["correlation_id"] == "0193b7a2-0000-7000-8000-000000000001"
            for entry in entries:
                assert datetime.fromisoformat(entry["recorded_at"]) >= before
                assert set(entry) >= {"event_id", "event_type", "stream_id", "actor", "occurred_at", "recorded_at",
                                      "correlation_id"}
                assert "payload" not in entry

            async def audit(**params: Any) -> list[dict[str, Any]]:
                response = await client.get("/v1/audit", params=params, headers=bearer("operator"))
                assert response.status_code == 200, response.text
                return response.json()

            assert len(await audit(limit=2)) == 2
            assert await audit(actor="analyst:00000000") == []
            assert len(await audit(actor=staff)) == 4
            assert len(await audit(event_type="PatientWithdrawn")) == 1
            assert len(await audit(since=before.isoformat())) == 4
            assert await audit(since=(datetime.now(UTC) + timedelta(minutes=5)).isoformat()) == []
            page = await audit(limit=2)
            rest = await audit(before=page[-1]["position"])
            assert [e["event_id"] for e in page + rest] == [e["event_id"] for e in entries]
            for bad in ({"limit": 1001}, {"limit": 0}, {"before": str(2**63)}, {"actor": "a\x00b"},
                        {"since": "0001-01-01T00:00:00+05:00"}, {"since": "yesterday"}):
                refused = await client.get("/v1/audit", params=bad, headers=bearer("operator"))
                assert refused.status_code == 422, (bad, refused.status_code, refused.text)

        # The key itself is stored nowhere: not in the actor, not in a payload.
        async with service.store.engine.connect() as connection:
            rows = (await connection.execute(select(events.c.actor, events.c.payload))).all()
        assert rows and {row.actor for row in rows} == {staff}
        for row in rows:
            for key in KEYS.values():
                assert key not in row.actor and key.encode() not in row.payload
    finally:
        await service.store.engine.dispose()
        await drop_database(url)


async def test_lab_submissions_record_the_lab_key_not_the_channel(env: Callable[[str | None], None], tmp_path: Path) -> None:
    """Whatever actor the code names (labs labels its inputs ``labs:fhir``/``labs:http``), an event
    recorded while serving an authenticated request names the caller."""
    app, service, _ = await _app("labs", tmp_path)
    try:
        async with _client(app) as client:
            refused = await client.post("/fhir/Observation", json={"resourceType": "Patient"}, headers=bearer("lab"))
            assert refused.status_code == 400, refused.text  # not an Observation: refused, and recorded
            refused = await client.post("/v1/results", json={"message_id": "m-1"}, headers=bearer("staff"))
            assert refused.status_code == 422, refused.text
            trail = (await client.get("/v1/audit", headers=bearer("operator"))).json()
        actors = [entry["actor"] for entry in trail if entry["event_type"] == "LabResultRejected"]
        assert actors == [f"staff:{fingerprint(KEYS['staff'])}", f"lab:{fingerprint(KEYS['lab'])}"]
    finally:
        await service.store.engine.dispose()


# --- configuration ----------------------------------------------------------------------------------

def test_keys_are_parsed_with_several_roles_per_key() -> None:
    keys = parse_api_keys(" staff:k1, analyst:k2 ,operator:k2,, lab:k3:with:colons ")
    assert keys == {"k1": {"staff"}, "k2": {"analyst", "operator"}, "k3:with:colons": {"lab"}}
    assert parse_api_keys("") == {}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("staff:good-key-1,operatr:s3cret-value", "entry 2: unknown role 'operatr'"),
        ("staff:good-key-1,s3cret-value", "entry 2 is not role:key"),
        ("analyst:", "entry 1 (analyst): the key is empty"),
        ("staff:s3cret value", "entry 1 (staff): the key contains whitespace"),
    ],
)
def test_a_bad_key_specification_names_the_entry_never_the_key(spec: str, message: str) -> None:
    with pytest.raises(AuthConfigError, match=re.escape(message)) as caught:
        parse_api_keys(spec)
    assert "s3cret" not in str(caught.value) and "good-key" not in str(caught.value)


def test_a_service_with_a_bad_key_specification_does_not_start(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "NEPHROTRACK_VAR": str(tmp_path),
        "NEPHROTRACK_API_KEYS": "staff:good-key-1,operatr:s3cret-value", "NEPHROTRACK_ENROLLMENT_PORT": str(free_port()),
    }
    result = subprocess.run([sys.executable, "-m", "services.enrollment"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "NEPHROTRACK_API_KEYS entry 2: unknown role 'operatr'" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout


def test_keys_are_compared_by_digest_and_fingerprinted() -> None:
    ring = KeyRing(parse_api_keys(SPEC))
    assert ring.identify(KEYS["analyst"]).roles == {"analyst"}  # type: ignore[union-attr]
    assert ring.identify(KEYS["analyst"] + "x") is None and ring.identify("") is None
    assert fingerprint(KEYS["staff"]) == hashlib.sha256(KEYS["staff"].encode()).hexdigest()[:8]
    assert ring.identify(KEYS["staff"]).principal("staff") == f"staff:{fingerprint(KEYS['staff'])}"  # type: ignore[union-attr]
    assert KEYS["staff"] not in repr(ring.roles())


def test_the_policy_table() -> None:
    assert required_roles("labs", "GET", "/healthz") is OPEN
    assert required_roles("labs", "POST", "/v1/admin/rebuild") == {"operator"}
    assert required_roles("outcomes", "GET", "/v1/cohorts") == {"analyst"}
    assert required_roles("outcomes", "POST", "/v1/locks") == {"analyst"}  # freezing an analysis
    assert required_roles("outcomes", "POST", "/v1/locks/x") == {"staff"}  # only the exact route
    assert required_roles("enrollment", "GET", "/v1/patients/X") == {"staff", "analyst"}
    assert required_roles("enrollment", "POST", "/v1/patients") == {"staff"}
    assert required_roles("labs", "POST", "/fhir/Observation") == {"staff", "lab"}
    assert required_roles("enrollment", "POST", "/v1/results") == {"staff"}  # lab's only on labs
    assert required_roles("outcomes", "GET", "/v1audit") == DENIED
    assert required_roles("outcomes", "OPTIONS", "/v1/cohorts") == DENIED
    assert required_roles("outcomes", "GET", "/") == DENIED
