"""``nephrotrack demo``: send the seed study through the public interfaces of a running stack,
wait until the outcomes service shows the whole cohort, and print the cohort table and one line
per further statement of the abstract it reproduces (safety, proteinuria, follow-up biopsies).

Why only public interfaces: the numbers printed must be the ones the system computes from
records sent exactly as study sites would send them — HTTP commands to enrollment, pulse and
cells, lab results as JSON on the NATS subject ``labs.results`` — not numbers computed here.

Running it twice against one stack is harmless: enrollment answers 409 for a patient already
enrolled, which means "already loaded", so that patient's commands are skipped; lab messages
are sent again and deduplicated by their message id.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import textwrap
import time
from collections.abc import Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import nats
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError
from rich.console import Console
from rich.table import Table

from nephrotrack import running
from nephrotrack.credentials import API_KEYS_FILE, read_env_file
from nephrotrack.seed import ABSTRACT, EXPECTED_BIOPSIES, EXPECTED_COHORTS, SEED, Body, SeedPatient
from shared.auth import ENV_VAR as API_KEYS_VAR
from shared.auth import first_key_with_role
from shared.broker import LAB_RESULTS_SUBJECT, nats_connect_options
from shared.settings import DEFAULT_PORTS

WAIT_SECONDS = 120.0
NOT_YET_KNOWN_RETRIES = 5
NOT_YET_KNOWN_PAUSE = 0.5


CREDENTIALS = ("NEPHROTRACK_STAFF_KEY", "NEPHROTRACK_ANALYST_KEY", "NEPHROTRACK_LAB_NATS_USER",
               "NEPHROTRACK_LAB_NATS_PASSWORD")
"""What the demo needs once the stack requires authentication (contract, "Auth")."""


class DemoError(RuntimeError):
    """The demo could not load the study or see its cohort; the message says what to check."""


# --- where the stack is -----------------------------------------------------------------------

@dataclass(frozen=True)
class Stack:
    """The addresses and credentials of a running stack. Addresses: from the environment
    ``nephrotrack run`` reads (``NEPHROTRACK_<SERVICE>_PORT``, ``NEPHROTRACK_HOST``, ``NATS_URL`` /
    ``NEPHROTRACK_NATS_PORT``) where set, else from ``<var>/runtime.json`` while that stack runs
    (its NATS may not be on the default port), else the defaults. Each credential comes from its
    own variable (``NEPHROTRACK_STAFF_KEY``, ``NEPHROTRACK_LAB_NATS_USER``, …), else for a key from
    the first key with that role in ``NEPHROTRACK_API_KEYS``, else from ``<var>/api-keys.env``
    (what ``nephrotrack run`` generates)."""

    urls: Mapping[str, str]
    nats_url: str
    keys: Mapping[str, str]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Stack:
        env = os.environ if env is None else env
        var = Path(env.get("NEPHROTRACK_VAR") or "var")
        recorded = running.read_running(var)
        host = running.client_host(env.get("NEPHROTRACK_HOST") or "127.0.0.1")
        urls = {}
        for service, default in DEFAULT_PORTS.items():
            port = env.get(f"NEPHROTRACK_{service.upper()}_PORT")
            if recorded is not None and service in recorded.http and not (port or env.get("NEPHROTRACK_HOST")):
                urls[service] = recorded.http[service]
            else:
                urls[service] = f"http://{host}:{port or default}"
        nats_port = env.get("NEPHROTRACK_NATS_PORT")
        nats_url = env.get("NATS_URL") or (
            recorded.nats_url if recorded is not None and not nats_port else f"nats://127.0.0.1:{nats_port or 4222}")
        written = read_env_file(var / API_KEYS_FILE)
        configured = env.get(API_KEYS_VAR)
        keys = {}
        for name in CREDENTIALS:
            role = name.removeprefix("NEPHROTRACK_").removesuffix("_KEY").lower() if name.endswith("_KEY") else None
            value = env.get(name) or (role and first_key_with_role(configured, role)) or written.get(name)
            if value:
                keys[name] = value
        return cls(urls, nats_url, keys)

    def headers(self, role: str) -> dict[str, str]:
        """``Authorization: Bearer`` with the role's key, once the stack has keys."""
        key = self.keys.get(f"NEPHROTRACK_{role.upper()}_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}


# --- loading the seed -------------------------------------------------------------------------

class _Commands:
    """POSTs and PUTs to the services as study staff, with the contract's error shape turned into
    DemoError."""

    def __init__(self, http: httpx.AsyncClient, stack: Stack) -> None:
        self.http = http
        self.stack = stack

    async def post(self, service: str, path: str, body: Body, *, accept: Sequence[int] = ()) -> httpx.Response:
        return await self.send("POST", service, path, body, accept=accept)

    async def put(self, service: str, path: str, body: Body) -> httpx.Response:
        return await self.send("PUT", service, path, body)

    async def send(self, method: str, service: str, path: str, body: Body, *, accept: Sequence[int] = ()) -> httpx.Response:
        """Send, retrying a 404 a few times: pulse and cells learn of a patient from
        enrollment's events, which may still be on their way."""
        url = self.stack.urls[service] + path
        for attempt in range(NOT_YET_KNOWN_RETRIES):
            try:
                response = await self.http.request(method, url, json=body, headers=self.stack.headers("staff"))
            except httpx.HTTPError as exc:
                raise DemoError(f"cannot reach {service} at {url} ({exc!r}); is `nephrotrack run` running?") from exc
            if response.is_success or response.status_code in accept:
                return response
            if response.status_code == 404 and attempt < NOT_YET_KNOWN_RETRIES - 1:
                await asyncio.sleep(NOT_YET_KNOWN_PAUSE)
                continue
            break
        raise DemoError(f"{service} refused {method} {path} with {response.status_code}: {_detail(response)}")


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except (ValueError, AttributeError):
        return response.text[:500]


async def _load_patient(commands: _Commands, js: JetStreamContext, patient: SeedPatient) -> bool:
    """Send one patient's records; False if enrollment says they were loaded before."""
    sid = patient.subject_id
    enrolled = await commands.post("enrollment", "/v1/patients", patient.enrollment, accept=(409,))
    for result in [*patient.lab_results, *patient.urine_results]:  # labs parks results of patients it does not know yet
        await _publish_lab_result(js, result)
    if enrolled.status_code == 409:
        return False
    for dose in patient.pulse_doses:
        await commands.post("pulse", f"/v1/patients/{sid}/pulse-doses", dose)
    for harvest, release, infusion in patient.harvests:
        lot_id = (await commands.post("cells", f"/v1/patients/{sid}/harvests", harvest)).json()["lot_id"]
        await commands.post("cells", f"/v1/lots/{lot_id}/release", release)
        await commands.post("cells", f"/v1/patients/{sid}/infusions", {**infusion, "lot_id": lot_id})
    for biopsy in patient.biopsies:
        await commands.post("enrollment", f"/v1/patients/{sid}/biopsies", biopsy)
    for ae_id, report in patient.adverse_events:
        await commands.put("enrollment", f"/v1/patients/{sid}/adverse-events/{ae_id}", report)
    for clinical_event in patient.clinical_events:
        await commands.post("enrollment", f"/v1/patients/{sid}/events", clinical_event)
    return True


async def _publish_lab_result(js: JetStreamContext, result: Body) -> None:
    try:
        await js.publish(LAB_RESULTS_SUBJECT, json.dumps(result).encode(), headers={"Nats-Msg-Id": result["message_id"]})
    except NoStreamResponseError:
        raise DemoError(f"no JetStream stream stores {LAB_RESULTS_SUBJECT}; are the services running?") from None


@asynccontextmanager
async def _lab_broker(stack: Stack) -> Any:
    user = stack.keys.get("NEPHROTRACK_LAB_NATS_USER")
    password = stack.keys.get("NEPHROTRACK_LAB_NATS_PASSWORD")
    try:
        credentials = {"user": user, "password": password} if user and password else {}
        client = await nats.connect(**nats_connect_options(stack.nats_url, connect_timeout=5, max_reconnect_attempts=0,
                                                           **credentials))
    except Exception as exc:
        raise DemoError(f"cannot reach NATS at {stack.nats_url} ({exc!r}); is `nephrotrack run` running?") from exc
    try:
        yield client.jetstream()
    finally:
        await client.close()


async def load_seed(stack: Stack, patients: Sequence[SeedPatient] = SEED, *, console: Console | None = None) -> list[str]:
    """Send every patient (concurrently); returns the subject ids that were already loaded."""
    console = console or Console(stderr=True)
    async with httpx.AsyncClient(timeout=30) as http, _lab_broker(stack) as js:
        commands = _Commands(http, stack)

        async def load(patient: SeedPatient) -> bool:
            loaded = await _load_patient(commands, js, patient)
            console.print(f"{patient.subject_id}: {'sent' if loaded else 'already loaded, commands skipped'}")
            return loaded

        loaded = await asyncio.gather(*(load(p) for p in patients))
    return [p.subject_id for p, fresh in zip(patients, loaded, strict=True) if not fresh]


# --- waiting for the cohort -------------------------------------------------------------------

_EXACT = ("n", "kidney_failure_count", "complete_remission_count", "partial_remission_count", "decline_40_count",
          "composite_endpoint_count", "patients_with_ae", "patients_with_serious_ae",
          "patients_with_significant_related_ae")
_MEANS = ("mean_age", "mean_baseline_egfr", "mean_post_egfr", "mean_followup_years", "mean_egfr_slope",
          "mean_baseline_upcr", "mean_post_upcr")


def cohort_differences(rows: Sequence[Mapping[str, Any]], expected: Mapping[str, Mapping[str, Any]] = EXPECTED_COHORTS) -> list[str]:
    """What still differs between ``GET /v1/cohorts`` and the seed's expected cohort (empty: done).
    Means compare to floating-point precision: creatinine-derived eGFRs make the slope's last
    digits differ from the seed's own arithmetic."""
    by_group = {row.get("group"): row for row in rows}
    differences = []
    for group, want in expected.items():
        row = by_group.get(group)
        if row is None:
            differences.append(f"group {group} is missing")
            continue
        for key in _EXACT:
            if row.get(key) != want[key]:
                differences.append(f"group {group} {key} is {row.get(key)} (expected {want[key]})")
        for key in _MEANS:
            got, goal = row.get(key), want[key]
            if (got is None) != (goal is None) or (goal is not None and not math.isclose(got, goal, rel_tol=1e-6)):
                differences.append(f"group {group} {key} is {got} (expected {goal})")
    return differences


def biopsy_differences(by_group: Mapping[str, Mapping[str, Any]],
                       expected: Mapping[str, Mapping[str, int]] = EXPECTED_BIOPSIES) -> list[str]:
    """What still differs between ``GET /v1/cohorts/{group}/biopsies`` and the seed's pairs."""
    return [f"group {group} biopsies {key} is {by_group.get(group, {}).get(key)} (expected {value})"
            for group, want in expected.items() for key, value in want.items()
            if by_group.get(group, {}).get(key) != value]


@dataclass(frozen=True)
class Evidence:
    """What the demo read back: ``GET /v1/cohorts`` and, per group, the paired-biopsy summary, the
    kidney endpoints and the mixed-model slopes (read once the cohort is the seed's)."""

    cohorts: list[dict[str, Any]]
    biopsies: dict[str, dict[str, Any]]
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    slopes: dict[str, dict[str, Any]] = field(default_factory=dict)


async def _read_evidence(http: httpx.AsyncClient, stack: Stack) -> tuple[Evidence, list[str]]:
    base, headers = stack.urls["outcomes"] + "/v1/cohorts", stack.headers("analyst")
    response = await http.get(base, headers=headers)
    if response.status_code != 200:
        return Evidence([], {}), [f"GET /v1/cohorts answered {response.status_code}: {_detail(response)}"]
    rows = response.json()
    biopsies = {}
    for group in EXPECTED_BIOPSIES:
        answer = await http.get(f"{base}/{group}/biopsies", headers=headers)
        biopsies[group] = answer.json() if answer.status_code == 200 else {}
    problems = cohort_differences(rows) + biopsy_differences(biopsies)
    if problems:
        return Evidence(rows, biopsies), problems
    analyses: dict[str, dict[str, dict[str, Any]]] = {"endpoints": {}, "slopes": {}}
    for route, by_group in analyses.items():
        for group in EXPECTED_BIOPSIES:
            answer = await http.get(f"{base}/{group}/{route}", headers=headers)
            if answer.status_code != 200:
                return Evidence(rows, biopsies), [f"GET /v1/cohorts/{group}/{route} answered {answer.status_code}"]
            by_group[group] = answer.json()
    return Evidence(rows, biopsies, **analyses), []


async def wait_for_cohort(stack: Stack, *, timeout: float = WAIT_SECONDS, poll: float = 0.5) -> Evidence:
    """Poll the outcomes service until its cohorts and biopsy comparisons are the seed's;
    DemoError after ``timeout``."""
    deadline = time.monotonic() + timeout
    url = stack.urls["outcomes"] + "/v1/cohorts"
    async with httpx.AsyncClient(timeout=10) as http:
        while True:
            try:
                evidence, problems = await _read_evidence(http, stack)
            except (httpx.HTTPError, ValueError) as exc:
                problems = [f"cannot read {url} ({exc!r})"]
            if not problems:
                return evidence
            if time.monotonic() >= deadline:
                raise DemoError(
                    f"the outcomes service did not show the seed cohort within {timeout:.0f} s: "
                    + "; ".join(problems[:8]) + ". Check the services' logs under <var>/logs."
                )
            await asyncio.sleep(poll)


# --- the table --------------------------------------------------------------------------------

def abstract_round(value: float | None, places: int) -> str:
    """Round half up, as the abstract does (Python's ``round`` rounds half to even), from the
    shortest repr so 2.675 rounds as written rather than as its binary neighbour 2.67499…"""
    if value is None:
        return "—"
    quantum = Decimal(1).scaleb(-places)
    return str(Decimal(repr(float(value))).quantize(quantum, rounding=ROUND_HALF_UP))


COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("n", "n", None),
    ("age", "mean_age", 0),
    ("baseline eGFR", "mean_baseline_egfr", 0),
    ("post eGFR", "mean_post_egfr", 0),
    ("follow-up (years)", "mean_followup_years", 1),
    ("eGFR slope (/year)", "mean_egfr_slope", 1),
    ("kidney failure", "kidney_failure_count", None),
)
"""(heading, cohort key, decimals as the abstract rounds them; None: a count, shown as is).
Headings are short so that the table fits an 80-column terminal."""


