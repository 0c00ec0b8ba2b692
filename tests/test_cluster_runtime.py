"""``nephrotrack cluster`` (issue 19: the cluster on one machine with one command, no Docker):
three nats-server nodes with routes and the deploy/nats accounts, every stream in three
replicas, two replicas of each service on SQLite under the var directory — all ten answer
``/readyz``, ``nephrotrack demo`` (finding the cluster through ``<var>/runtime.json`` alone)
loads the study and the second outcomes replica shows its cohorts, and Ctrl-C stops every process."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nats
import pytest

from nephrotrack import running
from nephrotrack.runtime import local_broker_url
from shared.broker import nats_connect_options
from shared.settings import SERVICES, RuntimeSettings
from tests.conftest import free_port
from tests.stack import ROOT
from tests.test_runtime import _bearer, _closed, _listener, _ready, _run_env, _shell_env, _wait

pytestmark = pytest.mark.slow


def _descendants(root: int) -> set[int]:
    """Every living process below ``root`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


async def _stream_replicas(var: Path) -> dict[str, int]:
    """``num_replicas`` of every stream, read as the operator user with the recorded credentials."""
    url = local_broker_url("operator", RuntimeSettings(var_dir=var))
    client = await nats.connect(**nats_connect_options(url, connect_timeout=5, max_reconnect_attempts=0))
    try:
        return {info.config.name: info.config.num_replicas for info in await client.jetstream().streams_info()}
    finally:
        await client.close()


def test_cluster_starts_three_nodes_and_two_replicas_of_each_service_and_stops_them_all(tmp_path: Path) -> None:
    var = tmp_path / "var"
    env = _run_env(var, nats_port=free_port())
    log = tmp_path / "cluster.log"
    started = time.monotonic()
    supervisor = subprocess.Popen([sys.executable, "-m", "nephrotrack.cli", "cluster"], env=env, cwd=ROOT,
                                  stdout=log.open("wb"), stderr=subprocess.STDOUT)
    children: set[int] = set()
    try:
        assert _wait(lambda: running.read_running(var) is not None, 30), log.read_text()
        stack = running.read_running(var)
        assert stack is not None
        urls = [url for service in SERVICES for url in stack.replicas[service]]
        assert len(urls) == 10 and len(set(urls)) == 10, stack.replicas
        assert [stack.replicas[service][0] for service in SERVICES] == \
            [f"http://127.0.0.1:{env[f'NEPHROTRACK_{service.upper()}_PORT']}" for service in SERVICES]
        assert len(stack.nats_ports) == 3 and stack.nats_port == int(env["NEPHROTRACK_NATS_PORT"])
        ports = [int(url.rsplit(":", 1)[1]) for url in urls]
        # About 12 s on a quiet two-core machine (the whole test about 15 s); the wait is longer
        # because a machine busy with other work may take several times that to start 13 processes.
        assert _wait(lambda: all(_ready(port, var) for port in ports), 90), log.read_text()
        print(f"10 replicas ready after {time.monotonic() - started:.1f} s")
        children = _descendants(supervisor.pid)
        assert len(children) == 13, f"3 nodes + 10 replicas expected, found {len(children)}"

        replicas = asyncio.run(_stream_replicas(var))
        assert replicas and all(count == 3 for count in replicas.values()), replicas
        assert "KV_nephrotrack_subject_keys" in replicas, replicas

        demo = subprocess.run([sys.executable, "-m", "nephrotrack.cli", "demo", "--timeout", "150"],
                              env=_shell_env(NEPHROTRACK_VAR=str(var)), cwd=ROOT,  # runtime.json alone
                              capture_output=True, text=True, timeout=200)
        # About 10-15 s here; the wait is longer because once, on a busy machine, one enrollment
        # event reached outcomes only after more than 60 s (the consumers' ack_wait; not explained yet).
        assert demo.returncode == 0, demo.stdout + demo.stderr
        print(f"demo done after {time.monotonic() - started:.1f} s")
        cohorts = httpx.get(f"{stack.replicas['outcomes'][1]}/v1/cohorts", headers=_bearer(var, "analyst")).json()
        assert {c["group"]: (c["n"], c["mean_post_egfr"]) for c in cohorts} == \
            {"A": (7, pytest.approx(39.0)), "B": (3, pytest.approx(106.0)), "control": (1, pytest.approx(23.1))}
    finally:
        supervisor.send_signal(signal.SIGINT)
        code = supervisor.wait(40)
    assert code == 0, log.read_text()
    assert not [pid for pid in children if _alive(pid)], "processes left running"
    assert all(_closed(port) for port in [*ports, *stack.nats_ports])
    assert running.read_running(var) is None


def _alive(pid: int) -> bool:
    """Neither gone nor a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_cluster_refuses_a_taken_port_naming_it_before_anything_starts(tmp_path: Path) -> None:
    var = tmp_path / "var"
    env = _run_env(var, nats_port=free_port())
    with _listener() as taken:
        env["NEPHROTRACK_LABS_PORT"] = str(taken.getsockname()[1])
        result = subprocess.run([sys.executable, "-m", "nephrotrack.cli", "cluster"], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"nephrotrack cluster cannot start:\n  port {env['NEPHROTRACK_LABS_PORT']} (labs HTTP) is taken: " \
           "set NEPHROTRACK_LABS_PORT to a free port" in result.stderr, result.stderr
    assert not (var / "logs" / "nats-1.log").exists(), "nothing may start when a port is taken"
