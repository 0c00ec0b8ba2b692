"""``nephrotrack run`` secures the embedded default: with ``NEPHROTRACK_API_KEYS`` unset it writes one
key per role and the lab systems' NATS credentials to ``<var>/api-keys.env`` (0600) and reuses them
on restart; its NATS runs the deployment's accounts (deploy/nats), where the lab credentials may
publish ``labs.results`` and nothing else, and nobody connects anonymously; the services work
through all of it, and their events name the key that acted."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.errors import NoServersError

from nephrotrack.credentials import (
    NATS_USERS,
    ensure_values,
    nats_password_variable,
    read_env_file,
    write_private,
)
from shared.auth import fingerprint
from shared.broker import LAB_RESULTS_SUBJECT
from shared.settings import SERVICES
from tests.conftest import free_port
from tests.stack import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

ENROLL = {
    "subject_id": "IGA-A-001", "sex": "F", "age_years": 58, "weight_kg": 61.5, "group": "A",
    "enrolled_on": "2014-03-02", "baseline_egfr": 27.0, "lee_grade": "IV",
}
KEY_NAMES = ("NEPHROTRACK_STAFF_KEY", "NEPHROTRACK_ANALYST_KEY", "NEPHROTRACK_OPERATOR_KEY")


class Run:
    """One `nephrotrack run` on free ports with its own var directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.var = tmp_path / "var"
        self.ports = {service: free_port() for service in SERVICES}
        self.nats_port = free_port()
        self.log = tmp_path / "run.log"
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith(("DATABASE_URL_", "NATS_", "NEPHROTRACK_"))}
        self.env.update({
            "NEPHROTRACK_VAR": str(self.var), "NEPHROTRACK_NATS_PORT": str(self.nats_port),
            "NEPHROTRACK_MLLP_PORT": str(free_port()),
            **{f"NEPHROTRACK_{s.upper()}_PORT": str(p) for s, p in self.ports.items()},
        })
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "nephrotrack.cli", "run"], env=self.env, cwd=ROOT,
                                        stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        assert _wait(lambda: all(self.ready(s) for s in SERVICES), 120), self.log.read_text()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            assert self.process.wait(30) == 0

    @property
    def keys(self) -> dict[str, str]:
        return read_env_file(self.var / "api-keys.env")

    def bearer(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[f'NEPHROTRACK_{role.upper()}_KEY']}"}

    def url(self, service: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}{path}"

    def ready(self, service: str) -> bool:
        try:
            return httpx.get(self.url(service, "/readyz"), headers=self.bearer("operator"), timeout=1).status_code == 200
        except (httpx.HTTPError, KeyError):
            return False


def _wait(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    stack = Run(tmp_path)
    try:
        yield stack
    finally:
        stack.stop()


def _private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) == 0o600


