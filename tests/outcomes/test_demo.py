"""The demo runner without a stack: rounding, the table, the finish line, idempotent loading."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from nephrotrack import demo, running
from nephrotrack.demo import (
    Evidence,
    Stack,
    abstract_round,
    biopsy_differences,
    cohort_cells,
    cohort_differences,
    evidence_statements,
    print_cohorts,
    print_evidence,
)
from nephrotrack.seed import EXPECTED_BIOPSIES, EXPECTED_COHORTS, SEED
from shared.settings import DEFAULT_PORTS


@pytest.mark.parametrize(("value", "places", "shown"), [
    (24.5, 0, "25"), (25.5, 0, "26"),  # half up, not Python's half to even
    (6.800039032169749, 1, "6.8"), (9.299566050695871, 1, "9.3"), (2.675, 2, "2.68"),
    (-7.177, 1, "-7.2"), (60.0, 0, "60"), (None, 1, "—"),
])
def test_values_are_rounded_the_way_the_abstract_rounds(value: float | None, places: int, shown: str) -> None:
    assert abstract_round(value, places) == shown


def test_each_cell_shows_the_abstract_rounding_and_the_raw_value(monkeypatch: pytest.MonkeyPatch) -> None:
    cells = cohort_cells(EXPECTED_COHORTS["A"])
    assert cells[:5] == [("7", "7"), ("60", "60.0"), ("28", "28.0"), ("39", "39.0"),
                         ("6.8", repr(EXPECTED_COHORTS["A"]["mean_followup_years"]))]
    assert cells[-1] == ("0", "0")
    monkeypatch.setenv("COLUMNS", "80")  # an 80-column terminal
    console = Console(record=True, file=io.StringIO())
    print_cohorts(console, [EXPECTED_COHORTS[g] for g in ("A", "B", "control")])
    text = console.export_text()
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]]
            for line in text.splitlines() if line.startswith("│")}
    assert rows == {"A": ["7", "60", "28", "39", "6.8", "1.1", "0"], "B": ["3", "25", "85", "106", "9.3", "1.6", "0"],
                    "control": ["1", "57", "33", "23", "1.5", "-7.2", "1"]}, text
    unrounded = " ".join(text.split())
    assert "B: mean_age=25.0 mean_baseline_egfr=85.0 mean_post_egfr=106.0 " in unrounded, text
    assert f"mean_followup_years={EXPECTED_COHORTS['B']['mean_followup_years']!r}" in unrounded, text
    too_wide = [line for line in text.splitlines() if len(line) > 80]
    assert not too_wide, text


def test_the_demo_waits_until_every_group_has_its_final_values() -> None:
    final = [dict(EXPECTED_COHORTS[g]) for g in ("A", "B", "control")]
    assert cohort_differences(final) == []
    final[0]["mean_egfr_slope"] *= 1 + 1e-12  # creatinine-derived eGFRs: float noise only
    assert cohort_differences(final) == []
    early = [dict(final[0], n=6, mean_post_egfr=37.5), final[1]]
    assert cohort_differences(early) == [
        "group A n is 6 (expected 7)",
        "group A mean_post_egfr is 37.5 (expected 39.0)",
        "group control is missing",
    ]


def test_the_stack_is_found_from_the_run_environment(tmp_path: Path) -> None:
    (tmp_path / "api-keys.env").write_text("NEPHROTRACK_STAFF_KEY=s3cret\nNEPHROTRACK_ANALYST_KEY='a-key'\n")
    stack = Stack.from_env({"NEPHROTRACK_VAR": str(tmp_path), "NEPHROTRACK_PULSE_PORT": "9002",
                            "NEPHROTRACK_HOST": "0.0.0.0", "NEPHROTRACK_NATS_PORT": "4333",
                            "NEPHROTRACK_ANALYST_KEY": "from-env"})
    assert stack.urls["pulse"] == "http://127.0.0.1:9002" and stack.urls["outcomes"] == "http://127.0.0.1:8000"
    assert stack.nats_url == "nats://127.0.0.1:4333"
    assert stack.headers("staff") == {"Authorization": "Bearer s3cret"}
    assert stack.headers("analyst") == {"Authorization": "Bearer from-env"}
    assert Stack.from_env({"NATS_URL": "nats://broker:4222"}).nats_url == "nats://broker:4222"


def test_the_stack_is_found_from_the_record_of_the_running_stack(tmp_path: Path) -> None:
    """`make demo` in a second shell: no variables, the ports `run` recorded (its NATS moved)."""
    recorded = running.RunningStack(
        pid=os.getpid(), started_at="2026-12-05T00:00:00+00:00", mllp="127.0.0.1:2575",
        http={service: f"http://127.0.0.1:{9000 + n}" for n, service in enumerate(DEFAULT_PORTS)},
        nats_url="nats://127.0.0.1:40222", nats_embedded=True,
    )
    running.write(tmp_path, recorded)
    stack = Stack.from_env({"NEPHROTRACK_VAR": str(tmp_path)})
    assert stack.urls == recorded.http and stack.nats_url == "nats://127.0.0.1:40222"
    given = Stack.from_env({"NEPHROTRACK_VAR": str(tmp_path), "NEPHROTRACK_PULSE_PORT": "8102",
                            "NEPHROTRACK_NATS_PORT": "4333"})  # a variable set explicitly wins
    assert given.urls["pulse"] == "http://127.0.0.1:8102" and given.urls["labs"] == recorded.http["labs"]
    assert given.nats_url == "nats://127.0.0.1:4333"
    running.mark_stopped(tmp_path, os.getpid())
    assert Stack.from_env({"NEPHROTRACK_VAR": str(tmp_path)}).nats_url == "nats://127.0.0.1:4222"


class FakeJetStream:
    def __init__(self) -> None:
        self.published: list[tuple[str, dict, str]] = []

    async def publish(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        self.published.append((subject, json.loads(data), headers["Nats-Msg-Id"]))


def stack_answering(handler) -> tuple[demo._Commands, list[str]]:  # type: ignore[no-untyped-def]
    seen: list[str] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.port} {request.url.path}")
        return handler(request, seen)

    http = httpx.AsyncClient(transport=httpx.MockTransport(record))
    return demo._Commands(http, Stack.from_env({})), seen


async def test_an_already_enrolled_patient_is_skipped_but_its_lab_results_are_resent() -> None:
    commands, seen = stack_answering(lambda request, seen: httpx.Response(409, json={"detail": "already enrolled"}))
    js = FakeJetStream()
    patient = SEED[1]
    assert await demo._load_patient(commands, js, patient) is False  # type: ignore[arg-type]
    assert seen == ["8001 /v1/patients"]
    assert [m[2] for m in js.published] == [r["message_id"] for r in [*patient.lab_results, *patient.urine_results]]
    assert {m[0] for m in js.published} == {"labs.results"}


async def test_a_patient_the_pulse_service_does_not_know_yet_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "NOT_YET_KNOWN_PAUSE", 0)

    def answer(request: httpx.Request, seen: list[str]) -> httpx.Response:
        if request.url.path.endswith("/harvests"):
            return httpx.Response(201, json={"lot_id": "LOT-9"})
        if request.url.path.endswith("/pulse-doses") and len(seen) == 2:
            return httpx.Response(404, json={"detail": "no patient is enrolled with subject id IGA-A-001"})
        return httpx.Response(201, json={})

    commands, seen = stack_answering(answer)
    patient = SEED[0]
    assert await demo._load_patient(commands, FakeJetStream(), patient) is True  # type: ignore[arg-type]
    doses = [s for s in seen if s.endswith("/pulse-doses")]
    assert len(doses) == len(patient.pulse_doses) + 1  # the first one twice
    assert "8003 /v1/lots/LOT-9/release" in seen


async def test_a_refusal_stops_the_demo_with_the_services_reason() -> None:
    commands, _ = stack_answering(lambda request, seen: httpx.Response(422, json={"detail": "group A requires …"}))
    with pytest.raises(demo.DemoError, match="enrollment refused POST /v1/patients with 422: group A requires"):
        await demo._load_patient(commands, FakeJetStream(), SEED[0])  # type: ignore[arg-type]


def test_the_evidence_lines_state_the_abstract_in_the_systems_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [dict(EXPECTED_COHORTS[g]) for g in ("A", "B", "control")]
    evidence = Evidence(rows, {g: dict(EXPECTED_BIOPSIES[g]) for g in ("A", "B", "control")})
    evidence = Evidence(evidence.cohorts, evidence.biopsies, endpoints={
        "A": {"composite": {"times": [6.8], "events": [0]}}, "B": {"composite": {"times": [], "events": []}},
        "control": {"composite": {"times": [0.9, 1.81], "events": [0, 1]}},
    }, slopes={
        "A": {"total": {"slope": 1.64, "ci_low": 0.95, "ci_high": 2.33, "patients": 7},
              "chronic": {"slope": 1.5, "ci_low": 0.8, "ci_high": 2.2, "patients": 7}},
        "control": {"total": {"slope": None, "reason": "too few patients"}, "chronic": {"slope": None}},
    })
    safety, composite, slopes, proteinuria, biopsy = evidence_statements(evidence)
    assert composite == ("Composite kidney endpoint (confirmed ≥ 40 % eGFR decline, kidney failure or death): "
                         "group A: 0 of 7; group B: 0 of 3; group control: 1 of 1 (at 1.81 years).")
    assert slopes == ("eGFR slope (mixed model, per year): group A: total 1.6 (95 % CI 1.0 to 2.3; 7 patients), "
                      "chronic 1.5 (95 % CI 0.8 to 2.2; 7 patients); group control: total not fitted (too few "
                      "patients), chronic not fitted (no reason given).")
    assert safety == ('Safety ("no significant side-effects"): group A: 5 of 7 patients with adverse events, 0 serious, '
                      "0 significant and treatment-related; group B: 2 of 3 patients with adverse events, 0 serious, "
                      "0 significant and treatment-related.")
    assert proteinuria.startswith("Proteinuria: group A: UPCR 2.64 g/g → 0.86 g/g, complete remission 1, partial 4; "
                                  "group B: UPCR 1.73 g/g → 0.28 g/g, complete remission 2, partial 1; ")
    assert biopsy.endswith("group B: 3 paired, mesangial deposits cleared in 3, IgA deposition cleared in 3, "
                           "Lee grade improved in 2.")
    monkeypatch.setenv("COLUMNS", "80")
    console = Console(record=True, file=io.StringIO())
    print_evidence(console, evidence)
    assert all(len(line) <= 80 for line in console.export_text().splitlines())


def test_the_demo_waits_for_the_biopsy_comparisons_too() -> None:
    assert biopsy_differences(EXPECTED_BIOPSIES) == []
    early = {**EXPECTED_BIOPSIES, "B": {**EXPECTED_BIOPSIES["B"], "paired": 2}}
    assert biopsy_differences(early) == ["group B biopsies paired is 2 (expected 3)"]
    assert "group B biopsies paired is None (expected 3)" in biopsy_differences({})
