"""Checking a run: every accepted input in the projections exactly once, values equal to the
independently computed expectation, refused inputs nowhere but on ``labs.rejected``, and the
live projection equal to a from-scratch rebuild.

Where "in the projections" is read, per input:
- enrollment, dose, infusion, kidney-failure event: the outcomes patient timeline
  (``GET /v1/patients/{id}``), one item per fact;
- harvest, release: the cells lot (``GET /v1/lots/{lot}``);
- lab message: the labs result history (``GET /v1/patients/{id}/results``: one
  ``LabResultRecorded`` per accepted message id) *and* the outcomes timeline (the result id's
  effective eGFR, with the expected value; never more eGFR items than messages).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
import nats
from nats.js.errors import NotFoundError

from shared.broker import LAB_REJECTED_SUBJECT, nats_connect_options
from tests.fault.load import (
    COHORT_KEYS,
    PatientPlan,
    close,
    effective_results,
    expected_cohorts,
    expected_outcome,
)
from tests.fault.send import Ledger, Target

OUTCOME_KEYS = ("treatment_start", "baseline_egfr", "post_egfr", "followup_years", "egfr_slope", "kidney_failure",
                "pulse_cycles", "infusions", "counted_egfr_n", "age_years", "group")


@dataclass
class Report:
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    lost: int = 0
    duplicated: int = 0
    wrong: int = 0  # in the projections, but with another value than expected
    phantom: int = 0  # effects of refused inputs
    misjudged: int = 0  # valid refused / invalid accepted
    unreported: int = 0  # refused without a reason on labs.rejected
    undelivered: int = 0
    retries: int = 0
    problems: list[str] = field(default_factory=list)

    def note(self, kind: str, text: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.problems) < 40:
            self.problems.append(f"{kind}: {text}")

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.wrong or self.phantom or self.misjudged or self.unreported
                    or self.undelivered)

    def summary(self) -> str:
        return (f"sent={self.sent} accepted={self.accepted} rejected={self.rejected} lost={self.lost} "
                f"duplicated={self.duplicated} wrong={self.wrong} phantom={self.phantom} misjudged={self.misjudged} "
                f"unreported={self.unreported} undelivered={self.undelivered} retries={self.retries}")


async def read_stream(nats_url: str, stream: str) -> list[tuple[str, bytes, dict[str, str]]]:
    """Every message still in ``stream`` (subject, data, headers), by direct get."""
    client = await nats.connect(**nats_connect_options(nats_url, connect_timeout=5, max_reconnect_attempts=3))
    try:
        js = client.jetstream()
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            return []
        out = []
        if not info.state.messages:
            return out
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(stream, seq)
            except NotFoundError:
                continue
            out.append((msg.subject, msg.data or b"", dict(msg.headers or {})))
        return out
    finally:
        await client.close()


async def dead_letters(nats_url: str) -> list[str]:
    """What the consumers dead-lettered (every ``*_DLQ`` stream of the test's own NATS server),
    each as its subject and error. No input of a fault run is undecodable, so every dead letter
    is a message the live projections lost to a fault they should have waited out."""
    client = await nats.connect(**nats_connect_options(nats_url, connect_timeout=5, max_reconnect_attempts=3))
    try:
        streams = [info.config.name for info in await client.jetstream().streams_info()]
    finally:
        await client.close()
    return [
        f"{headers.get('Nephrotrack-Original-Subject', subject)}: {headers.get('Nephrotrack-Error', '?')}"
        for stream in streams if stream.endswith("_DLQ")
        for subject, _, headers in await read_stream(nats_url, stream)
    ]


async def rejections(nats_url: str) -> dict[str, list[dict[str, Any]]]:
    """``labs.rejected`` by message id: the refusals' payloads (reason, code, source, raw)."""
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for subject, data, _ in await read_stream(nats_url, "LABS_REJECTED"):
        if subject != LAB_REJECTED_SUBJECT:
            continue
        payload = json.loads(data)["payload"]
        found[payload.get("message_id") or ""].append(payload)
    return found


async def check(target: Target, plans: list[PatientPlan], ledger: Ledger) -> Report:
    """One pass over everything (call :func:`converge` to wait for the stack to catch up)."""
    report = Report(sent=ledger.sent, retries=ledger.retries, undelivered=len(ledger.undelivered))
    for key, error in list(ledger.undelivered.items())[:10]:
        report.problems.append(f"undelivered: {key}: {error}")
    refused = await rejections(target.reading_nats_url)
    accepted: set[str] = set()
    for plan in plans:
        for message in plan.labs:
            if message.key not in ledger.accepted and message.key not in ledger.rejected:
                continue
            if message.channel == "broker":
                verdict = refused.get(message.message_id)
                if verdict:
                    ledger.rejected.setdefault(message.key, verdict[0].get("reason", ""))
                    ledger.accepted.pop(message.key, None)
            if message.key in ledger.rejected:
                report.rejected += 1
                if message.valid:
                    report.note("misjudged", f"valid {message.key} refused: {ledger.rejected[message.key]}")
                reasons = [r.get("reason") for r in refused.get(message.message_id, [])]
                if message.channel != "broker" and not any(reasons):
                    report.note("unreported", f"{message.key} refused but not on labs.rejected with a reason")
                if not all(reasons) or not ledger.rejected[message.key].strip():
                    report.note("unreported", f"{message.key} refused without a specific reason")
            else:
                accepted.add(message.key)
                if not message.valid:
                    report.note("misjudged", f"invalid {message.key} accepted")
    for key in ledger.accepted:
        if not key.startswith("lab:"):
            accepted.add(key)
    for key in ledger.rejected:
        if not key.startswith("lab:"):
            report.rejected += 1
            report.note("misjudged", f"command {key} refused: {ledger.rejected[key]}")
    report.accepted = len(accepted)

    async with httpx.AsyncClient(headers=target.headers, timeout=30) as http:
        outcomes = []
        for plan in plans:
            if f"enroll:{plan.subject_id}" not in accepted:
                continue
            expected = expected_outcome(plan, accepted)
            outcomes.append(expected)
            await _check_patient(http, target, plan, accepted, expected, ledger, report)
        cohorts = await http.get(target.url("outcomes") + "/v1/cohorts")
        cohorts.raise_for_status()
        _check_cohorts(cohorts.json(), expected_cohorts(outcomes), report)
    return report


async def _check_patient(http: httpx.AsyncClient, target: Target, plan: PatientPlan, accepted: set[str],
                         expected: dict[str, Any], ledger: Ledger, report: Report) -> None:
    sid = plan.subject_id
    response = await http.get(f"{target.url('outcomes')}/v1/patients/{sid}")
    if response.status_code != 200:
        count = sum(1 for key in accepted if key.split(":")[1] == sid)
        report.note("lost", f"{sid}: outcomes answers {response.status_code} ({count} accepted inputs)")
        report.lost += count - 1
        return
    detail = response.json()
    timeline = detail["timeline"]
    kinds = Counter(item["kind"] for item in timeline)
    _once(report, f"enroll:{sid}", kinds["enrolled"])
    doses = Counter((item["detail"]["cycle"], item["detail"]["day"]) for item in timeline if item["kind"] == "pulse_dose")
    for i, dose in enumerate(plan.doses):
        if f"dose:{sid}:{i}" in accepted:
            _once(report, f"dose:{sid}:{i}", doses.pop((dose["cycle"], dose["day"]), 0))
    for extra, n in doses.items():
        report.note("phantom", f"{sid}: pulse dose {extra} x{n} was never accepted")
    infusions = Counter(item["detail"]["lot_id"] for item in timeline if item["kind"] == "infusion")
    for i in range(len(plan.harvests)):
        lot = ledger.lots.get(f"harvest:{sid}:{i}")
        if f"infusion:{sid}:{i}" in accepted:
            _once(report, f"infusion:{sid}:{i}", infusions.pop(lot, 0))
        for step in ("harvest", "release"):
            if f"{step}:{sid}:{i}" in accepted:
                lot_view = await http.get(f"{target.url('cells')}/v1/lots/{lot}")
                if lot_view.status_code != 200:
                    report.note("lost", f"{step}:{sid}:{i}: lot {lot} answers {lot_view.status_code}")
                elif step == "release" and lot_view.json().get("status") not in ("released", "infused"):
                    report.note("lost", f"release:{sid}:{i}: lot {lot} is {lot_view.json().get('status')}")
    for extra, n in infusions.items():
        report.note("phantom", f"{sid}: infusion of lot {extra} x{n} was never accepted")
    failures = Counter((item["kind"], item["occurred_on"]) for item in timeline
                       if item["kind"] in ("dialysis_started", "kidney_transplant"))
    for i, event in enumerate(plan.clinical):
        if f"event:{sid}:{i}" in accepted:
            _once(report, f"event:{sid}:{i}", failures.pop((event["type"], event["on"]), 0))

    # lab results: labs' own record of each message, then the outcomes timeline
    labs = await http.get(f"{target.url('labs')}/v1/patients/{sid}/results")
    labs.raise_for_status()
    recorded: Counter[str] = Counter()
    for result in labs.json()["results"]:
        for item in result["history"]:
            if item["event_type"] == "LabResultRecorded":
                recorded[item["payload"]["message_id"]] += 1
    effective = effective_results(plan, accepted)
    egfr_items: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in timeline:
        if item["kind"] == "egfr":
            egfr_items[item["detail"]["result_id"]].append(item)
    for message in plan.labs:
        if message.key in accepted:
            _once(report, message.key, recorded.pop(message.message_id, 0))
        elif recorded.pop(message.message_id, 0):
            report.note("phantom", f"{message.key} was refused but labs recorded it")
    for message_id, n in recorded.items():
        report.note("phantom", f"{sid}: labs recorded message {message_id} x{n}, never sent")
    for result_id, result in effective.items():
        items = egfr_items.pop(result_id, [])
        versions = Counter(item["detail"]["lab_stream_version"] for item in items)
        if any(n > 1 for n in versions.values()) or len(items) > result.messages:
            report.note("duplicated", f"{result_id}: {len(items)} eGFR items for {result.messages} messages")
        current = [item for item in items if item["detail"]["effective"]]
        if not current:
            report.note("lost", f"{result_id}: no effective eGFR in outcomes")
        elif len(current) > 1:
            report.note("duplicated", f"{result_id}: {len(current)} effective eGFRs")
        elif not close(current[0]["detail"]["egfr"], result.egfr) or current[0]["detail"]["status"] != result.status:
            report.note("wrong", f"{result_id}: eGFR {current[0]['detail']['egfr']} {current[0]['detail']['status']}, "
                                 f"expected {result.egfr} {result.status}")
    for result_id in egfr_items:
        report.note("phantom", f"{sid}: eGFR for result {result_id} that was never accepted")
    for key in OUTCOME_KEYS:
        got, want = detail.get(key), expected[key]
        same = close(got, want) if isinstance(want, float) or isinstance(got, float) else got == want
        if not same:
            report.note("wrong", f"{sid} {key} = {got!r}, expected {want!r}")


def _once(report: Report, key: str, count: int) -> None:
    if count == 0:
        report.note("lost", key)
    elif count > 1:
        report.note("duplicated", f"{key} x{count}")


def _check_cohorts(rows: list[dict[str, Any]], expected: dict[str, dict[str, Any]], report: Report) -> None:
    by_group = {row["group"]: row for row in rows}
    for group, want in expected.items():
        row = by_group.get(group)
        if want["n"] == 0:
            continue
        if row is None:
            report.note("wrong", f"cohort {group} missing")
            continue
        for key in ("n", "kidney_failure_count", *COHORT_KEYS):
            if not (close(row.get(key), want[key]) if key in COHORT_KEYS else row.get(key) == want[key]):
                report.note("wrong", f"cohort {group} {key} = {row.get(key)!r}, expected {want[key]!r}")


async def converge(target: Target, plans: list[PatientPlan], ledger: Ledger, timeout: float = 240) -> Report:
    """Check until everything accepted has arrived and is right, or ``timeout``: the last report."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            report = await check(target, plans, ledger)
        except httpx.HTTPError as error:
            report = Report()
            report.note("lost", f"stack unreachable: {error!r}")
        if report.ok or time.monotonic() > deadline:
            return report
        await asyncio.sleep(2)


# --------------------------------------------------------------------------- rebuild


async def snapshot(http: httpx.AsyncClient, outcomes_url: str, subject_ids: list[str]) -> dict[str, Any]:
    cohorts = (await http.get(f"{outcomes_url}/v1/cohorts")).json()
    patients = {}
    for sid in subject_ids:
        response = await http.get(f"{outcomes_url}/v1/patients/{sid}")
        patients[sid] = response.json() if response.status_code == 200 else response.status_code
    csv = (await http.get(f"{outcomes_url}/v1/export/patients.csv")).text
    return {"cohorts": cohorts, "patients": patients, "csv": csv}


async def settled(nats_url: str, quiet_for: float = 3.0, timeout: float = 180) -> None:
    """Wait until nothing more is on its way to the live projections: every durable consumer of
    the test's own NATS server (the services'; the key mirrors' watchers are ephemeral) has had
    every message delivered and acknowledged, and no stream has grown, for ``quiet_for`` seconds.
    Every accepted input may be visible (:func:`converge`) while another event is not applied
    yet — one a SIGKILLed outcomes process had been given is delivered again only after the
    consumer's ack wait — and a snapshot taken then lacks an event the rebuild reads."""
    client = await nats.connect(**nats_connect_options(nats_url, connect_timeout=5, max_reconnect_attempts=3))
    js = client.jetstream()
    deadline = time.monotonic() + timeout
    quiet_since, last = time.monotonic(), None
    try:
        while True:
            streams = await js.streams_info()
            heads = {info.config.name: info.state.last_seq for info in streams}
            busy = [f"{c.name}: {c.num_pending} pending, {c.num_ack_pending} unacknowledged"
                    for info in streams for c in await js.consumers_info(info.config.name)
                    if c.config.durable_name and (c.num_pending or c.num_ack_pending)]
            if heads != last or busy:
                quiet_since, last = time.monotonic(), heads
            elif time.monotonic() - quiet_since >= quiet_for:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the consumers did not settle in {timeout}s: {busy}")
            await asyncio.sleep(0.5)
    finally:
        await client.close()


async def rebuild_and_compare(target: Target, subject_ids: list[str], timeout: float = 300) -> list[str]:
    """Rebuild the outcomes projection from the JetStream log (blue/green, ``POST
    /v1/admin/rebuild``), and return how the rebuilt projection differs from the live one it
    replaced (empty: identical)."""
    url = target.url("outcomes")
    async with httpx.AsyncClient(headers=target.headers, timeout=60) as http:
        await settled(target.reading_nats_url)
        before = await snapshot(http, url, subject_ids)
        status = (await http.get(f"{url}/v1/admin/rebuild")).json()
        generation = status["active_generation"]
        started = await http.post(f"{url}/v1/admin/rebuild")
        assert started.status_code == 202, started.text
        deadline = time.monotonic() + timeout
        while True:
            status = (await http.get(f"{url}/v1/admin/rebuild")).json()
            progress = status.get("progress") or {}
            if progress.get("phase") == "failed":
                raise AssertionError(f"rebuild failed: {progress.get('error')}")
            if status["active_generation"] > generation and not status["running_here"]:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"rebuild not done after {timeout}s: {status}")
            await asyncio.sleep(0.5)
        after = await snapshot(http, url, subject_ids)
    return _differences(before, after)


def _differences(before: Any, after: Any, path: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in sorted(set(before) | set(after), key=str):
            out += _differences(before.get(key), after.get(key), f"{path}.{key}")
        return out
    if isinstance(before, list) and isinstance(after, list):
        if len(before) != len(after):
            return [f"{path}: {len(before)} items live, {len(after)} rebuilt{_unmatched(before, after)}"]
        out = []
        for i, (a, b) in enumerate(zip(before, after, strict=True)):
            out += _differences(a, b, f"{path}[{i}]")
        return out
    return [] if before == after else [f"{path}: live {before!r}, rebuilt {after!r}"]


def _unmatched(before: list[Any], after: list[Any], shown: int = 3) -> str:
    """The items of one list that the other lacks (a few of each), to say which event differs."""
    live = Counter(json.dumps(item, sort_keys=True) for item in before)
    rebuilt = Counter(json.dumps(item, sort_keys=True) for item in after)
    only_live, only_rebuilt = list((live - rebuilt).elements()), list((rebuilt - live).elements())
    return f"; only live: {only_live[:shown]}; only rebuilt: {only_rebuilt[:shown]}"
