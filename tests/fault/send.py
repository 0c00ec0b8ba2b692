"""Sending the plan through the stack's public interfaces, as sites and labs do — and keeping the
books: what was sent, what the system accepted, what it refused (with its reason).

Every input is sent until it gets a definitive answer, the way a real client behaves when a
service, the broker or the database goes away under it: HTTP commands are retried on
connection errors, timeouts and 5xx (a retried command that finds its effect already recorded
is answered 409: accepted before), an HL7 message is resent with the same MSH-10 until it is
ACKed, a FHIR Observation is POSTed again, a broker message is published again with the same
``Nats-Msg-Id``. A retry is not a new input: ``sent`` counts inputs (and deliberate duplicates),
``retries`` counts the extra transmissions the faults caused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import nats
from nats.errors import Error as NatsError

from shared.broker import LAB_RESULTS_SUBJECT, nats_connect_options
from tests.fault.load import LabMessage, PatientPlan
from tests.stack import AUTH_HEADERS

INPUT_DEADLINE = 300.0
"""Seconds an input may take, retries included, before the run is declared broken."""


@dataclass
class Target:
    """Where the stack is: base URLs per service (several with scale-out), MLLP ports, NATS."""

    urls: dict[str, list[str]]
    mllp_ports: list[int]
    nats_url: str  # as a lab system publishes
    headers: dict[str, str] = field(default_factory=lambda: dict(AUTH_HEADERS))
    reader_nats_url: str | None = None  # reads labs.rejected (default: nats_url)

    @property
    def reading_nats_url(self) -> str:
        return self.reader_nats_url or self.nats_url

    def url(self, service: str, attempt: int = 0) -> str:
        choices = self.urls[service]
        return choices[attempt % len(choices)]


@dataclass
class Ledger:
    sent: int = 0
    retries: int = 0
    accepted: dict[str, str] = field(default_factory=dict)  # input key -> channel/how
    rejected: dict[str, str] = field(default_factory=dict)  # input key -> reason as answered
    undelivered: dict[str, str] = field(default_factory=dict)  # input key -> last error
    server_errors: Counter[str] = field(default_factory=Counter)  # "service 5xx" during faults
    outages: dict[str, float] = field(default_factory=dict)  # client -> longest wait for an answer, in s
    lots: dict[str, str] = field(default_factory=dict)  # harvest key -> lot id
    answered: int = 0
    total: int = 0
    broker_published: dict[str, LabMessage] = field(default_factory=dict)  # message id -> message

    def progress(self) -> float:
        return self.answered / self.total if self.total else 1.0

    def server_error(self, client: str, response: httpx.Response) -> None:
        """Count a 5xx; a 503 without ``Retry-After`` is counted as such."""
        without = " without Retry-After" if response.status_code == 503 and "Retry-After" not in response.headers else ""
        self.server_errors[f"{client} {response.status_code}{without}"] += 1

    def waited(self, client: str, first_failure: float | None) -> None:
        """An input went through after failing since ``first_failure``: the outage this client saw."""
        if first_failure is not None:
            self.outages[client] = round(max(self.outages.get(client, 0.0), time.monotonic() - first_failure), 1)


class Sender:
    """``async with Sender(target, ledger) as s: await s.send(plans)``."""

    def __init__(self, target: Target, ledger: Ledger, *, mllp_workers: int = 3, fhir_workers: int = 3,
                 patient_concurrency: int = 6, pace: float = 0.0) -> None:
        self.target = target
        self.ledger = ledger
        self.mllp_workers = mllp_workers
        self.fhir_workers = fhir_workers
        self.patient_concurrency = patient_concurrency
        self.pace = pace
        self.http: httpx.AsyncClient | None = None
        self.nc: nats.NATS | None = None

    async def __aenter__(self) -> Sender:
        self.http = httpx.AsyncClient(headers=self.target.headers, timeout=httpx.Timeout(30, connect=3))
        self.nc = await nats.connect(**nats_connect_options(
            self.target.nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=3,
            allow_reconnect=True))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.http is not None and self.nc is not None
        await self.http.aclose()
        with contextlib.suppress(Exception):
            await self.nc.close()

    async def wait_progress(self, fraction: float, timeout: float = 600) -> None:
        """Return once ``fraction`` of this run's inputs have been answered."""
        deadline = time.monotonic() + timeout
        while self.ledger.progress() < fraction:
            if time.monotonic() > deadline:
                raise TimeoutError(f"load stuck at {self.ledger.progress():.0%}")
            await asyncio.sleep(0.1)

    # ------------------------------------------------------------------ the whole plan

    async def send(self, plans: Sequence[PatientPlan]) -> None:
        messages = _interleave([p.labs for p in plans])
        self.ledger.answered = 0
        self.ledger.total = sum(_commands(p) for p in plans) + sum(m.copies for m in messages)
        by_channel: dict[str, list[LabMessage]] = {"broker": [], "mllp": [], "fhir": []}
        for message in messages:
            by_channel[message.channel].append(message)
        semaphore = asyncio.Semaphore(self.patient_concurrency)

        async def clinic(plan: PatientPlan) -> None:
            async with semaphore:
                await self.patient(plan)

        mllp_queue = _queue(by_channel["mllp"])
        fhir_queue = _queue(by_channel["fhir"])
        await asyncio.gather(
            *(clinic(p) for p in plans),
            self.broker(by_channel["broker"]),
            *(self.mllp_worker(mllp_queue, i) for i in range(self.mllp_workers)),
            *(self.fhir_worker(fhir_queue) for _ in range(self.fhir_workers)),
        )

    # ------------------------------------------------------------------ HTTP commands

    async def patient(self, plan: PatientPlan) -> None:
        sid = plan.subject_id
        await self.command(f"enroll:{sid}", "enrollment", "/v1/patients", plan.enrollment)
        for i, dose in enumerate(plan.doses):
            await self.command(f"dose:{sid}:{i}", "pulse", f"/v1/patients/{sid}/pulse-doses", dose)
        for i, (harvest, release, infusion) in enumerate(plan.harvests):
            answer = await self.command(f"harvest:{sid}:{i}", "cells", f"/v1/patients/{sid}/harvests", harvest)
            lot_id = _lot_id(answer)
            self.ledger.lots[f"harvest:{sid}:{i}"] = lot_id
            await self.command(f"release:{sid}:{i}", "cells", f"/v1/lots/{lot_id}/release", release)
            await self.command(f"infusion:{sid}:{i}", "cells", f"/v1/patients/{sid}/infusions",
                               {**infusion, "lot_id": lot_id})
        for i, event in enumerate(plan.clinical):
            await self.command(f"event:{sid}:{i}", "enrollment", f"/v1/patients/{sid}/events", event)

    async def command(self, key: str, service: str, path: str, body: dict[str, Any]) -> httpx.Response | None:
        assert self.http is not None
        self.ledger.sent += 1
        deadline = time.monotonic() + INPUT_DEADLINE
        attempt = 0
        last = ""
        failing_since: float | None = None
        while time.monotonic() < deadline:
            if attempt:
                self.ledger.retries += 1
                failing_since = failing_since or time.monotonic()
                await asyncio.sleep(min(0.2 * attempt, 2.0))
            url = self.target.url(service, attempt) + path
            attempt += 1
            try:
                response = await self.http.post(url, json=body)
            except httpx.HTTPError as error:
                last = repr(error)
                continue
            status = response.status_code
            if status in (200, 201) or (status == 409 and attempt > 1):
                self.ledger.accepted[key] = f"http {status}"
                self.ledger.waited(service, failing_since)
                self._answered()
                return response
            if status >= 500:
                self.ledger.server_error(service, response)
                last = f"{status} {response.text[:200]}"
                continue
            if status == 404 and "no patient is enrolled" in response.text:
                last = f"404 {response.text[:200]}"  # the patient is not known there yet
                continue
            self.ledger.rejected[key] = f"{status} {_detail(response)}"
            self._answered()
            return response
        self.ledger.undelivered[key] = last
        self._answered()
        return None

    def _answered(self) -> None:
        self.ledger.answered += 1

    # ------------------------------------------------------------------ broker

    async def broker(self, messages: Sequence[LabMessage]) -> None:
        assert self.nc is not None
        js = self.nc.jetstream()
        for message in messages:
            for copy in range(message.copies):
                self.ledger.sent += 1
                await self._publish(js, message, copy)
                self._answered()
                if self.pace:
                    await asyncio.sleep(self.pace)

    async def _publish(self, js: Any, message: LabMessage, copy: int) -> None:
        deadline = time.monotonic() + INPUT_DEADLINE
        attempt = 0
        last = ""
        failing_since: float | None = None
        while time.monotonic() < deadline:
            if attempt:
                self.ledger.retries += 1
                failing_since = failing_since or time.monotonic()
                await asyncio.sleep(min(0.2 * attempt, 2.0))
            attempt += 1
            try:
                await js.publish(LAB_RESULTS_SUBJECT, message.broker_body(),
                                 headers={"Nats-Msg-Id": message.message_id}, timeout=5)
            except (NatsError, TimeoutError) as error:
                last = repr(error)
                continue
            # The broker took it; whether labs accepts or refuses it is read from labs.rejected.
            self.ledger.broker_published[message.message_id] = message
            self.ledger.waited("broker", failing_since)
            if copy == 0:
                self.ledger.accepted[message.key] = "broker"
            return
        self.ledger.undelivered[message.key] = last

    # ------------------------------------------------------------------ MLLP

    async def mllp_worker(self, queue: asyncio.Queue[LabMessage], index: int) -> None:
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        attempt = index
        try:
            while True:
                try:
                    message = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                for _copy in range(message.copies):
                    self.ledger.sent += 1
                    deadline = time.monotonic() + INPUT_DEADLINE
                    tries = 0
                    last = ""
                    failing_since: float | None = None
                    while True:
                        if time.monotonic() > deadline:
                            self.ledger.undelivered[message.key] = last
                            break
                        if tries:
                            self.ledger.retries += 1
                            failing_since = failing_since or time.monotonic()
                            await asyncio.sleep(min(0.2 * tries, 2.0))
                        tries += 1
                        try:
                            if connection is None:
                                port = self.target.mllp_ports[attempt % len(self.target.mllp_ports)]
                                connection = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 3)
                            ack = await _exchange(*connection, message.hl7())
                        except (OSError, TimeoutError, asyncio.IncompleteReadError, ConnectionError) as error:
                            last = repr(error)
                            if connection is not None:
                                connection[1].close()
                            connection = None
                            attempt += 1
                            continue
                        code, text = _ack_code(ack)
                        if code == "AR" and "storage_unavailable" in ack:
                            last = text
                            continue
                        self.ledger.waited("mllp", failing_since)
                        if code == "AA":
                            self.ledger.accepted.setdefault(message.key, "mllp AA")
                        else:
                            self.ledger.rejected.setdefault(message.key, f"{code} {text}")
                        break
                    self._answered()
        finally:
            if connection is not None:
                connection[1].close()

    # ------------------------------------------------------------------ FHIR

    async def fhir_worker(self, queue: asyncio.Queue[LabMessage]) -> None:
        assert self.http is not None
        while True:
            try:
                message = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = json.dumps(message.fhir())
            for _copy in range(message.copies):
                self.ledger.sent += 1
                deadline = time.monotonic() + INPUT_DEADLINE
                attempt = 0
                last = ""
                failing_since: float | None = None
                while True:
                    if time.monotonic() > deadline:
                        self.ledger.undelivered[message.key] = last
                        break
                    if attempt:
                        self.ledger.retries += 1
                        failing_since = failing_since or time.monotonic()
                        await asyncio.sleep(min(0.2 * attempt, 2.0))
                    url = self.target.url("labs", attempt) + "/fhir/Observation"
                    attempt += 1
                    try:
                        response = await self.http.post(url, content=body,
                                                        headers={"Content-Type": "application/fhir+json"})
                    except httpx.HTTPError as error:
                        last = repr(error)
                        continue
                    if response.status_code >= 500:
                        self.ledger.server_error("labs-fhir", response)
                        last = response.text[:200]
                        continue
                    self.ledger.waited("fhir", failing_since)
                    if response.status_code in (200, 201, 202):
                        self.ledger.accepted.setdefault(message.key, f"fhir {response.status_code}")
                    else:
                        self.ledger.rejected.setdefault(message.key, f"{response.status_code} {_diagnostics(response)}")
                    break
                self._answered()


