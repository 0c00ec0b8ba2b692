"""Rebuild throughput against the raw read rate of the same JetStream streams (issue 5).

For each size (100,000 and 1,000,000 events of :mod:`bench.workload`'s mix, ~2,000 patients):

1. the events are published into the four service streams of a fresh subject prefix
   (``publish_async``, acks pipelined in windows) as the services publish them: every payload
   about a patient sealed with that patient's key (shared/sealing.py), the keys in the prefix's
   key bucket, where the rebuild finds them (``NEPHROTRACK_BENCH_REBUILD_SEALED=0``: in clear,
   as runs before 2026-12-05 measured);
2. **raw read**: a fresh process reads the same streams from sequence 1 with no processing —
   no decoding, each message's bytes only counted — in two ways: nats-py's own
   ``PullSubscription.fetch`` with big batches, and the rebuild's batch puller (a plain
   subscription answering pull requests: the fastest way we found to read a stream with
   nats-py). The faster of the two is the ceiling;
3. **rebuild**: a fresh process runs ``services.outcomes.rebuild.wiring.rebuild`` into a fresh
   PostgreSQL database (migrated beforehand, so only the rebuild is timed) — decode, project,
   write every timeline row, every patient and the checkpoints, swap.

Each child reports its wall time, its CPU time (user + system: the machine is shared, CPU time
per event is the number that does not depend on the neighbours) and its peak RSS (``VmHWM``).
Memory must stay flat: the rebuild streams the log, holds at most two write batches and keeps
its patients' lab results — the part of the projection that grows with the log — in a scratch
file between checkpoints, so the 100k → 1M difference should be noise.

``python -m bench rebuild``. ``NEPHROTRACK_BENCH_REBUILD_SIZES=100000,1000000`` changes the sizes;
``NEPHROTRACK_BENCH_REBUILD_PROFILE=<file>`` also runs the largest rebuild under cProfile and
writes the profile's top functions there (and adds the top ten to the report).
Streams and databases are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bench import workload
from shared.broker import Topology, ensure_streams
from shared.keys import KeyVault, bucket_name, key_name

ROOT = Path(__file__).resolve().parents[1]
POSTGRES = os.environ.get("NEPHROTRACK_TEST_POSTGRES", "postgresql+asyncpg://postgres@127.0.0.1:5432")
NATS_URL = os.environ.get("NEPHROTRACK_TEST_NATS", "nats://127.0.0.1:4222")
SIZES = tuple(int(n) for n in os.environ.get("NEPHROTRACK_BENCH_REBUILD_SIZES", "100000,1000000").split(","))
PATIENTS = 2_000
PUBLISH_WINDOW = 10_000
RAW_FETCH_BATCH = 5_000
RAW_FETCH_UP_TO = 100_000
TARGET_RATE = 100_000
TARGET_RATIO = 0.5
FLAT_WITHIN = 0.1
"""Peak memory counts as flat when the larger log's peak is within this share of the smaller's."""
SEALED = os.environ.get("NEPHROTRACK_BENCH_REBUILD_SEALED", "1") != "0"


# --- publishing -----------------------------------------------------------------------------------

async def publish(nats_url: str, topology: Topology, total: int, patients: int) -> tuple[dict[str, int], float, int]:
    """Publish ``total`` workload events into the topology's service streams (sealed, with the
    patients' keys put in the topology's key bucket, unless ``SEALED`` is off): (messages per
    stream, seconds, bytes)."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream(publish_async_max_pending=PUBLISH_WINDOW)
    await ensure_streams(js, [topology.service_stream(source) for source in workload.SOURCES])
    sealer = workload.PatientKeys() if SEALED else None
    started = time.perf_counter()
    size = 0
    pending = []
    for message in workload.events(total, patients, seal=sealer):
        size += len(message.data)
        pending.append(await js.publish_async(workload.subject(topology, message), message.data,
                                              headers={"Nats-Msg-Id": message.event_id}))
        if len(pending) >= PUBLISH_WINDOW:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    elapsed = time.perf_counter() - started
    if sealer is not None:
        vault = KeyVault(bucket_name(topology))
        await vault.connect(js)
        for subject_id, key in sealer.keys.items():
            await vault.kv.put(key_name(subject_id), key)
    counts = {source: (await js.stream_info(topology.service_stream(source).name)).state.messages
              for source in workload.SOURCES}
    await nc.close()
    if sum(counts.values()) != total:
        raise RuntimeError(f"published {total} events but the streams hold {counts}")
    return counts, elapsed, size


