"""Shared helpers for the deployment-artefact tests (docker-compose.yml and deploy/).

Checks that need a real tool (promtool, nats-server, docker compose) run it when it is installed
and otherwise skip *loudly*: the reason is repeated in a banner at the end of the run, so a green
run that validated less than usual cannot go unnoticed.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the deployment files (pip install pyyaml)")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SERVICES = ("outcomes", "enrollment", "pulse", "cells", "labs")
CONTRACT_PORTS = {"outcomes": 8000, "enrollment": 8001, "pulse": 8002, "cells": 8003, "labs": 8004}
MLLP_PORT = 2575

_LOUD_SKIPS: list[str] = []


def skip_loudly(reason: str) -> None:
    _LOUD_SKIPS.append(reason)
    pytest.skip(reason)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _LOUD_SKIPS:
        return
    terminalreporter.section("deployment checks NOT run (tool missing)", sep="!", red=True, bold=True)
    for reason in dict.fromkeys(_LOUD_SKIPS):
        terminalreporter.line(f"  SKIPPED: {' '.join(reason.split())}", red=True)


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def find_tool(name: str) -> str | None:
    """A tool next to this interpreter (the venv's nats-server) or on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


# --- compose normalisation ------------------------------------------------------------------------
def as_argv(command: Any) -> list[str]:
    import shlex

    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in env)
        return {key: value for key, value in pairs}
    return {key: (None if value is None else str(value)) for key, value in env.items()}


def published_ports(service: dict[str, Any]) -> set[tuple[int, int]]:
    """(published, container) pairs, from short ("[ip:]host:container[/proto]") or long syntax."""
    pairs: set[tuple[int, int]] = set()
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            pairs.add((int(entry["published"]), int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")
        if len(parts) == 1:
            continue  # container port only: published on a random host port
        pairs.add((int(parts[-2]), int(parts[-1])))
    return pairs


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def bind_sources(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of every bind mount of a service."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            if entry.get("type") == "bind":
                mounts.append((entry["source"], entry["target"]))
            continue
        source, _, rest = str(entry).partition(":")
        if source.startswith((".", "/", "~")):
            mounts.append((source, rest.split(":")[0]))
    return mounts


# --- metric names -----------------------------------------------------------------------------------
# Named in the operations brief but (not yet) in shared/metrics.py: lab ingestion, protocol
# deviations and projections are instrumented by their own services.
EXTRA_METRICS = {
    "nephrotrack_lab_results_accepted_total",
    "nephrotrack_lab_results_rejected_total",
    "nephrotrack_protocol_deviations_total",
    "nephrotrack_projection_lag_seconds",
    "nephrotrack_projection_lag_events",
}
# Series Prometheus itself produces: scrape health, blackbox /readyz probes, alert state.
INFRASTRUCTURE_METRICS = {"up", "probe_success", "ALERTS"}

_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def catalogue() -> dict[str, set[str]]:
    """shared/metrics.py: family name -> the sample names Prometheus will store for it."""
    from prometheus_client.metrics import MetricWrapperBase

    import shared.metrics as module

    families: dict[str, set[str]] = {}
    for value in vars(module).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                families[family.name] = {family.name + suffix for suffix in _SAMPLE_SUFFIXES[family.type]}
    return families


def known_metric_names() -> set[str]:
    names = set(EXTRA_METRICS) | INFRASTRUCTURE_METRICS
    for samples in catalogue().values():
        names |= samples
    return names


_PROMQL_WORDS = {"and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring",
                 "group_left", "group_right", "inf", "nan", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (good enough for dashboards and alert rules)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                    # string literals
    text = re.sub(r"\{[^{}]*\}", " ", text)                               # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)                               # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)                              # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        following = text[match.end():].lstrip()[:1]
        if following == "(" or word.lower() in _PROMQL_WORDS:
            continue  # a function, an aggregation or a keyword
        names.add(word)
    return names