# --------------------------------------------------------------------------- helpers


def _commands(plan: PatientPlan) -> int:
    return 1 + len(plan.doses) + 3 * len(plan.harvests) + len(plan.clinical)


def _interleave(lists: Sequence[Sequence[LabMessage]]) -> list[LabMessage]:
    out: list[LabMessage] = []
    longest = max((len(items) for items in lists), default=0)
    for i in range(longest):
        for items in lists:
            if i < len(items):
                out.append(items[i])
    return out


def _queue(items: Sequence[LabMessage]) -> asyncio.Queue[LabMessage]:
    queue: asyncio.Queue[LabMessage] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    return queue


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: str,
                    timeout: float = 60) -> str:
    writer.write(b"\x0b" + message.encode() + b"\x1c\r")
    await asyncio.wait_for(writer.drain(), timeout)
    data = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), timeout)
    return data.strip(b"\x0b\x1c\r").decode(errors="replace")


def _ack_code(ack: str) -> tuple[str, str]:
    for segment in re.split(r"[\r\n]+", ack):
        if segment.startswith("MSA|"):
            fields = segment.split("|")
            return fields[1], "|".join(fields[3:4])
    return "??", ack[:200]


def _lot_id(response: httpx.Response | None) -> str:
    assert response is not None, "the harvest was not answered"
    if response.status_code == 201:
        return str(response.json()["lot_id"])
    found = re.search(r"as lot (\S+)", _detail(response))
    assert found, f"cannot tell the lot of a repeated harvest from {response.text}"
    return found.group(1)


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail"))
    except (ValueError, AttributeError):
        return response.text[:300]


def _diagnostics(response: httpx.Response) -> str:
    try:
        return "; ".join(issue.get("diagnostics", "") for issue in response.json().get("issue", []))
    except (ValueError, AttributeError):
        return response.text[:300]