async def delete_streams(nats_url: str, topology: Topology) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    for name in [s.config.name for s in await js.streams_info()]:
        if name.startswith(topology.prefix.upper() + "_") or name == f"KV_{bucket_name(topology)}":
            await js.delete_stream(name)
    await nc.close()


# --- the child processes ---------------------------------------------------------------------------

def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _raw_fetch(nats_url: str, streams: list[str]) -> tuple[int, int]:
    """nats-py's PullSubscription.fetch, big batches, no acks."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    count = size = 0
    for stream in streams:
        head = (await js.stream_info(stream)).state.last_seq
        consumer = await js.add_consumer(stream, ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=60.0, mem_storage=True))
        subscription = await js.pull_subscribe_bind(consumer=consumer.name, stream=stream)
        read = 0
        while read < head:
            for message in await subscription.fetch(min(RAW_FETCH_BATCH, head - read), timeout=10):
                size += len(message.data)
                read += 1
        count += read
        await subscription.unsubscribe()
        await js.delete_consumer(stream, consumer.name)
    await nc.close()
    return count, size


async def _raw_puller(nats_url: str, streams: list[str]) -> tuple[int, int]:
    """The rebuild's own batch puller, with the messages' bytes counted instead of applied."""
    from services.outcomes.rebuild.reader import FETCH_BATCH, StreamReader

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    count = size = 0
    for stream in streams:
        head = (await js.stream_info(stream)).state.last_seq
        read = 0
        async with StreamReader(nc, stream, 1, FETCH_BATCH) as reader:
            while read < head:
                batch = await reader.next_batch(head - read)
                if batch is None:
                    raise RuntimeError(f"{stream}: nothing after {read} messages")
                for message in batch:
                    size += len(message.data)
                read += len(batch)
        count += read
    await nc.close()
    return count, size


async def _rebuild(nats_url: str, database_url: str, streams: dict[str, str]) -> tuple[int, int]:
    from services.outcomes.rebuild.wiring import rebuild

    progress = await rebuild(nats_url, database_url, streams)
    if progress.phase != "done":
        raise RuntimeError(f"rebuild ended in phase {progress.phase}: {progress.error}")
    return progress.applied, 0


def set_up_child() -> None:
    """A child process's composition root, as ``nephrotrack rebuild``'s: the event types
    registered (without them every message is an unknown type, skipped: a rebuild of nothing),
    the cycle collector paced as in the services (raw and rebuild alike), quiet logs."""
    import logging

    import structlog

    import services.outcomes.rebuild.wiring  # noqa: F401  (imported before the clock starts)
    from contracts import register_all
    from shared.events import registry
    from shared.service import tune_garbage_collector

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    register_all(registry)
    tune_garbage_collector()


def child(mode: str, nats_url: str, streams: dict[str, str], database_url: str, profile: str | None) -> dict:
    """Runs in a fresh process: one measurement, reported as JSON on stdout's last line."""
    set_up_child()

    work = {
        "raw-fetch": lambda: _raw_fetch(nats_url, list(streams.values())),
        "raw-puller": lambda: _raw_puller(nats_url, list(streams.values())),
        "rebuild": lambda: _rebuild(nats_url, database_url, streams),
    }[mode]
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
    cpu, started = _cpu_seconds(), time.perf_counter()
    if profiler:
        profiler.enable()
    count, size = asyncio.run(work())
    if profiler:
        profiler.disable()
    elapsed, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    if profiler and profile:
        import io
        import pstats

        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(60)
        Path(profile).write_text(out.getvalue())
    return {"mode": mode, "events": count, "bytes": size, "seconds": elapsed, "cpu_seconds": cpu,
            "peak_rss_mib": _peak_rss_mib()}


def run_child(
    mode: str, topology: Topology, streams: dict[str, str], database_url: str = "", profile: str | None = None
) -> dict:
    argv = [sys.executable, "-m", "bench.rebuild", "--child", mode, "--nats", NATS_URL,
            "--streams", json.dumps(streams), "--database", database_url]
    if profile:
        argv += ["--profile", profile]
    # The rebuild opens the key bucket of the stack it serves: this topology's.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NEPHROTRACK_SUBJECT_PREFIX": topology.prefix}
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- the benchmark -------------------------------------------------------------------------------------

