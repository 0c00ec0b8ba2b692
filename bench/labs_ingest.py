"""Lab ingestion throughput: the labs service end to end against a bare JetStream pull consumer.

1. raw: N contract JSON results published to a fresh stream and consumed by a bare nats-py pull
   consumer (fetch 500, ack each) — the broker's own ceiling for this machine and client;
2. end to end: the labs service as a process on PostgreSQL, its patients already known (rows
   inserted into its ``known_patients`` register, as enrollment's ``PatientEnrolled`` would have
   put them), the same N results published on ``labs.results``; timed from the first publish until
   all N ``EgfrComputed`` are in the labs store AND published on the broker (``<prefix>.labs.*``),
   and on until the outcomes service (a process on PostgreSQL, its patients projected from
   ``PatientEnrolled`` published beforehand) has applied every one (``GET /v1/freshness``).

Every result is a creatinine for its own result id, so each is decided (CKD-EPI 2021) and yields
two events: ``LabResultRecorded`` (kept in the labs store) and ``EgfrComputed`` (stored and
published). The N messages are deleted from the shared ``LABS_RESULTS`` stream afterwards so later stacks do not replay them.

``python -m bench labs_ingest``; ``NEPHROTRACK_BENCH_LABS_N`` changes N;
``NEPHROTRACK_BENCH_PROFILE=<file>`` runs the labs process under cProfile (slower) and writes
its profile there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import date
from pathlib import Path

import httpx
import nats
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from sqlalchemy import func, insert, select

from shared.broker import LAB_RESULTS_SUBJECT, Topology
from services.enrollment.events import PatientEnrolled
from shared.database import create_engine
from shared.events import CommandContext, Envelope
from shared.keys import KeyVault, bucket_name
from shared.schema import events, known_patients
from tests.conftest import NATS_URL
from tests.stack import ROOT, Stack

N = int(os.environ.get("NEPHROTRACK_BENCH_LABS_N", "20000"))
PATIENTS = 200
FETCH = 500


def body(prefix: str, i: int) -> bytes:
    return json.dumps({
        "message_id": f"{prefix}-m{i}", "subject_id": f"B-{prefix}-{i % PATIENTS}", "lab_id": "BENCHLAB",
        "loinc": "2160-0", "value": round(0.8 + (i % 40) * 0.05, 2), "unit": "mg/dL",
        "collected_at": f"2015-{1 + i % 12:02d}-{1 + i % 28:02d}T08:30:00Z", "status": "final",
        "result_id": f"{prefix}-r{i}",
    }).encode()


async def publish_all(js: nats.js.JetStreamContext, subject: str, payloads: list[tuple[str, bytes]]) -> list[int]:
    """Publish with acks pipelined 2,000 deep; the stream sequence of each message."""
    sequences: list[int] = []
    pending = []
    for msg_id, payload in payloads:
        pending.append(await js.publish_async(subject, payload, headers={"Nats-Msg-Id": msg_id}))
        if len(pending) >= 2000:
            sequences.extend(ack.seq for ack in await asyncio.gather(*pending))
            pending = []
    sequences.extend(ack.seq for ack in await asyncio.gather(*pending))
    return sequences


async def raw_rate(nc: nats.NATS, payloads: list[tuple[str, bytes]]) -> float:
    js = nc.jetstream()
    name = f"BENCH_RAW_{uuid.uuid4().hex[:8].upper()}"
    subject = f"bench.{name.lower()}.results"
    await js.add_stream(StreamConfig(name=name, subjects=[subject]))
    try:
        await publish_all(js, subject, payloads)
        sub = await js.pull_subscribe(subject, durable="raw", stream=name,
                                      config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=10_000))
        received = 0
        started = time.perf_counter()
        while received < len(payloads):
            batch = await sub.fetch(FETCH, timeout=5)
            for msg in batch:
                json.loads(msg.data)  # a consumer reads what it receives
                await msg.ack()
            received += len(batch)
        return len(payloads) / (time.perf_counter() - started)
    finally:
        await js.delete_stream(name)


async def wait_drained(js: nats.js.JetStreamContext, stream: str, consumer: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = await js.consumer_info(stream, consumer)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return
        except Exception:  # noqa: BLE001 - not created yet
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"consumer {consumer} did not drain the existing backlog")


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_idle() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs: how much of the machine was left to others."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return values[3] + values[4], sum(values)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _Stack(Stack):
    """The test stack, with the labs process optionally run under cProfile."""

    def start_service(self, service: str) -> None:
        profile = os.environ.get("NEPHROTRACK_BENCH_PROFILE")
        if not profile:
            super().start_service(service)
            return
        log = open(self.tmp_path / f"{service}.log", "ab")  # noqa: SIM115 - closed with the process
        self.processes[service] = subprocess.Popen(
            [sys.executable, "-c", _PROFILED.format(path=profile, module=f"services.{service}")],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )


# uvicorn re-raises SIGTERM after its graceful shutdown, with the handler it found installed:
# this one writes the profile, which ``python -m cProfile`` would never get to do.
_PROFILED = """
import cProfile, runpy, signal, sys
profile = cProfile.Profile()
def stop(*_):
    profile.disable()
    profile.dump_stats({path!r})
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
profile.enable()
runpy.run_module({module!r}, run_name="__main__")
stop()
"""


def _sample(pid: int) -> subprocess.Popen[bytes] | None:
    """``NEPHROTRACK_BENCH_PYSPY=<file>``: sample the labs process with py-spy during the timed
    run (collapsed stacks, idle frames included, for ``bench.profile``). Sampling from outside
    costs the process almost nothing, unlike cProfile."""
    path = os.environ.get("NEPHROTRACK_BENCH_PYSPY")
    if not path:
        return None
    spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(spy), "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                             "--output", path, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=open(path + ".log", "wb"))  # noqa: SIM115


async def enrol(js: nats.js.JetStreamContext, topology: Topology, prefix: str) -> None:
    """Publish the patients' ``PatientEnrolled`` on the enrollment stream, as enrollment's relay
    would: outcomes projects the patients (and labs learns them, as the rows inserted above say)."""
    subject = topology.event_subject("enrollment", PatientEnrolled.event_type)
    for p in range(PATIENTS):
        envelope = Envelope.wrap(PatientEnrolled(
            subject_id=f"B-{prefix}-{p}", sex="FM"[p % 2], age_years=40 + p % 30, weight_kg=60.0, group="A",
            enrolled_on=date(2014, 1 + p % 12, 1), baseline_egfr=30.0, lee_grade="IV",
        ), stream_id=f"patient-B-{prefix}-{p}", stream_version=1, context=CommandContext(actor="bench"))
        await js.publish(subject, envelope.model_dump_json().encode(), headers={"Nats-Msg-Id": str(envelope.event_id)})


async def projected(http: httpx.AsyncClient, stack: Stack, source: str, sequence: int, timeout: float = 600) -> None:
    """Wait until the outcomes projection has applied ``source``'s stream up to ``sequence``."""
    deadline = time.monotonic() + timeout
    while True:
        freshness = (await http.get(f"{stack.url('outcomes')}/v1/freshness")).json()
        applied = next(s["last_sequence"] for s in freshness["sources"] if s["source"] == source)
        if applied >= sequence:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"outcomes applied {source} up to {applied}, not {sequence}")
        await asyncio.sleep(0.05)


