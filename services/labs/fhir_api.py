"""FHIR R4 lab results over HTTP: ``POST /fhir/Observation`` and ``POST /fhir`` (transaction or
batch Bundle of Observation POSTs), on the labs HTTP port.

Answers (``Content-Type: application/fhir+json``):

- created: ``201`` with the Observation as received (or, with ``Prefer: return=OperationOutcome``,
  an informational OperationOutcome; ``Prefer: return=minimal``, no body);
- the same Observation again (same ``meta.versionId``, or same content): ``200``, no effect;
- subject not enrolled yet: ``202`` with an informational OperationOutcome (the result is held
  until the enrollment arrives or the wait expires, see docs/labs.md);
- refused: an OperationOutcome with the reason, ``400`` (not JSON, not an Observation, not valid
  FHIR, nested more than 64 levels deep), ``413`` (body over 1 MiB), ``415`` (content type), ``422`` (valid FHIR, but not a result
  we accept: code, unit, value, time, subject, …). Every refusal is also published on
  ``labs.rejected``;
- a concurrent writer kept changing the result's record through every retry: ``409`` with an
  OperationOutcome (code ``conflict``); nothing was recorded, send it again.

A Bundle is answered ``200`` with a ``transaction-response`` (``batch-response``) Bundle whose
``entry[i].response.status`` is per entry (``201 Created``, ``200 OK``, ``202 Accepted``,
``422 Unprocessable Entity`` with ``response.outcome``). Entries are judged one by one: a
transaction is not all-or-nothing here (each result is independently idempotent, and a bad
entry must be reported rather than take its good neighbours down with it).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from services.labs.fhir_observations import (
    MAX_BODY_BYTES,
    operation_outcome,
    outcome_for,
    parse_bundle,
    parse_observation,
)
from services.labs.handlers import IngestResults, IngestRunner
from services.labs.ingest import Labs, Outcome, Refusal
from services.labs.inputs import IncomingResult, LabRejection, raw_for_report
from shared.errors import Conflict

T = TypeVar("T")
FHIR_JSON = "application/fhir+json"
_ACCEPTED_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
_BAD_REQUEST = frozenset({"malformed_json", "bad_encoding", "wrong_type", "wrong_resource_type", "invalid_resource",
                          "too_deep"})
_STATUS_LINE = {200: "200 OK", 201: "201 Created", 202: "202 Accepted", 400: "400 Bad Request",
                413: "413 Payload Too Large", 422: "422 Unprocessable Entity"}


class BodyProblem(Exception):
    def __init__(self, status: int, rejection: LabRejection, raw: str) -> None:
        super().__init__(rejection.reason)
        self.status, self.rejection, self.raw = status, rejection, raw


def fhir_response(body: dict[str, Any] | None, status: int) -> Response:
    if body is None:
        return Response(status_code=status, media_type=FHIR_JSON)
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


def information(text: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "information", "code": "informational", "diagnostics": text}]}


def status_for(rejection: LabRejection) -> int:
    if rejection.code == "payload_too_large":
        return 413
    return 400 if rejection.code in _BAD_REQUEST else 422


async def read_body(request: Request, source: str = "fhir") -> bytes:
    """The request body, refused (415/413) before it is read when its type or size is wrong."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in _ACCEPTED_TYPES:
        rejection = LabRejection(
            f"Content-Type {content_type or '(none)'!r} is not application/fhir+json or application/json",
            "unsupported_media_type",
        )
        raise BodyProblem(415, rejection, "")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BodyProblem(413, _too_large(int(declared)), "")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BodyProblem(413, _too_large(len(body)), raw_for_report(bytes(body), 4096))
    return bytes(body)


def _too_large(size: int) -> LabRejection:
    return LabRejection(f"body is at least {size} bytes; the limit is {MAX_BODY_BYTES}", "payload_too_large")