async def _fresh_database() -> str:
    from shared.database import ensure_database, migrate

    url = f"{POSTGRES}/nt_bench_rebuild_{uuid.uuid4().hex[:8]}"
    await ensure_database(url)
    await asyncio.to_thread(migrate, "outcomes", url)
    return url


async def _projection_size(url: str) -> tuple[int, int, float]:
    """(patients, timeline rows, MiB of facts JSON) of the active generation."""
    from sqlalchemy import text

    from shared.database import create_engine

    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            row = (await connection.execute(text(
                "SELECT (SELECT count(*) FROM outcome_patients), (SELECT count(*) FROM outcome_timeline), "
                "(SELECT coalesce(sum(length(facts_json) + length(egfr_versions_json) + length(report_versions_json)), 0) "
                "FROM outcome_patients)"
            ))).one()
    finally:
        await engine.dispose()
    return int(row[0]), int(row[1]), int(row[2]) / 2**20


async def measure(total: int, profile: str | None = None) -> dict:
    from tests.conftest import drop_database

    topology = Topology(f"bench{uuid.uuid4().hex[:8]}")
    streams = {source: topology.service_stream(source).name for source in workload.SOURCES}
    url = ""
    try:
        counts, publish_seconds, size = await publish(NATS_URL, topology, total, PATIENTS)
        # nats-py's fetch is only the reference for what a plain client gets: slow, so small runs only.
        raw_fetch = await asyncio.to_thread(run_child, "raw-fetch", topology, streams) if total <= RAW_FETCH_UP_TO else None
        raw_puller = await asyncio.to_thread(run_child, "raw-puller", topology, streams)
        url = await _fresh_database()
        rebuilt = await asyncio.to_thread(run_child, "rebuild", topology, streams, url)
        patients, timeline, facts_mib = await _projection_size(url)
        if patients != PATIENTS or not timeline:
            raise RuntimeError(f"the rebuild projected {patients} patients and {timeline} timeline rows")
        profiled = None
        if profile:
            await drop_database(url)
            url = await _fresh_database()
            profiled = await asyncio.to_thread(run_child, "rebuild", topology, streams, url, profile)
        for result in (raw_fetch, raw_puller, rebuilt):
            if result is not None and result["events"] != total:
                raise RuntimeError(f"{result['mode']} read {result['events']} events of {total}")
        return {"total": total, "counts": counts, "publish_seconds": publish_seconds, "bytes": size,
                "raw_fetch": raw_fetch, "raw_puller": raw_puller, "rebuild": rebuilt, "patients": patients,
                "timeline": timeline, "facts_mib": facts_mib, "profiled": profiled}
    finally:
        await delete_streams(NATS_URL, topology)
        if url:
            await drop_database(url)


def _rate(result: dict | None) -> float:
    return result["events"] / result["seconds"] if result else float("nan")


def _best_raw(r: dict) -> float:
    return max(_rate(x) for x in (r["raw_fetch"], r["raw_puller"]) if x)


def _cpu_rate(result: dict) -> float:
    return result["events"] / result["cpu_seconds"] if result["cpu_seconds"] else float("nan")


def _profile_top(path: str, lines: int = 10) -> list[str]:
    text = Path(path).read_text().splitlines()
    start = next((i for i, line in enumerate(text) if line.strip().startswith("ncalls")), None)
    if start is None:
        return []
    return [line.rstrip() for line in text[start : start + 1 + lines]]


