"""Analyst query latency (issue 20, target 4): ``GET /v1/cohorts`` and
``/v1/cohorts/{group}/endpoints`` against the same server's ``/healthz``, with the outcomes
projection holding 10^4 and 10^6 events' worth of data.

The projection is filled by the projector itself (``ProjectionChanges`` + the rebuild's writers)
from :mod:`bench.workload`'s events, in a separate process, straight into the active generation
of a fresh PostgreSQL database — the rows a live projection or a rebuild would have written.
Then the outcomes service runs as its own process (``python -m services.outcomes``, uvicorn, its
real middleware and auth) on that database, and one client asks, round after round, ``/healthz``,
``/v1/cohorts`` and the endpoints of every group with patients (the order rotating; 20 warm-up
rounds, then REQUESTS measured ones) over one keep-alive connection. The target is a ratio on the
same server: each cohort path's p50 at most 3× ``/healthz``'s, at every size — so the answer must
not be recomputed from every patient per request (10^4 events hold a few hundred patients, 10^5
and more the same 2,000). Peak RSS (``VmHWM``) of the filling process and of the outcomes
process is reported too. Databases and the service's streams are deleted afterwards.

``python -m bench analyst_queries``; ``NEPHROTRACK_BENCH_QUERY_SIZES=10000,1000000`` and
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

SIZES = tuple(int(n) for n in os.environ.get("NEPHROTRACK_BENCH_QUERY_SIZES", "10000,1000000").split(","))
REQUESTS = int(os.environ.get("NEPHROTRACK_BENCH_QUERY_REQUESTS", "500"))
WARM_UP = 20
HEALTHZ = "/healthz"
COHORTS = "/v1/cohorts"
TARGET_RATIO = 3.0
PATIENTS = 2_000
WRITE_EVERY = 20_000


# --- filling the projection (child process) ----------------------------------------------------------

async def _fill(database_url: str, prefix: str, total: int, patients: int) -> dict:
    from contracts import register_all
    from services.outcomes import locks
    from services.outcomes.incoming import Incoming
    from services.outcomes.projection_sql import SqlProjectionStore
    from services.outcomes.projector import ProjectionChanges
    from shared.events import registry
    from shared.store import open_store

    register_all(registry, *locks.EVENTS)  # as the outcomes app does: unregistered events decode to nothing
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


def _paths(groups: list[str]) -> list[str]:
    """What one round asks: the baseline, the cohort table and each group's endpoints."""
    return [HEALTHZ, COHORTS, *(f"/v1/cohorts/{group}/endpoints" for group in groups)]


async def query_latencies(database_url: str, prefix: str, tmp: str) -> tuple[dict[str, list[float]], dict, float]:
    """({path: latencies of REQUESTS requests}, the cohorts' sizes, outcomes peak RSS): ``/healthz``,
    ``/v1/cohorts`` and the endpoints of every group with patients, interleaved round by round (the
    order rotating) on one keep-alive connection, so that all of them see the same machine."""
    from tests.conftest import free_port

    key = secrets.token_urlsafe(24)
    port = free_port()
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
            cohorts = {row["group"]: row["n"] for row in (await client.get(f"{url}{COHORTS}")).json()}
            paths = _paths([group for group, n in cohorts.items() if n])
            latencies: dict[str, list[float]] = {path: [] for path in paths}
            for i in range(WARM_UP + REQUESTS):
                shift = i % len(paths)
                for path in paths[shift:] + paths[:shift]:
                    started = time.perf_counter()
                    response = await client.get(f"{url}{path}")
                    elapsed = time.perf_counter() - started
                    if response.status_code != 200:
                        raise RuntimeError(f"{path} answered {response.status_code}: {response.text[:500]}")
                    if i >= WARM_UP:
                        latencies[path].append(elapsed)
        rss = _process_peak_rss_mib(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
    return latencies, cohorts, rss


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


def _ratio_table(results: list[dict]) -> list[str]:
    """Per size and path: p50/p99 and the p50 over the same server's ``/healthz`` p50, against
    the target (≤ TARGET_RATIO for every cohort path at every size)."""
    lines = ["| events | path | p50 ms | p99 ms | p50 ÷ /healthz p50 | target ≤ "
             f"{TARGET_RATIO:g}× |", "|---|---|---|---|---|---|"]
    for r in results:
        baseline = percentile(r["latencies"][HEALTHZ], 50)
        for path, latencies in r["latencies"].items():
            ratio = percentile(latencies, 50) / baseline
            verdict = "—" if path == HEALTHZ else ("met" if ratio <= TARGET_RATIO else "not met")
            lines.append(f"| {r['total']:,} | `{path}` | {percentile(latencies, 50) * 1000:.2f} | "
                         f"{percentile(latencies, 99) * 1000:.2f} | {ratio:.2f} | {verdict} |")
    return lines


def _verdict(results: list[dict]) -> str:
    worst = max(
        (percentile(latencies, 50) / percentile(r["latencies"][HEALTHZ], 50), r["total"], path)
        for r in results for path, latencies in r["latencies"].items() if path != HEALTHZ
    )
    met = "met" if worst[0] <= TARGET_RATIO else "not met"
    return (f"Target 4 (cohort queries p50 ≤ {TARGET_RATIO:g}× /healthz p50 at every size): **{met}** — the worst "
            f"is `{worst[2]}` at {worst[1]:,} events, {worst[0]:.2f}×.")


async def run(tmp: str) -> str:
    load_before = os.getloadavg()[0]
    results = []
    for total in SIZES:
        print(f"  analyst queries: {total:,} events …", flush=True)
        results.append(result := await measure(total, tmp))
        if not result["filled"]["patients"]:
            raise RuntimeError(f"the fill of {total:,} events projected no patient: nothing would be measured")
    lines = [
        f"### Analyst query latency: `/healthz`, `GET /v1/cohorts` and `/v1/cohorts/{{group}}/endpoints`, "
        f"{REQUESTS} interleaved rounds (load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} "
        "at the end)",
        "",
        "The outcomes service as a process (uvicorn, auth, freshness headers) on PostgreSQL, the projection "
        "filled by the projector from the benchmark workload; each round asks every path once, on one "
        "keep-alive connection.",
        "",
        "| events in the projection | patients (A/B/control) | fill events/s (per CPU-s) | peak RSS fill / outcomes |",
        "|---|---|---|---|",
    ]
    for r in results:
        filled, cohorts = r["filled"], r["cohorts"]
        lines.append(
            f"| {r['total']:,} | {filled['patients']:,} ({cohorts.get('A', 0)}/{cohorts.get('B', 0)}/"
            f"{cohorts.get('control', 0)}) | {r['total'] / filled['seconds']:,.0f} "
            f"({r['total'] / filled['cpu_seconds']:,.0f}) | {filled['peak_rss_mib']:.0f} / {r['outcomes_rss']:.0f} MiB |"
        )
    lines += ["", *_ratio_table(results), "", _verdict(results)]
    if len(results) > 1:
        first, last = results[0], results[-1]
        p50 = {r["total"]: percentile(r["latencies"][COHORTS], 50) for r in results}
        lines[-1] += (f" `/v1/cohorts` p50 ratio {last['total']:,} ÷ {first['total']:,} events: "
                      f"{p50[last['total']] / p50[first['total']]:.2f} ({last['filled']['patients']:,} vs "
                      f"{first['filled']['patients']:,} patients).")
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