class Answered(Exception):
    """A FHIR route's answer decided before its end: a refused request, or a conflict."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def answering(route: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """The route, answering what it raised as :class:`Answered`."""

    @functools.wraps(route)
    async def answered(request: Request) -> Response:
        try:
            return await route(request)
        except Answered as answer:
            return answer.response

    return answered


async def ingest_or_conflict(ingest: IngestRunner, command: IngestResults) -> list[Outcome]:
    """:func:`~services.labs.handlers.ingest_results` by the runner; a conflict that outlasted the
    retries answers 409 (:class:`Answered`)."""
    try:
        return await ingest(command)
    except Conflict as conflict:
        outcome = operation_outcome(f"{conflict.reason}; nothing was recorded", "conflict")
        raise Answered(fhir_response(outcome, 409)) from conflict


async def open_resource(request: Request, parse: Callable[[bytes], T], ingest: IngestRunner) -> tuple[bytes, T]:
    """The request's body and what ``parse`` made of it; a refused one (415, 413, 400, 422) is
    recorded on ``labs.rejected`` and answered (:class:`Answered`): how every FHIR route opens."""
    body = b""
    try:
        body = await read_body(request)
        return body, parse(body)
    except BodyProblem as problem:
        refusal, status = Refusal(problem.rejection, "fhir", problem.raw), problem.status
    except LabRejection as rejection:
        refusal, status = Refusal.of_input(rejection, "fhir", body), status_for(rejection)
    await ingest_or_conflict(ingest, IngestResults([], [refusal], actor="labs:fhir"))
    raise Answered(fhir_response(outcome_for(refusal.rejection), status))


def routes(labs: Labs, ingest: IngestRunner) -> APIRouter:
    router = APIRouter(prefix="/fhir", tags=["fhir"])
    wait = labs.unknown_patient_wait.total_seconds()

    def parked_text(result: IncomingResult) -> str:
        return (f"subject {result.subject_id} is not enrolled yet; the result is held for up to {wait:g} s "
                "and recorded when the enrollment arrives (else refused as unknown_subject on labs.rejected)")

    @router.post(
        "/Observation",
        summary="Submit one lab result as a FHIR R4 Observation",
        responses={201: {"description": "recorded"}, 200: {"description": "already recorded (no effect)"},
                   202: {"description": "subject not enrolled yet: held"},
                   400: {"description": "not a FHIR Observation (OperationOutcome)"},
                   413: {"description": "body over 1 MiB"}, 415: {"description": "content type"},
                   409: {"description": "changed concurrently; nothing recorded, resend"},
                   422: {"description": "refused (OperationOutcome with the reason)"}},
    )
    @answering
    async def post_observation(request: Request) -> Response:
        body, result = await open_resource(request, parse_observation, ingest)
        (outcome,) = await ingest_or_conflict(ingest, IngestResults([result], actor="labs:fhir"))
        if outcome.kind == "rejected":
            assert outcome.rejection is not None
            return fhir_response(outcome_for(outcome.rejection), 422)
        if outcome.kind == "parked":
            return fhir_response(information(parked_text(result)), 202)
        status = 201 if outcome.kind == "accepted" else 200
        prefer = request.headers.get("prefer", "").replace(" ", "").lower()
        if "return=minimal" in prefer:
            return fhir_response(None, status)
        if "return=operationoutcome" in prefer:
            done = "recorded" if status == 201 else "already recorded; no effect"
            return fhir_response(information(f"result {result.result_id} {done}"), status)
        return fhir_response(_echo(body), status)

    @router.post(
        "",
        summary="Submit a transaction (or batch) Bundle of Observation POSTs",
        responses={200: {"description": "transaction-response Bundle, per-entry status"},
                   400: {"description": "not a Bundle (OperationOutcome)"},
                   409: {"description": "changed concurrently; nothing recorded, resend"}},
    )
    @answering
    async def post_bundle(request: Request) -> Response:
        body, items = await open_resource(request, parse_bundle, ingest)
        kind = _bundle_type(body)
        results = [item for item in items if isinstance(item, IncomingResult)]
        where: list[str | None] = [f"entry[{index}]" for index, item in enumerate(items) if isinstance(item, IncomingResult)]
        refusals = [Refusal(item, "fhir") for item in items if isinstance(item, LabRejection)]
        outcomes = iter(await ingest_or_conflict(ingest, IngestResults(results, refusals, where, actor="labs:fhir")))
        entries = []
        for item in items:
            if isinstance(item, LabRejection):
                entries.append(_entry(422, outcome_for(item)))
                continue
            outcome = next(outcomes)
            if outcome.kind == "rejected":
                assert outcome.rejection is not None
                entries.append(_entry(422, outcome_for(outcome.rejection)))
            elif outcome.kind == "parked":
                entries.append(_entry(202, information(parked_text(item))))
            else:
                entries.append(_entry(201 if outcome.kind == "accepted" else 200, None))
        response = {"resourceType": "Bundle", "type": f"{kind}-response", "entry": entries}
        return fhir_response(response, 200)

    return router


def _entry(status: int, outcome: dict[str, Any] | None) -> dict[str, Any]:
    response: dict[str, Any] = {"status": _STATUS_LINE[status]}
    if outcome is not None:
        response["outcome"] = outcome
    return {"response": response}


def _echo(body: bytes) -> Any:
    return json.loads(body)


def _bundle_type(body: bytes) -> str:
    kind = json.loads(body).get("type")
    return kind if kind in ("transaction", "batch") else "transaction"