def cohort_cells(row: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(rounded as in the abstract, raw value) for each column of one group."""
    cells = []
    for _, key, places in COLUMNS:
        value = row.get(key)
        if places is None:
            cells.append((str(value), str(value)))
        else:
            cells.append((abstract_round(value, places), "—" if value is None else repr(float(value))))
    return cells


def _abstract_caption() -> str:
    a, b, c = ABSTRACT["A"], ABSTRACT["B"], ABSTRACT["control"]
    return (
        f"Published abstract: group A n = {a['n']}, age {a['mean_age']}, eGFR {a['mean_baseline_egfr']} → "
        f"{a['mean_post_egfr']} over {a['mean_followup_years']} years; group B n = {b['n']}, age {b['mean_age']}, "
        f"eGFR {b['mean_baseline_egfr']} → {b['mean_post_egfr']} over {b['mean_followup_years']} years; "
        f"control eGFR {c['baseline_egfr']}, dialysis within {c['dialysis_within_years']} years."
    )


def cohort_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """The cohort means as the abstract rounds them (the unrounded ones: :func:`unrounded_lines`)."""
    table = Table(title="nephrotrack cohort: group means, rounded as in the abstract", caption=_abstract_caption())
    table.add_column("group", style="bold")
    for heading, _, _ in COLUMNS:
        table.add_column(heading, justify="right", overflow="fold")  # a value wraps, never "…"
    for row in rows:
        table.add_row(str(row["group"]), *(rounded for rounded, _ in cohort_cells(row)))
    return table


def unrounded_lines(rows: Sequence[Mapping[str, Any]], width: int) -> list[str]:
    """Each group's means as ``GET /v1/cohorts`` gives them, ``key=value``, wrapped at ``width``
    (one value per cell of the table made its rows four lines high in 80 columns)."""
    lines = []
    for row in rows:
        means = (f"{key}={raw}" for (_, key, places), (_, raw) in zip(COLUMNS, cohort_cells(row), strict=True)
                 if places is not None)
        lines += textwrap.wrap(f"{row['group']}: " + " ".join(means), width, subsequent_indent="    ",
                               break_long_words=False, break_on_hyphens=False)
    return lines


def print_cohorts(console: Console, rows: Sequence[Mapping[str, Any]]) -> None:
    console.print(cohort_table(rows))
    console.print("Unrounded means:")
    for line in unrounded_lines(rows, console.width):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def _upcr(value: float | None) -> str:
    return "—" if value is None else f"{abstract_round(value, 2)} g/g"


def evidence_statements(evidence: Evidence) -> list[str]:
    """One sentence per further statement of the abstract, in the system's own numbers."""
    rows = {row["group"]: row for row in evidence.cohorts}
    treated = [g for g in ("A", "B") if g in rows]
    safety = "; ".join(
        f"group {g}: {rows[g]['patients_with_ae']} of {rows[g]['n']} patients with adverse events, "
        f"{rows[g]['patients_with_serious_ae']} serious, {rows[g]['patients_with_significant_related_ae']} "
        "significant and treatment-related" for g in treated)
    proteinuria = "; ".join(
        f"group {g}: UPCR {_upcr(row['mean_baseline_upcr'])} → {_upcr(row['mean_post_upcr'])}, complete "
        f"remission {row['complete_remission_count']}, partial {row['partial_remission_count']}"
        for g, row in rows.items())
    biopsy = "; ".join(
        f"group {g}: {b['paired']} paired, mesangial deposits cleared in {b['deposits_cleared']}, IgA "
        f"deposition cleared in {b['iga_cleared']}, Lee grade improved in {b['lee_grade_improved']}"
        for g, b in evidence.biopsies.items() if b.get("paired"))
    return [
        f"Safety (\"no significant side-effects\"): {safety}.",
        f"Composite kidney endpoint (confirmed ≥ 40 % eGFR decline, kidney failure or death): {_composite(evidence)}.",
        f"eGFR slope (mixed model, per year): {_slopes(evidence)}.",
        f"Proteinuria: {proteinuria}.",
        f"Follow-up biopsy (\"disappearance of mesangial deposits and IgA deposition\"): {biopsy or 'none paired'}.",
    ]


def _composite(evidence: Evidence) -> str:
    parts = []
    for row in evidence.cohorts:
        curve = evidence.endpoints.get(row["group"], {}).get("composite", {})
        times = [t for t, events in zip(curve.get("times", []), curve.get("events", []), strict=False) if events]
        when = f" (at {', '.join(abstract_round(t, 2) for t in times)} years)" if times else ""
        parts.append(f"group {row['group']}: {row['composite_endpoint_count']} of {row['n']}{when}")
    return "; ".join(parts)


def _slope(fit: Mapping[str, Any]) -> str:
    if fit.get("slope") is None:
        return f"not fitted ({fit.get('reason', 'no reason given')})"
    return (f"{abstract_round(fit['slope'], 1)} (95 % CI {abstract_round(fit['ci_low'], 1)} to "
            f"{abstract_round(fit['ci_high'], 1)}; {fit['patients']} patients)")


def _slopes(evidence: Evidence) -> str:
    return "; ".join(
        f"group {group}: total {_slope(fits.get('total', {}))}, chronic {_slope(fits.get('chronic', {}))}"
        for group, fits in evidence.slopes.items())


def print_evidence(console: Console, evidence: Evidence) -> None:
    for statement in evidence_statements(evidence):
        for line in textwrap.wrap(statement, console.width, subsequent_indent="    ",
                                  break_long_words=False, break_on_hyphens=False):
            console.print(line, markup=False, highlight=False, soft_wrap=True)


# --- the command ------------------------------------------------------------------------------

async def demo(stack: Stack, *, timeout: float = WAIT_SECONDS, console: Console | None = None) -> Evidence:
    """Load the seed and wait for its cohort; returns what the demo read back."""
    console = console or Console(stderr=True)
    already = await load_seed(stack, console=console)
    if already:
        console.print(f"{len(already)} of {len(SEED)} patients were loaded before; waiting for the cohort")
    return await wait_for_cohort(stack, timeout=timeout)


def run_demo(env: Mapping[str, str] | None = None, *, timeout: float = WAIT_SECONDS,
             console: Console | None = None) -> list[dict[str, Any]]:
    """``nephrotrack demo``: load, wait, print the table and the evidence lines; returns the
    cohorts (for tests)."""
    console = console or Console()
    evidence = asyncio.run(demo(Stack.from_env(env), timeout=timeout, console=console))
    print_cohorts(console, evidence.cohorts)
    print_evidence(console, evidence)
    return evidence.cohorts
