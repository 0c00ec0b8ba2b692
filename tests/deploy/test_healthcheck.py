"""deploy/healthcheck.py, the image's HEALTHCHECK and compose's readiness probe."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import free_port
from tests.deploy.conftest import CONTRACT_PORTS, DEPLOY

SCRIPT = DEPLOY / "healthcheck.py"


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nephrotrack_healthcheck", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Probe(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        status = {"/healthz": 200, "/readyz": 503}.get(self.path, 404)
        body = b'{"status": "unavailable", "problems": {"broker": "not connected"}}' if status == 503 else b"{}"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def service_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Probe)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # As Docker runs it: a fresh interpreter, the script by path, only the standard library.
    environ = {k: v for k, v in os.environ.items() if k not in ("NEPHROTRACK_API_KEYS", "NEPHROTRACK_OPERATOR_KEY")}
    return subprocess.run([sys.executable, "-S", str(SCRIPT), *args], capture_output=True, text=True, timeout=30,
                          env={**environ, **(env or {})})


def test_exit_status_follows_the_probe(service_port: int) -> None:
    assert _run(f"http://127.0.0.1:{service_port}/healthz").returncode == 0
    not_ready = _run(f"http://127.0.0.1:{service_port}/readyz")
    assert not_ready.returncode == 1
    assert "503" in not_ready.stderr and "broker" in not_ready.stderr


class _GuardedProbe(_Probe):
    """/readyz answers 200 only to the operator key, as a service does."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/readyz" and self.headers.get("Authorization") != "Bearer op-key-0123456789":
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_readyz_is_probed_with_the_operator_key() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GuardedProbe)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/readyz"
    try:
        keys = {"NEPHROTRACK_API_KEYS": "staff:s-key-0123456789,operator:op-key-0123456789"}
        assert _run(url, env=keys).returncode == 0
        assert _run(url, env={"NEPHROTRACK_OPERATOR_KEY": "op-key-0123456789"}).returncode == 0
        refused = _run(url, env={"NEPHROTRACK_API_KEYS": "staff:s-key-0123456789"})
        assert refused.returncode == 1 and "401" in refused.stderr
    finally:
        server.shutdown()


def test_unreachable_service_is_unhealthy() -> None:
    result = _run(f"http://127.0.0.1:{free_port()}/healthz")  # nothing listens there
    assert result.returncode == 1 and "unreachable" in result.stderr


def _fake_proc(root: Path, commands: dict[int, list[str]]) -> Path:
    for pid, argv in commands.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cmdline").write_bytes(b"\0".join(arg.encode() for arg in argv) + b"\0")
    (root / "self").mkdir()
    return root


@pytest.mark.parametrize("name", list(CONTRACT_PORTS))
def test_finds_the_service_of_the_container(healthcheck: ModuleType, tmp_path: Path, name: str) -> None:
    proc = _fake_proc(tmp_path, {1: ["/sbin/docker-init", "--", "python", "-m", f"services.{name}"],
                                 7: ["python", "-m", f"services.{name}"], 30: ["python", "/opt/nephrotrack/healthcheck.py"]})
    assert healthcheck.detect_service(proc) == name
    assert healthcheck.probe_url("/readyz", proc) == f"http://127.0.0.1:{CONTRACT_PORTS[name]}/readyz"


def test_port_override_and_ambiguity(healthcheck: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEPHROTRACK_LABS_PORT", "9104")
    proc = _fake_proc(tmp_path / "one", {1: ["python", "-m", "services.labs"]})
    assert healthcheck.probe_url("/healthz", proc) == "http://127.0.0.1:9104/healthz"
    none = _fake_proc(tmp_path / "none", {1: ["nephrotrack", "migrate"]})
    with pytest.raises(SystemExit, match="no single nephrotrack service"):
        healthcheck.probe_url("/healthz", none)
    two = _fake_proc(tmp_path / "two", {1: ["python", "-m", "services.labs"], 2: ["python", "-m", "services.pulse"]})
    assert healthcheck.detect_service(two) is None
    assert healthcheck.probe_url("http://10.0.0.1:1/x", none) == "http://10.0.0.1:1/x"


def test_default_ports_match_the_contract(healthcheck: ModuleType) -> None:
    from shared.settings import DEFAULT_PORTS

    assert healthcheck.DEFAULT_PORTS == DEFAULT_PORTS == CONTRACT_PORTS
