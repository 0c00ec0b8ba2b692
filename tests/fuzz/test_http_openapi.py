"""Every HTTP operation of every service, fuzzed with schemathesis from the service's own OpenAPI
document (fetched from the running process, with the test key): valid and invalid parameters
and JSON bodies. For every case: no 5xx; the status is one the document declares (or a
documented refusal: 401/403/404/409/413/415/422); the body conforms to the declared schema;
every refusal carries a specific, non-empty reason (``{"detail": …}``, an OperationOutcome
diagnostic for FHIR). Afterwards every service still answers ``/healthz``.

Budget: ``budget(20, 300)`` examples per operation and generation mode (positive and negative);
the totals reached are printed and recorded in docs/robustness.md.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.failures import Failure
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from shared.settings import SERVICES
from tests.fault.infra import FaultStack
from tests.fuzz.conftest import budget
from tests.stack import AUTH_HEADERS

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]

REFUSALS = {400, 401, 403, 404, 405, 408, 409, 413, 415, 422}
"""Refusal statuses every operation may answer, documented or not (contract: 404, 409, 422;
auth: 401/403; limits: 408/413; FHIR: 400/415)."""
SKIPPED = {("outcomes", "POST", "/v1/admin/rebuild")}
"""Rebuilding the projection hundreds of times over proves nothing more (a running rebuild
answers 409); rebuilds are exercised by tests/fault."""


def reason_of(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return "; ".join(str(issue.get("diagnostics") or "") for issue in body.get("issue", []))
    if isinstance(body, dict):
        return str(body.get("detail") or "")
    return ""


def fuzz_service(service: str, base_url: str, examples: int) -> tuple[Counter[str], list[str]]:
    """Run every operation of one service; returns (cases by status class, problems)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=AUTH_HEADERS, timeout=30)
    tally: Counter[str] = Counter()
    problems: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        label = (operation.method.upper(), operation.path)
        if (service, *label) in SKIPPED or label[1] == "/metrics":  # Prometheus text: no schema to check
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode)

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def run(case: Any) -> None:
                response = case.call(base_url=base_url, headers=AUTH_HEADERS, timeout=30)
                status = response.status_code
                tally[f"{status // 100}xx"] += 1
                where = f"{case.method} {case.formatted_path} ({mode.value})"
                if status >= 500:
                    problems.append(f"{where}: {status} {response.text[:300]}")
                    return
                if status >= 400:
                    if not reason_of(response).strip():
                        problems.append(f"{where}: {status} without a specific reason: {response.text[:200]}")
                    documented = {str(code) for code in operation.definition.raw.get("responses", {})}
                    if str(status) not in documented and status not in REFUSALS:
                        problems.append(f"{where}: undocumented status {status}")
                    return
                try:
                    case.validate_response(response, checks=[content_type_conformance, response_schema_conformance])
                except (AssertionError, Failure) as failure:
                    problems.append(f"{where}: {status} does not conform: {str(failure)[:300]}")

            try:
                run()
            except Unsatisfiable:
                continue  # nothing to negate (an operation without parameters or body)
            except Exception as error:  # noqa: BLE001 - a transport error is a finding (hang, crash)
                problems.append(f"{label} ({mode.value}): {type(error).__name__}: {str(error)[:300]}")
    return tally, problems


@pytest.mark.parametrize("service", SERVICES)
async def test_every_http_operation(fuzz_stack: FaultStack, service: str) -> None:
    tally, problems = await asyncio.to_thread(fuzz_service, service, fuzz_stack.url(service), budget(20, 300))
    print(f"\nHTTP fuzzing of {service}: {sum(tally.values())} cases {dict(tally)}; {len(problems)} problems")
    async with httpx.AsyncClient(timeout=5) as client:
        for each in SERVICES:  # nothing another service was sent took this one down
            assert (await client.get(f"{fuzz_stack.url(each)}/healthz")).status_code == 200, each
            assert fuzz_stack.processes[each].poll() is None, f"{each} exited"
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(dict.fromkeys(problems[:60]))
    assert tally["5xx"] == 0 and sum(tally.values()) > 0


async def test_nul_characters_are_refused_with_a_reason_not_a_500(fuzz_stack: FaultStack) -> None:
    """Found by this fuzzer: a subject id with a NUL character made enrollment answer 500
    (PostgreSQL text cannot hold NUL; the stream was read before the id was judged). Every
    service now answers 422 with a reason, whatever the route."""
    async with fuzz_stack.client(timeout=30) as http:
        body = {"subject_id": "IGA-A-\x00", "sex": "F", "age_years": 50, "weight_kg": 60, "group": "control",
                "enrolled_on": "2014-01-02", "baseline_egfr": 30.0, "lee_grade": "II"}
        requests = [
            ("POST", f"{fuzz_stack.url('enrollment')}/v1/patients", body),
            ("POST", f"{fuzz_stack.url('enrollment')}/v1/patients/A%00/events", {"type": "death", "on": "2016-01-01"}),
            ("POST", f"{fuzz_stack.url('pulse')}/v1/patients/A%00/pulse-doses",
             {"cycle": 1, "day": 1, "given_on": "2016-01-01", "dose_mg": 1000, "weight_kg": 60}),
            ("POST", f"{fuzz_stack.url('cells')}/v1/patients/A%00/harvests", {"harvested_on": "2016-01-01", "fat_grams": 100}),
            ("GET", f"{fuzz_stack.url('outcomes')}/v1/patients/A%00", None),
            ("GET", f"{fuzz_stack.url('labs')}/v1/results/A%00", None),
            ("GET", f"{fuzz_stack.url('labs')}/v1/patients/A%00/results", None),
            ("GET", f"{fuzz_stack.url('cells')}/v1/lots/A%00", None),
        ]
        for method, url, json_body in requests:
            response = await http.request(method, url, json=json_body)
            assert response.status_code in (404, 422), (url, response.status_code, response.text[:200])
            assert response.json().get("detail"), (url, response.text[:200])