def test_run_generates_keys_reuses_them_and_the_lab_may_only_publish_lab_results(run: Run) -> None:
    run.start()

    # The keys file: the contract's three keys, the lab key and the lab NATS credentials, 0600.
    keys = run.keys
    assert set(KEY_NAMES) | {"NEPHROTRACK_LAB_KEY", "NEPHROTRACK_LAB_NATS_USER", "NEPHROTRACK_LAB_NATS_PASSWORD"} <= set(keys)
    assert len({keys[name] for name in (*KEY_NAMES, "NEPHROTRACK_LAB_KEY")}) == 4, "one distinct key per role"
    assert all(len(keys[name]) >= 32 for name in KEY_NAMES)
    assert keys["NEPHROTRACK_LAB_NATS_USER"] == "lab"
    assert _private(run.var / "api-keys.env") and _private(run.var / "nats-credentials.env")
    passwords = read_env_file(run.var / "nats-credentials.env")
    assert set(passwords) == {nats_password_variable(user) for user in NATS_USERS}
    assert passwords["NATS_LAB_PASSWORD"] == keys["NEPHROTRACK_LAB_NATS_PASSWORD"]
    for secret in (*keys.values(), *passwords.values()):
        if len(secret) > 8:
            assert secret not in run.log.read_text(), "a secret was printed"

    # HTTP: the roles as in production.
    assert httpx.get(run.url("enrollment", "/healthz")).status_code == 200
    assert httpx.get(run.url("enrollment", "/readyz")).status_code == 401
    assert httpx.post(run.url("enrollment", "/v1/patients"), json=ENROLL, headers=run.bearer("analyst")).status_code == 403
    created = httpx.post(run.url("enrollment", "/v1/patients"), json=ENROLL, headers=run.bearer("staff"))
    assert created.status_code == 201, created.text
    assert httpx.get(run.url("outcomes", "/v1/cohorts"), headers=run.bearer("staff")).status_code == 403

    def counted() -> bool:
        cohorts = httpx.get(run.url("outcomes", "/v1/cohorts"), headers=run.bearer("analyst")).json()
        return any(c["group"] == "A" and c["n"] == 1 for c in cohorts)

    assert _wait(counted, 20), "the enrollment never reached outcomes over the authenticated NATS"
    trail = httpx.get(run.url("enrollment", "/v1/audit"), headers=run.bearer("operator")).json()
    assert trail[0]["actor"] == f"staff:{fingerprint(keys['NEPHROTRACK_STAFF_KEY'])}"

    # NATS with the deployment's accounts.
    asyncio.run(_check_nats(run.nats_port, keys, passwords))
    violations = [line for line in (run.var / "logs" / "nats.log").read_text().splitlines()
                  if ("Publish Violation" in line or "Subscription Violation" in line) and "user:lab\"" not in line]
    assert not violations, f"a service hit a permission it lacks: {violations[:3]}"

    # Restart: the same keys and passwords, and the old staff key still works.
    before = ((run.var / "api-keys.env").read_text(), (run.var / "nats-credentials.env").read_text())
    run.stop()
    run.start()
    assert ((run.var / "api-keys.env").read_text(), (run.var / "nats-credentials.env").read_text()) == before
    again = httpx.post(run.url("enrollment", "/v1/patients"), json={**ENROLL, "subject_id": "IGA-A-002"},
                       headers={"Authorization": f"Bearer {keys['NEPHROTRACK_STAFF_KEY']}"})
    assert again.status_code == 201, again.text


async def _check_nats(port: int, keys: dict[str, str], passwords: dict[str, str]) -> None:
    url = f"nats://127.0.0.1:{port}"
    errors: list[str] = []

    async def on_error(error: Exception) -> None:
        errors.append(str(error).lower())

    lab = await nats.connect(url, user=keys["NEPHROTRACK_LAB_NATS_USER"], password=keys["NEPHROTRACK_LAB_NATS_PASSWORD"],
                             error_cb=on_error, allow_reconnect=False, connect_timeout=3)
    try:
        js = lab.jetstream(timeout=3)
        ack = await js.publish(LAB_RESULTS_SUBJECT, b'{"message_id": "sec-1"}', headers={"Nats-Msg-Id": "sec-1"})
        assert ack.stream == "LABS_RESULTS" and ack.seq >= 1

        async def refused(operation: Any) -> str:
            before = len(errors)
            task = asyncio.ensure_future(operation)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and len(errors) == before:
                await asyncio.sleep(0.02)
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001 - cancelled or refused: both fine here
                pass
            violations = [e for e in errors[before:] if "permissions violation" in e]
            assert violations, "expected a permissions violation, the operation was allowed"
            return violations[-1]

        assert "nephrotrack.enrollment" in await refused(js.publish("nephrotrack.enrollment.PatientEnrolled", b"{}"))
        assert "nephrotrack.enrollment" in await refused(lab.publish("nephrotrack.enrollment.PatientEnrolled", b"{}"))
        assert "nephrotrack.>" in await refused(lab.subscribe("nephrotrack.>"))
        assert LAB_RESULTS_SUBJECT in await refused(lab.subscribe(LAB_RESULTS_SUBJECT))
    finally:
        await lab.close()

    # No anonymous access; a wrong password and another user's password are refused too.
    for credentials in ({}, {"user": "lab", "password": "wrong"},
                        {"user": "lab", "password": passwords["NATS_ENROLLMENT_PASSWORD"]}):
        with pytest.raises((NoServersError, nats.errors.Error, OSError)):
            await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, **credentials)
    # Each service's own user works (what its NATS_URL carries).
    enrollment = await nats.connect(url, user="enrollment", password=passwords["NATS_ENROLLMENT_PASSWORD"],
                                    allow_reconnect=False, connect_timeout=3)
    await enrollment.close()


