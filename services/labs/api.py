"""Labs HTTP adapter: what integrators can see (results, rejections) and the contract's JSON lab
message over HTTP (``POST /v1/results``, a convenience beside the broker; same ingestion)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from contracts.labs import EgfrComputed, UrineResultMeasured
from services.labs.broker_messages import MAX_PAYLOAD_BYTES, parse_broker_result
from services.labs.domain import fold_result, stream_id
from services.labs.handlers import IngestResults, IngestRunner
from services.labs.ingest import Labs, Refusal
from services.labs.inputs import LabRejection
from services.labs.purge import purge_view
from shared.errors import NotFound
from shared.events import Envelope
from shared.store import EventStore

_EFFECTIVE_TYPES = frozenset({EgfrComputed.event_type, UrineResultMeasured.event_type})


def result_view(result_id: str, history: list[Envelope]) -> dict[str, Any]:
    """One result id: its effective value (the latest ``EgfrComputed``, or ``UrineResultMeasured``
    for urine protein) and every event."""
    state = fold_result(envelope.decode() for envelope in history)
    effective = next((e for e in reversed(history) if e.event_type in _EFFECTIVE_TYPES), None)
    return {
        "result_id": result_id,
        "subject_id": state.subject_id if state else None,
        "analyte": state.analyte if state else None,
        "effective": {**effective.payload, "stream_version": effective.stream_version} if effective else None,
        "history": [
            {
                "stream_version": envelope.stream_version,
                "event_type": envelope.event_type,
                "event_id": str(envelope.event_id),
                "recorded_at": envelope.recorded_at.isoformat(),
                "payload": envelope.payload,
            }
            for envelope in history
        ],
    }


def routes(store: EventStore, labs: Labs, ingest: IngestRunner) -> APIRouter:
    """A conflict that outlasts the command runner's retries answers 409 (shared.errors.Conflict)."""
    router = APIRouter(prefix="/v1", tags=["labs"])

    @router.post(
        "/results",
        summary="Submit one lab result in the contract's JSON format (as on labs.results)",
        responses={
            201: {"description": "recorded"}, 200: {"description": "already recorded (no effect)"},
            202: {"description": "subject not enrolled yet: held"}, 422: {"description": "refused, with the reason"},
            409: {"description": "changed concurrently; nothing recorded, resend"},
        },
    )
    async def post_result(request: Request) -> JSONResponse:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_PAYLOAD_BYTES:
                break
        data = bytes(body)
        headers = {key: value for key, value in request.headers.items() if key.lower() == "nats-msg-id"}
        try:
            result = parse_broker_result(data, headers)
        except LabRejection as rejection:
            await ingest(IngestResults([], [Refusal.of_input(rejection, "broker", data)], actor="labs:http"))
            return JSONResponse({"detail": rejection.reason, "code": rejection.code}, status_code=422)
        (outcome,) = await ingest(IngestResults([result], actor="labs:http"))
        if outcome.rejection is not None:
            return JSONResponse({"detail": outcome.rejection.reason, "code": outcome.rejection.code}, status_code=422)
        status = {"accepted": 201, "duplicate": 200, "parked": 202}[outcome.kind]
        return JSONResponse(
            {
                "outcome": outcome.kind,
                "result_id": result.result_id,
                "message_id": result.message_id,
                "events": [type(e).__name__ for e in outcome.events],
            },
            status_code=status,
        )

    @router.get("/results/{result_id:path}", summary="One result id: effective value and full history")
    async def get_result(result_id: str) -> dict[str, Any]:
        history = await store.read_stream(stream_id(result_id))
        if not history:
            raise NotFound(f"no lab result {result_id}")
        return result_view(result_id, history)

    @router.get("/patients/{subject_id}/results", summary="A subject's results (effective values, history) and parked results")
    async def patient_results(subject_id: str) -> dict[str, Any]:
        async with store.transaction() as uow:
            result_ids = await labs.tables.result_ids_of(uow, subject_id)
            histories = await uow.read_streams([stream_id(r) for r in result_ids])
            parked = await labs.tables.parked_for(uow, subject_id)
            patient = await uow.patients.find(subject_id)
        results = [result_view(r, histories[stream_id(r)]) for r in result_ids]
        results.sort(key=lambda view: (view["effective"] or {}).get("collected_at") or "")
        return {
            "subject_id": subject_id,
            "enrolled": patient is not None,
            "results": results,
            "parked": [
                {
                    "source": row.source, "message_id": row.message_id, "result_id": row.result_id,
                    "parked_at": row.parked_at.isoformat(),
                }
                for row in parked
            ],
        }

    @router.get("/rejections", summary="The latest refused inputs, newest first, with their reasons")
    async def rejections(
        limit: int = Query(50, ge=1, le=1000),
        source: Literal["broker", "mllp", "fhir"] | None = None,
        code: str | None = Query(None, max_length=64),
    ) -> list[dict[str, Any]]:
        async with store.transaction() as uow:
            rows = await labs.tables.rejections(uow, limit=limit, source=source, code=code)
        return [
            {
                "event_id": str(row.event_id),
                "recorded_at": row.recorded_at.isoformat(),
                "source": row.source,
                "code": row.code,
                "reason": row.reason,
                "message_id": row.message_id,
                "subject_id": row.subject_id,
                "raw_preview": row.raw_preview,
            }
            for row in rows
        ]

    @router.get(
        "/admin/erasures",
        summary="Purges of erased patients' lab messages in clear from the broker (operator), newest first",
    )
    async def erasures(limit: int = Query(100, ge=1, le=1000)) -> list[dict[str, Any]]:
        async with store.transaction() as uow:
            return [purge_view(job) for job in await labs.tables.purges(uow, limit)]

    return router
