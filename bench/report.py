"""Writing results to bench/RESULTS.md with the machine, date and versions."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, {platform.system()} {platform.release()}"


def versions() -> str:
    names = ["sqlalchemy", "asyncpg", "aiosqlite", "nats-py", "faststream", "pydantic"]
    found = [f"{name} {version(name)}" for name in names]
    try:
        server = subprocess.run(["psql", "--version"], capture_output=True, text=True, check=False).stdout.strip()
        found.append(server)
    except OSError:
        pass
    return f"Python {platform.python_version()}; " + ", ".join(found)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


PREAMBLE = "# Benchmark results\n\nNewest run first. Produced by `make bench` (`python -m bench [module …]`).\n"


def write(sections: list[str]) -> None:
    header = f"## Run of {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\nMachine: {machine()}  \nVersions: {versions()}\n"
    previous = RESULTS.read_text() if RESULTS.exists() else ""
    runs = previous[previous.find("## Run of") :] if "## Run of" in previous else ""
    RESULTS.write_text(f"{PREAMBLE}\n{header}\n" + "\n\n".join(sections) + "\n\n" + runs)