def test_given_keys_are_used_and_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NEPHROTRACK_API_KEYS set: no HTTP keys are generated (the lab NATS credentials still are);
    a malformed one stops `nephrotrack run` before anything starts, naming the entry, not the key."""
    bad = Run(tmp_path)
    bad.env["NEPHROTRACK_API_KEYS"] = "staff:fine-key-0123456789,operatr:s3cret-0123456789"
    result = subprocess.run([sys.executable, "-m", "nephrotrack.cli", "run"], env=bad.env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "entry 2: unknown role 'operatr'" in result.stderr + result.stdout
    assert "s3cret" not in result.stderr + result.stdout
    assert not (bad.var / "logs" / "nats.log").exists(), "nothing may start with a bad key specification"

    from nephrotrack.runtime import Supervisor
    from shared.settings import RuntimeSettings

    given = "staff:given-staff-key-0123456789,operator:given-operator-key-0123456789"
    monkeypatch.setenv("NEPHROTRACK_VAR", str(tmp_path / "given"))
    monkeypatch.setenv("NEPHROTRACK_API_KEYS", given)
    monkeypatch.setenv("NATS_SOMEONE_PASSWORD", "not-for-services")
    monkeypatch.delenv("NATS_URL", raising=False)
    monkeypatch.delenv("NEPHROTRACK_SUBJECT_PREFIX", raising=False)
    supervisor = Supervisor(RuntimeSettings())
    supervisor.prepare_credentials()
    written = read_env_file(tmp_path / "given" / "api-keys.env")
    assert not any(name.endswith("_KEY") for name in written), "given keys must not be replaced by generated ones"
    assert written["NEPHROTRACK_LAB_NATS_USER"] == "lab" and written["NEPHROTRACK_LAB_NATS_PASSWORD"]
    child = supervisor.child_env("labs")
    assert child["NEPHROTRACK_API_KEYS"] == given
    password = read_env_file(tmp_path / "given" / "nats-credentials.env")["NATS_LABS_PASSWORD"]
    assert child["NATS_URL"] == f"nats://labs:{password}@127.0.0.1:{supervisor.settings.nats_port}"
    assert not any(name.startswith("NATS_") and name.endswith("_PASSWORD") for name in child), \
        "a service must not see NATS passwords other than its own (in its NATS_URL)"


def test_secret_files_are_private_and_values_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "secrets.env"
    old_umask = os.umask(0o000)
    try:
        first = ensure_values(path, "header", [("A_KEY", "key"), ("A_PASSWORD", "password"), ("A_USER", "user:lab")])
    finally:
        os.umask(old_umask)
    assert _private(path)
    assert first["A_USER"] == "lab" and len(first["A_PASSWORD"]) == 48
    path.chmod(0o644)
    second = ensure_values(path, "header", [("A_KEY", "key"), ("A_PASSWORD", "password"), ("B_KEY", "key")])
    assert _private(path), "permissions are repaired on reuse"
    assert {k: second[k] for k in first} == first and second["B_KEY"]
    write_private(path, "x", {"export C": "'quoted'"})
    assert read_env_file(path) == {"C": "quoted"}