async def end_to_end(tmp: str, nc: nats.NATS, prefix: str, payloads: list[tuple[str, bytes]]) -> dict[str, float]:
    js = nc.jetstream()
    topology = Topology(prefix)
    stack = _Stack(Path(tmp), prefix, ["labs", "outcomes"], backend="postgresql")
    sequences: list[int] = []
    try:
        await stack.start()
        engine = create_engine(stack.database_urls["labs"])
        async with engine.begin() as connection:
            await connection.execute(insert(known_patients), [
                {"subject_id": f"B-{prefix}-{p}", "group": "A", "sex": "FM"[p % 2], "age_years": 40 + p % 30,
                 "enrolled_on": date(2014, 1 + p % 12, 1)} for p in range(PATIENTS)
            ])
        vault = KeyVault(bucket_name(topology))  # each patient's data key, as enrollment makes it
        await vault.connect(js)
        for p in range(PATIENTS):
            await vault.create(f"B-{prefix}-{p}")
        await enrol(js, topology, prefix)
        # Earlier messages on the shared LABS_RESULTS stream are consumed (parked) before timing.
        await wait_drained(js, topology.lab_results_stream.name, f"{prefix}-labs-results")
        http = stack.client(timeout=30)
        await projected(http, stack, "enrollment", PATIENTS)
        service_stream = topology.service_stream("labs").name

        pid = stack.processes["labs"].pid
        sampler = _sample(pid)
        cpu_before, idle_before = process_cpu_seconds(pid), machine_idle()
        started = time.perf_counter()
        sequences = await publish_all(js, LAB_RESULTS_SUBJECT, payloads)
        subject = f"{prefix}.labs.EgfrComputed"
        while True:
            info = await js.stream_info(service_stream, subjects_filter=subject)
            published = (info.state.subjects or {}).get(subject, 0)
            if published >= len(payloads):
                break
            if time.perf_counter() - started > 600:
                raise TimeoutError(f"only {published} of {len(payloads)} EgfrComputed published")
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        cpu = process_cpu_seconds(pid) - cpu_before
        labs_head = (await js.stream_info(service_stream)).state.last_seq
        await projected(http, stack, "labs", labs_head)
        to_projection = time.perf_counter() - started
        await http.aclose()
        if sampler is not None:
            sampler.send_signal(signal.SIGINT)
            sampler.wait(timeout=60)
        idle_after = machine_idle()
        idle = (idle_after[0] - idle_before[0]) / max(1, idle_after[1] - idle_before[1])
        async with engine.connect() as connection:
            stored = await connection.scalar(
                select(func.count()).select_from(events).where(events.c.event_type == "EgfrComputed")
            )
        await engine.dispose()
        assert stored == len(payloads) == published, (stored, published)
        return {
            "rate": len(payloads) / elapsed, "projected_rate": len(payloads) / to_projection, "rss": peak_rss_mib(pid), "stored": stored,
            "cpu_us": 1e6 * cpu / len(payloads), "cpu_share": cpu / elapsed, "idle": idle,
        }
    finally:
        await stack.stop()
        await _delete(js, topology.lab_results_stream.name, sequences)
        for name in [s.config.name for s in await js.streams_info()]:
            if name.startswith((prefix.upper(), f"KV_{bucket_name(topology)}")):
                await js.delete_stream(name)
        with contextlib.suppress(Exception):  # the durable consumer on the shared stream outlives the stack
            await js.delete_consumer(topology.lab_results_stream.name, f"{prefix}-labs-results")


