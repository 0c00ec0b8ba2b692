"""An erasure always completes (docs/erasure.md): when the patient's key cannot be deleted, the
erasure still stands — answered, not a 500, with its key purge pending — no service opens the
patient's data again, not even after a restart with the key still in the bucket, and
enrollment's key purge job removes the key once the bucket takes deletions again.

Enrollment and labs run in the test's event loop (tests/inprocess.py) so that enrollment's key
vault can be made to fail as it does when the broker is unreachable."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.errors
import nats.js.errors
import pytest

from shared.broker import Topology
from shared.keys import KeyVault, bucket_name, key_name
from shared.service import Service
from tests.inprocess import databases, pseudonym, running
from tests.stack import eventually

pytestmark = pytest.mark.timeout(180)


class KeyBucketOutage:
    """Enrollment's ``KeyVault.erase`` failing as it does when the broker cannot be reached,
    while ``active``."""

    def __init__(self) -> None:
        self.active = True

    def install(self, service: Service) -> None:
        erase = service.vault.erase

        async def failing_erase(subject_id: str) -> None:
            if self.active:
                raise nats.errors.TimeoutError
            await erase(subject_id)

        service.vault.erase = failing_erase  # type: ignore[method-assign]


def enrollment_body(subject_id: str) -> dict[str, Any]:
    return {"subject_id": subject_id, "sex": "F", "age_years": 58, "weight_kg": 61.5, "group": "A",
            "enrolled_on": "2014-03-02", "baseline_egfr": 27.0, "lee_grade": "IV"}


def lab_result(subject_id: str) -> dict[str, Any]:
    return {"message_id": f"m-{subject_id}", "subject_id": subject_id, "lab_id": "lab-1", "loinc": "2160-0",
            "value": 1.2345, "unit": "mg/dL", "collected_at": "2016-06-01T08:30:00Z", "status": "final",
            "result_id": f"r-{subject_id}"}


async def key_in_bucket(bucket: KeyVault, subject_id: str) -> bool:
    """The key's value is still in the bucket (not deleted, not purged)."""
    try:
        entry = await bucket.kv._get(key_name(subject_id))
    except (nats.js.errors.KeyDeletedError, nats.js.errors.KeyNotFoundError):
        return False
    return bool(entry.value)


async def purge_marker_in_bucket(bucket: KeyVault, subject_id: str) -> bool:
    js = bucket._js
    assert js is not None
    try:
        marker = await js.get_msg(bucket.stream, subject=f"$KV.{bucket.bucket}.{key_name(subject_id)}")
    except nats.js.errors.NotFoundError:
        return False
    return not marker.data and (marker.headers or {}).get("KV-Operation") == "PURGE"


async def pending_key_purges(enrollment: httpx.AsyncClient) -> float:
    text = (await enrollment.get("/metrics")).text
    found = re.search(r"^nephrotrack_erasure_key_purges_pending (\S+)$", text, re.MULTILINE)
    assert found, "the gauge is not exported"
    return float(found.group(1))


@pytest.fixture
async def urls(backend: str, tmp_path: Path, prefix: str, nats_client: nats.NATS,
               monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("NEPHROTRACK_ENROLLMENT_KEY_PURGE_INTERVAL_SECONDS", "0.2")
    async with databases(("enrollment", "labs"), backend=backend, tmp_path=tmp_path, prefix=prefix,
                         monkeypatch=monkeypatch) as found:
        yield found


async def test_a_failed_key_deletion_is_answered_pending_kept_erased_across_restarts_and_finished_by_the_job(
    urls: dict[str, str], prefix: str, nats_client: nats.NATS,
) -> None:
    outage = KeyBucketOutage()
    subject = pseudonym(prefix, 1)
    result_path = f"/v1/results/r-{subject}"
    bucket = KeyVault(bucket_name(Topology(prefix)))  # the bucket as seen from outside the services
    async with running("enrollment", urls["enrollment"], outage.install) as (_, enrollment), \
            running("labs", urls["labs"]) as (_, labs):
        await bucket.connect(nats_client.jetstream())
        assert (await enrollment.post("/v1/patients", json=enrollment_body(subject))).status_code == 201
        await eventually(lambda: _json(labs.get(f"/v1/patients/{subject}/results"), "enrolled"))
        assert (await labs.post("/v1/results", json=lab_result(subject))).status_code == 201
        withdrawn = await enrollment.post(f"/v1/patients/{subject}/events", json={"type": "withdrawn", "on": "2020-01-01"})
        assert withdrawn.status_code == 201, withdrawn.text

        erased = await enrollment.post(f"/v1/patients/{subject}/erasure")
        assert erased.status_code == 201, erased.text  # the erasure is recorded: never a 500
        assert erased.json()["key_purge"] == "pending" and erased.json()["subject_id"] == subject
        assert await key_in_bucket(bucket, subject)
        assert (await enrollment.get(f"/v1/patients/{subject}")).status_code == 404
        await eventually(lambda: _status(labs.get(result_path), 404))
        await eventually(lambda: _equal(pending_key_purges(enrollment), 1))

    # Both restart while the key is still in the bucket: neither opens the patient's data.
    async with running("enrollment", urls["enrollment"], outage.install) as (_, enrollment), \
            running("labs", urls["labs"]) as (_, labs):
        assert await key_in_bucket(bucket, subject)
        assert (await labs.get(result_path)).status_code == 404
        assert (await enrollment.get(f"/v1/patients/{subject}")).status_code == 404
        again = await enrollment.post(f"/v1/patients/{subject}/erasure")
        assert again.status_code == 200 and again.json()["event_id"] == erased.json()["event_id"]
        assert again.json()["key_purge"] == "pending"

        outage.active = False  # the bucket takes deletions again: the job purges the key
        await eventually(lambda: purge_marker_in_bucket(bucket, subject))
        assert not await key_in_bucket(bucket, subject)
        await eventually(lambda: _equal(pending_key_purges(enrollment), 0))
        done = await enrollment.post(f"/v1/patients/{subject}/erasure")
        assert done.status_code == 200 and done.json()["key_purge"] == "done"
        assert (await labs.get(result_path)).status_code == 404


async def _json(response: Any, field: str) -> Any:
    return (await response).json()[field]


async def _status(response: Any, status: int) -> bool:
    return (await response).status_code == status


async def _equal(value: Any, expected: Any) -> bool:
    return await value == expected
