"""``python -m bench``: run every benchmark and prepend the results to bench/RESULTS.md."""

from __future__ import annotations

import asyncio
import importlib
import sys
import tempfile

from bench import report

BENCHMARKS = ["bench.event_store", "bench.event_store_peer", "bench.labs_ingest", "bench.rebuild", "bench.rebuild_steps", "bench.analyst_queries"]


async def main(names: list[str]) -> None:
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            module = importlib.import_module(name)
            print(f"running {name} …", flush=True)
            section = await module.run(tmp)
            print(section, flush=True)
            sections.append(section)
    sections.append(f"Peak RSS of the benchmark process: {report.peak_rss_mib():.0f} MiB")
    report.write(sections)


if __name__ == "__main__":
    asyncio.run(main([f"bench.{n}" for n in sys.argv[1:]] or BENCHMARKS))
