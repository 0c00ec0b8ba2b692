"""Analyst query latency: ``GET /v1/cohorts`` with the outcomes projection holding 10^3, 10^5 and
10^6 events' worth of data.

The projection is filled by the projector itself (``ProjectionChanges`` + the rebuild's writers)
from :mod:`bench.workload`'s events, in a separate process, straight into the active generation
of a fresh PostgreSQL database — the rows a live projection or a rebuild would have written.
Then the outcomes service runs as its own process (``python -m services.outcomes``, uvicorn, its
real middleware and auth) on that database, and one client asks ``/v1/cohorts`` 500 times in a
row (after 20 warm-up requests) over one keep-alive connection.

The answer is computed from one row per patient (``outcome_json``), never from events, so the
latency follows the number of patients, not the length of the log: 10^5 and 10^6 events hold
the same 2,000 patients (10^6 = ten times the lab results each), 10^3 events only the first few
dozen patients. Peak RSS (``VmHWM``) of the filling process and of the outcomes process is
reported too. Databases and the service's streams are deleted afterwards.

``python -m bench analyst_queries``; ``NEPHROTRACK_BENCH_QUERY_SIZES=1000,100000,1000000`` and
``NEPHROTRACK_BENCH_QUERY_REQUESTS=500`` change the sizes and the request count.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from bench import workload
from bench.rebuild import NATS_URL, POSTGRES, ROOT, _cpu_seconds, _peak_rss_mib, delete_streams
from bench.report import percentile
from shared.broker import Topology

SIZES = tuple(int(n) for n in os.environ.get("NEPHROTRACK_BENCH_QUERY_SIZES", "1000,100000,1000000").split(","))
REQUESTS = int(os.environ.get("NEPHROTRACK_BENCH_QUERY_REQUESTS", "500"))
WARM_UP = 20
PATIENTS = 2_000
WRITE_EVERY = 20_000


# --- filling the projection (child process) ----------------------------------------------------------

async def _fill(database_url: str, prefix: str, total: int, patients: int) -> dict:
    from services.outcomes.incoming import Incoming
    from services.outcomes.projection_sql import SqlProjectionStore
    from services.outcomes.projector import ProjectionChanges
    from shared.store import open_store

    topology = Topology(prefix)
    streams = {source: topology.service_stream(source).name for source in workload.SOURCES}
    sequences = {source: itertools.count(1) for source in workload.SOURCES}
    changes = ProjectionChanges({})
    projection = SqlProjectionStore()
    store = open_store(database_url)
    try:
        for message in workload.events(total, patients):
            source = message.source
            changes.add(Incoming.parse(streams[source], next(sequences[source]), source, message.data))
            if len(changes.timeline) >= WRITE_EVERY:
                async with store.transaction() as uow:
                    await projection.write_timeline(uow, 1, changes.take_timeline())
        async with store.transaction() as uow:
            await projection.write_changes(uow, 1, changes)
    finally:
        await store.close()
    return {"patients": len(changes.patients), "applied": changes.applied}


def fill_child(database_url: str, prefix: str, total: int, patients: int) -> dict:
    import services.outcomes.projection_sql  # noqa: F401  (imported before the clock starts)

    cpu, started = _cpu_seconds(), time.perf_counter()
    result = asyncio.run(_fill(database_url, prefix, total, patients))
    return {**result, "seconds": time.perf_counter() - started, "cpu_seconds": _cpu_seconds() - cpu,
            "peak_rss_mib": _peak_rss_mib()}


def fill(database_url: str, prefix: str, total: int) -> dict:
    argv = [sys.executable, "-m", "bench.analyst_queries", "--fill", database_url, "--prefix", prefix,
            "--total", str(total), "--patients", str(PATIENTS)]
    result = subprocess.run(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                            text=True, timeout=1800, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"fill failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- the outcomes service as a process -----------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process_peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _wait_ready(client: httpx.AsyncClient, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"outcomes exited:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if (await client.get(f"{url}/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.3)
    raise TimeoutError(f"outcomes not ready after 120 s:\n{log.read_text(errors='replace')[-3000:]}")


async def query_latencies(database_url: str, prefix: str, tmp: str) -> tuple[list[float], dict, float]:
    """(latencies of REQUESTS sequential /v1/cohorts, the last answer's cohorts, outcomes peak RSS)."""
    key = secrets.token_urlsafe(24)
    port = _free_port()
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "NATS_URL": NATS_URL, "NEPHROTRACK_SUBJECT_PREFIX": prefix,
        "DATABASE_URL_OUTCOMES": database_url, "NEPHROTRACK_OUTCOMES_PORT": str(port),
        "NEPHROTRACK_VAR": str(Path(tmp) / f"var-{prefix}"),
        "NEPHROTRACK_API_KEYS": ",".join(f"{role}:{key}" for role in ("staff", "analyst", "operator")),
    }
    log = Path(tmp) / f"outcomes-{prefix}.log"
    with log.open("ab") as output:
        process = subprocess.Popen([sys.executable, "-m", "services.outcomes"], cwd=ROOT, env=env,
                                   stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
            await _wait_ready(client, url, process, log)
            latencies = []
            answer = None
            for i in range(WARM_UP + REQUESTS):
                started = time.perf_counter()
                response = await client.get(f"{url}/v1/cohorts")
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    raise RuntimeError(f"/v1/cohorts answered {response.status_code}: {response.text[:500]}")
                if i >= WARM_UP:
                    latencies.append(elapsed)
                answer = response.json()
        rss = _process_peak_rss_mib(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
    return latencies, {row["group"]: row["n"] for row in answer or []}, rss


# --- the benchmark ---------------------------------------------------------------------------------

async def measure(total: int, tmp: str) -> dict:
    from shared.database import ensure_database, migrate
    from tests.conftest import drop_database

    prefix = f"benchq{uuid.uuid4().hex[:8]}"
    url = f"{POSTGRES}/nt_bench_queries_{uuid.uuid4().hex[:8]}"
    try:
        await ensure_database(url)
        await asyncio.to_thread(migrate, "outcomes", url)
        filled = await asyncio.to_thread(fill, url, prefix, total)
        latencies, cohorts, rss = await query_latencies(url, prefix, tmp)
    finally:
        await delete_streams(NATS_URL, Topology(prefix))
        await drop_database(url)
    return {"total": total, "filled": filled, "latencies": latencies, "cohorts": cohorts, "outcomes_rss": rss}


async def run(tmp: str) -> str:
    load_before = os.getloadavg()[0]
    results = []
    for total in SIZES:
        print(f"  analyst queries: {total:,} events …", flush=True)
        results.append(await measure(total, tmp))
    lines = [
        f"### Analyst query latency: `GET /v1/cohorts`, {REQUESTS} sequential requests (load average "
        f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)",
        "",
        "The outcomes service as a process (uvicorn, auth, freshness headers) on PostgreSQL, the projection "
        "filled by the projector from the benchmark workload.",
        "",
        "| events in the projection | patients (A/B/control) | p50 ms | p99 ms | fill events/s (per CPU-s) | "
        "peak RSS fill / outcomes |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        filled, cohorts = r["filled"], r["cohorts"]
        lines.append(
            f"| {r['total']:,} | {filled['patients']:,} ({cohorts.get('A', 0)}/{cohorts.get('B', 0)}/"
            f"{cohorts.get('control', 0)}) | {percentile(r['latencies'], 50) * 1000:.1f} | "
            f"{percentile(r['latencies'], 99) * 1000:.1f} | {r['total'] / filled['seconds']:,.0f} "
            f"({r['total'] / filled['cpu_seconds']:,.0f}) | {filled['peak_rss_mib']:.0f} / {r['outcomes_rss']:.0f} MiB |"
        )
    if len(results) > 1:
        first, last = results[0], results[-1]
        p50 = {r["total"]: percentile(r["latencies"], 50) for r in results}
        lines += ["", f"p50 ratio {last['total']:,} ÷ {first['total']:,} events: {p50[last['total']] / p50[first['total']]:.2f}"
                  f" ({last['filled']['patients']:,} vs {first['filled']['patients']:,} patients)."]
        same = [r for r in results[:-1] if r["filled"]["patients"] == last["filled"]["patients"]]
        if same:
            lines[-1] += (f" Same {last['filled']['patients']:,} patients, {last['total'] // same[-1]['total']}× the events "
                          f"({last['total']:,} ÷ {same[-1]['total']:,}): p50 × {p50[last['total']] / p50[same[-1]['total']]:.2f}"
                          " — the answer reads one row per patient, never events.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fill", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--total", type=int, required=True)
    parser.add_argument("--patients", type=int, default=PATIENTS)
    args = parser.parse_args()
    print(json.dumps(fill_child(args.fill, args.prefix, args.total, args.patients)))


if __name__ == "__main__":
    main()
