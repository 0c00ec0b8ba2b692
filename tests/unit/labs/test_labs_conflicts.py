"""A concurrent-writer conflict that outlasts the command runner's retries, on every channel that
answers its sender: 409 on FHIR and HTTP (it used to escape as a 500 from the FHIR routes' own
retry loop), ``AR`` ``concurrent_update`` on MLLP — and nothing recorded. The adapters run on the
in-memory store, whose every append here finds that another writer got there first."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.labs import api, fhir_api
from services.labs.handlers import ingest_runner
from services.labs.ingest import Labs
from services.labs.labs_memory import MemoryLabsStore
from services.labs.mllp import MllpServer
from shared.http import install_error_handlers
from shared.store import ConcurrencyError
from shared.store.memory import MemoryEventStore, MemoryUnitOfWork
from shared.store.registers import EnrolledPatient
from tests.unit.labs.test_labs_fhir_observations import CREATININE

SUBJECT = "IGA-A-001"
ORU = "\r".join([
    "MSH|^~\\&|LIS|LAB|NEPHROTRACK|STUDY|20150601093000||ORU^R01|MSG-CONFLICT|P|2.5",
    f"PID|1||{SUBJECT}",
    "OBR|1||FIL-1|||20150601083000",
    "OBX|1|NM|2160-0^Creatinine^LN||2.1|mg/dL|||||F|||20150601083000",
])


class ContendedStore(MemoryEventStore):
    """Every append meets a writer that got there first."""

    attempts = 0

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[MemoryUnitOfWork]:
        async with super()._begin() as uow:
            uow._insert_events = self._overtaken  # type: ignore[method-assign]
            yield uow

    async def _overtaken(self, rows: list[dict[str, Any]]) -> None:
        self.attempts += 1
        raise ConcurrencyError(rows[0]["stream_id"], rows[0]["stream_version"] - 1)


@pytest.fixture
async def store() -> ContendedStore:
    store = ContendedStore()
    async with store.transaction() as uow:
        await uow.patients.remember([EnrolledPatient(SUBJECT, "A", "F", 58, date(2014, 3, 2))])
    return store


@pytest.fixture
def labs() -> Labs:
    return Labs(MemoryLabsStore())


def client(store: ContendedStore, labs: Labs) -> httpx.AsyncClient:
    ingest = ingest_runner(store, labs)
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(api.routes(store, labs, ingest))
    app.include_router(fhir_api.routes(labs, ingest))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://labs")


async def test_fhir_answers_409_with_an_operation_outcome(store: ContendedStore, labs: Labs) -> None:
    async with client(store, labs) as http:
        response = await http.post("/fhir/Observation", content=json.dumps(CREATININE),
                                   headers={"content-type": "application/fhir+json"})
    assert response.status_code == 409, response.text
    (issue,) = response.json()["issue"]
    assert issue["code"] == "conflict" and "concurrently" in issue["diagnostics"]
    assert store.attempts == 10  # the runner's retries, then the answer
    assert store.tables.events == [] and labs.tables.committed.result_index == {}  # type: ignore[attr-defined]


async def test_a_fhir_bundle_answers_409_too(store: ContendedStore, labs: Labs) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"resource": CREATININE, "request": {"method": "POST", "url": "Observation"}}]}
    async with client(store, labs) as http:
        response = await http.post("/fhir", content=json.dumps(bundle), headers={"content-type": "application/fhir+json"})
    assert response.status_code == 409, response.text


async def test_http_json_answers_409(store: ContendedStore, labs: Labs) -> None:
    body = {"message_id": "m-1", "subject_id": SUBJECT, "loinc": "2160-0", "value": 2.1, "unit": "mg/dL",
            "collected_at": "2015-06-01T08:30:00Z", "status": "final", "result_id": "r-1"}
    async with client(store, labs) as http:
        response = await http.post("/v1/results", json=body)
    assert response.status_code == 409, response.text
    assert "concurrently" in response.json()["detail"]


async def test_mllp_answers_ar_resend_later(store: ContendedStore, labs: Labs) -> None:
    server = MllpServer(ingest_runner(store, labs), host="127.0.0.1", port=0)
    ack = await server.handle_message(ORU.encode())
    segments = {line.split("|")[0]: line.split("|") for line in ack.strip("\r").split("\r")}
    assert segments["MSA"][1:3] == ["AR", "MSG-CONFLICT"]
    assert "resend it later" in segments["MSA"][3]
    assert segments["ERR"][5] == "concurrent_update"
    assert store.tables.events == []