async def run(tmp: str) -> str:
    profile = os.environ.get("NEPHROTRACK_BENCH_REBUILD_PROFILE")
    load_before = os.getloadavg()[0]
    results = []
    for total in SIZES:
        print(f"  rebuild: {total:,} events …", flush=True)
        results.append(await measure(total, profile if total == max(SIZES) else None))
    lines = [
        f"### Outcomes rebuild from JetStream vs the raw read rate ({PATIENTS:,} patients; "
        + ("payloads sealed with the patients' keys, as the services publish them" if SEALED else
           "payloads in clear (NEPHROTRACK_BENCH_REBUILD_SEALED=0), unlike the services' own")
        + f"; load average "
        f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores)",
        "",
        "Raw = the same streams read by a fresh process with no processing. Rebuild = "
        "`services.outcomes.rebuild.wiring.rebuild` into a fresh PostgreSQL database (decode, project, write the "
        "timeline and patients, checkpoint, swap). events/s is wall clock; per CPU-s divides by the "
        "process's own CPU time (user+sys), which the machine's other load does not inflate.",
        "",
        "| events | published/s | raw, nats-py fetch: events/s (≤ 100k only) | raw, batch puller: events/s (per CPU-s) | "
        "rebuild: events/s (per CPU-s) | rebuild ÷ best raw | peak RSS raw / rebuild | projection |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        best = _best_raw(r)
        fetch = f"{_rate(r['raw_fetch']):,.0f}" if r["raw_fetch"] else "–"
        lines.append(
            f"| {r['total']:,} | {r['total'] / r['publish_seconds']:,.0f} | {fetch} | "
            f"{_rate(r['raw_puller']):,.0f} ({_cpu_rate(r['raw_puller']):,.0f}) | "
            f"{_rate(r['rebuild']):,.0f} ({_cpu_rate(r['rebuild']):,.0f}) | {_rate(r['rebuild']) / best:.2f} | "
            f"{r['raw_puller']['peak_rss_mib']:.0f} / {r['rebuild']['peak_rss_mib']:.0f} MiB | "
            f"{r['patients']:,} patients, {r['timeline']:,} timeline rows, facts {r['facts_mib']:.0f} MiB |"
        )
    big, small = results[-1], results[0]
    best = _best_raw(big)
    rate, ratio = _rate(big["rebuild"]), _rate(big["rebuild"]) / best
    verdict = "met" if rate >= TARGET_RATE and ratio >= TARGET_RATIO else "NOT met"
    cpu_ratio = _cpu_rate(big["rebuild"]) / _cpu_rate(big["raw_puller"])
    lines += [
        "",
        f"Issue 5 target (≥ {TARGET_RATE:,} events/s and ≥ {TARGET_RATIO:.0%} of the raw rate) at "
        f"{big['total']:,} events: **{verdict}** — {rate:,.0f} events/s, {ratio:.0%} of raw by wall clock, "
        f"{cpu_ratio:.0%} by CPU time (per CPU-s: rebuild {_cpu_rate(big['rebuild']):,.0f}, raw "
        f"{_cpu_rate(big['raw_puller']):,.0f}). Where the time goes: docs/performance.md.",
    ]
    if len(results) > 1:
        growth = big["rebuild"]["peak_rss_mib"] - small["rebuild"]["peak_rss_mib"]
        facts = big["facts_mib"] - small["facts_mib"]
        share = growth / small["rebuild"]["peak_rss_mib"]
        lines.append(
            f"Memory: rebuild peak RSS {small['rebuild']['peak_rss_mib']:.0f} MiB at {small['total']:,} events, "
            f"{big['rebuild']['peak_rss_mib']:.0f} MiB at {big['total']:,} ({growth:+.0f} MiB, {share:+.0%}), while the "
            f"facts of the projection it wrote grew by {facts:+.0f} MiB as JSON: "
            f"**{'flat' if share <= FLAT_WITHIN else 'NOT flat'}** (within {FLAT_WITHIN:.0%} of the smaller run's peak). "
            "The log is streamed (timeline rows are held for at most two writes, the raw reader stays at "
            f"{big['raw_puller']['peak_rss_mib']:.0f} MiB) and the patients' lab results wait in a scratch file "
            "between checkpoints (services/outcomes/rebuild/spill.py): what is held is per patient and per batch."
        )
    if big["profiled"] and profile:
        lines += ["", f"cProfile of the {big['total']:,}-event rebuild (top by own time; full profile in `{profile}`):",
                  "", "```", *_profile_top(profile), "```"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True)
    parser.add_argument("--nats", required=True)
    parser.add_argument("--streams", required=True)
    parser.add_argument("--database", default="")
    parser.add_argument("--profile")
    args = parser.parse_args()
    print(json.dumps(child(args.child, args.nats, json.loads(args.streams), args.database, args.profile)))


if __name__ == "__main__":
    main()