async def _delete(js: nats.js.JetStreamContext, stream: str, sequences: list[int]) -> None:
    """Remove this run's messages from the shared LABS_RESULTS stream (other stacks would replay them)."""
    for start in range(0, len(sequences), 200):
        await asyncio.gather(*(js.delete_msg(stream, seq) for seq in sequences[start : start + 200]),
                             return_exceptions=True)


async def run(tmp: str) -> str:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    payloads = [(f"{prefix}-m{i}", body(prefix, i)) for i in range(N)]
    nc = await nats.connect(NATS_URL)
    try:
        raw = await raw_rate(nc, payloads)
        e2e = await end_to_end(tmp, nc, prefix, payloads)
    finally:
        await nc.drain()
    rate = e2e["rate"]
    return "\n".join([
        f"### Lab ingestion: {N:,} contract JSON results on `labs.results` (creatinine, one result id each)",
        "",
        "| path | results/s |",
        "|---|---|",
        f"| raw: bare nats-py JetStream pull consumer (fetch {FETCH}, ack each) | {raw:,.0f} |",
        f"| end to end: labs process on PostgreSQL, until all {e2e['stored']:,.0f} EgfrComputed are stored and "
        f"published | {rate:,.0f} |",
        f"| end to end to the projection: until the outcomes projection has applied them all (outcomes process "
        f"on PostgreSQL, `GET /v1/freshness`) | {e2e['projected_rate']:,.0f} |",
        "",
        f"End to end ÷ raw: {rate / raw:.0%} to the labs store and broker, {e2e['projected_rate'] / raw:.0%} to the "
        f"projection. Patients known beforehand ({PATIENTS} rows inserted into the labs service's `known_patients`, "
        f"their `PatientEnrolled` published for outcomes, their data keys created). Labs process: {e2e['cpu_us']:,.0f} µs CPU per result "
        f"({e2e['cpu_share']:.0%} of a core), peak RSS (VmHWM) {e2e['rss']:.0f} MiB. Machine CPU idle during the "
        f"end-to-end run: {e2e['idle']:.0%} (low idle = other work on the machine competed for the 2 cores).",
    ])
