"""docker-compose.yml (and its overrides in deploy/) against the public contract.

Parsed with PyYAML; ``docker compose config -q`` also runs when the Compose plugin is installed
(it only parses and interpolates, no engine needed).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from tests.deploy.conftest import (
    CONTRACT_PORTS,
    DEPLOY,
    MLLP_PORT,
    ROOT,
    SERVICES,
    as_argv,
    bind_sources,
    depends_on,
    environment,
    find_tool,
    load_yaml,
    published_ports,
    skip_loudly,
)

COMPOSE_FILE = ROOT / "docker-compose.yml"
NATS_AUTH_OVERRIDE = DEPLOY / "compose.nats-auth.yml"
CLUSTER_OVERRIDE = DEPLOY / "nats" / "cluster" / "compose.yml"
ALL_COMPOSE_FILES = [COMPOSE_FILE, NATS_AUTH_OVERRIDE, CLUSTER_OVERRIDE]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def test_compose_spec_without_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "the compose spec has no `version:`; Compose warns it is obsolete"
    assert compose.get("name") == "nephrotrack"


@pytest.mark.parametrize("name", SERVICES)
def test_service_runs_its_module_from_the_shared_image(services: dict[str, Any], name: str) -> None:
    service = services[name]
    assert as_argv(service["command"]) == ["python", "-m", f"services.{name}"]
    assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    assert service.get("image") == services["migrate"].get("image"), "one image for every service and migrate"


@pytest.mark.parametrize("name", SERVICES)
def test_service_listens_on_its_contract_port_and_publishes_none(services: dict[str, Any], name: str) -> None:
    """Replicas cannot share a host port: a service publishes none (``--scale`` works), the front
    door publishes the contract's."""
    env = environment(services[name])
    assert env[f"NEPHROTRACK_{name.upper()}_PORT"] == str(CONTRACT_PORTS[name])
    assert not services[name].get("ports"), f"{name} publishes a host port: it could not run as several replicas"
    assert "container_name" not in services[name]


def test_labs_listens_for_mllp(services: dict[str, Any]) -> None:
    assert environment(services["labs"])["NEPHROTRACK_MLLP_PORT"] == str(MLLP_PORT)


def _haproxy() -> dict[str, dict[str, list[str]]]:
    """deploy/haproxy/haproxy.cfg as section -> its lines (enough to follow frontends to backends)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: list[str] = []
    for raw in (DEPLOY / "haproxy" / "haproxy.cfg").read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line.startswith(" "):
            kind, _, name = line.partition(" ")
            current = sections.setdefault(kind, {}).setdefault(name.split(" ")[0], [])
        else:
            current.append(line.strip())
    return sections


def test_the_front_door_publishes_every_contract_port_and_spreads_it_over_the_replicas(
    services: dict[str, Any],
) -> None:
    door = services["front-door"]
    assert str(door["image"]).startswith("haproxy:")
    mounts = {target: source for source, target in bind_sources(door)}
    assert (ROOT / mounts["/usr/local/etc/haproxy/haproxy.cfg"]).resolve() == DEPLOY / "haproxy" / "haproxy.cfg"
    wanted = {**{port: (name, port) for name, port in CONTRACT_PORTS.items()}, MLLP_PORT: ("labs", MLLP_PORT)}
    assert published_ports(door) == {(port, port) for port in wanted}
    config = _haproxy()
    assert "nameserver dns 127.0.0.11:53" in config["resolvers"]["docker"], "Docker's DNS finds the replicas"
    routed = {}
    for frontend in config["frontend"].values():
        (bind,) = [line for line in frontend if line.startswith("bind ")]
        (backend,) = [line.split()[1] for line in frontend if line.startswith("default_backend ")]
        (template,) = [line.split() for line in config["backend"][backend] if line.startswith("server-template ")]
        host, port = template[3].split(":")
        routed[int(bind.rsplit(":", 1)[1])] = (host, int(port))
    assert routed == wanted
    assert set(depends_on(door)) == set(SERVICES)


@pytest.mark.parametrize("name", SERVICES)
def test_service_environment(services: dict[str, Any], name: str) -> None:
    env = environment(services[name])
    assert env["NATS_URL"] == "nats://nats:4222"
    assert env["NEPHROTRACK_HOST"] == "0.0.0.0", "in a container the service must listen on every interface"
    url = make_url(env[f"DATABASE_URL_{name.upper()}"])
    assert url.drivername == "postgresql+asyncpg"
    assert (url.host, url.port) == ("postgres", 5432)
    assert url.database == f"nephrotrack_{name}", "each service has its own database"
    others = {key for key in env if key.startswith("DATABASE_URL_")} - {f"DATABASE_URL_{name.upper()}"}
    assert not others, f"{name} must not be given another service's database: {others}"


@pytest.mark.parametrize("name", SERVICES)
def test_service_starts_after_migrations_and_a_healthy_broker(services: dict[str, Any], name: str) -> None:
    deps = depends_on(services[name])
    assert deps.get("migrate") == "service_completed_successfully"
    assert deps.get("nats") == "service_healthy"


@pytest.mark.parametrize("name", SERVICES)
def test_service_healthcheck_is_its_own_readyz(services: dict[str, Any], name: str) -> None:
    check = services[name]["healthcheck"]
    argv = as_argv(check["test"])
    assert argv[0] == "CMD"
    assert f"http://127.0.0.1:{CONTRACT_PORTS[name]}/readyz" in argv
    assert "/opt/nephrotrack/healthcheck.py" in argv


def test_migrate_is_a_one_shot_over_every_database(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    assert as_argv(migrate["command"]) == ["nephrotrack", "migrate"]
    assert depends_on(migrate) == {"postgres": "service_healthy"}
    assert migrate.get("restart", "no") == "no"
    env = environment(migrate)
    for name in SERVICES:
        url = make_url(env[f"DATABASE_URL_{name.upper()}"])
        assert (url.host, url.database) == ("postgres", f"nephrotrack_{name}")
        # Same URL as the service itself uses, or migrate would prepare another database.
        assert env[f"DATABASE_URL_{name.upper()}"] == environment(services[name])[f"DATABASE_URL_{name.upper()}"]


def test_nats_runs_jetstream_on_a_named_volume(compose: dict[str, Any], services: dict[str, Any]) -> None:
    nats = services["nats"]
    assert str(nats["image"]).startswith("nats:2.10")
    argv = as_argv(nats["command"])
    assert "-js" in argv
    store = argv[argv.index("-sd") + 1]
    mounts = {target: source for source, target in (str(v).split(":")[:2] for v in nats["volumes"])}
    assert store in mounts, f"JetStream store {store} is not on a volume: {mounts}"
    assert mounts[store] in compose["volumes"], "the JetStream store must be a named (persistent) volume"
    assert argv[argv.index("-m") + 1] == "8222"
    assert 4222 in {container for _, container in published_ports(nats)}
    assert 8222 in {container for _, container in published_ports(nats)}
    assert "8222/healthz" in " ".join(as_argv(nats["healthcheck"]["test"]))


def test_postgres_volume_and_init_script(compose: dict[str, Any], services: dict[str, Any]) -> None:
    postgres = services["postgres"]
    assert str(postgres["image"]).startswith("postgres:16")
    mounts = {target: source for source, target in (str(v).split(":")[:2] for v in postgres["volumes"])}
    assert mounts["/var/lib/postgresql/data"] in compose["volumes"]
    init = [(source, target) for source, target in bind_sources(postgres) if target.startswith("/docker-entrypoint-initdb.d/")]
    assert init, "the init script must be mounted into /docker-entrypoint-initdb.d/"
    script = (ROOT / init[0][0]).resolve()
    assert script == DEPLOY / "postgres" / "init.sql"
    created = re.findall(r"^\s*CREATE DATABASE\s+(\w+)", script.read_text(), flags=re.IGNORECASE | re.MULTILINE)
    assert sorted(created) == sorted(f"nephrotrack_{name}" for name in SERVICES)
    env = environment(postgres)
    assert env["POSTGRES_USER"] == "nephrotrack"
    assert "pg_isready" in " ".join(as_argv(postgres["healthcheck"]["test"]))


def test_monitoring_services(services: dict[str, Any]) -> None:
    assert str(services["prometheus"]["image"]).startswith("prom/prometheus")
    assert str(services["grafana"]["image"]).startswith("grafana/grafana")
    prometheus_mounts = dict((target, source) for source, target in bind_sources(services["prometheus"]))
    assert (ROOT / prometheus_mounts["/etc/prometheus/prometheus.yml"]).resolve() == DEPLOY / "prometheus" / "prometheus.yml"
    assert (ROOT / prometheus_mounts["/etc/prometheus/alerts.yml"]).resolve() == DEPLOY / "prometheus" / "alerts.yml"
    grafana_mounts = dict((target, source) for source, target in bind_sources(services["grafana"]))
    assert (ROOT / grafana_mounts["/etc/grafana/provisioning"]).resolve() == DEPLOY / "grafana" / "provisioning"
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "nephrotrack.yml")
    dashboards_in_container = provider["providers"][0]["options"]["path"]
    assert (ROOT / grafana_mounts[dashboards_in_container]).resolve() == DEPLOY / "grafana" / "dashboards"


@pytest.mark.parametrize("path", ALL_COMPOSE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_bind_mounted_file_exists(path: Path) -> None:
    # Compose resolves relative paths of every -f file against the project directory (the first
    # file's, here the repository root).
    document = load_yaml(path)
    checked = 0
    for name, service in (document.get("services") or {}).items():
        for source, _ in bind_sources(service):
            assert (ROOT / source).exists(), f"{path.name}: {name} mounts {source}, which is not in the repository"
            checked += 1
    assert checked, f"{path.name} mounts nothing?"


def test_nats_auth_override_gives_each_service_its_own_user() -> None:
    override = load_yaml(NATS_AUTH_OVERRIDE)["services"]
    accounts = (DEPLOY / "nats" / "accounts.conf").read_text()
    conf_users = set(re.findall(r"^\s*user:\s*(\w+)", accounts, flags=re.MULTILINE))
    for name in SERVICES:
        url = environment(override[name])["NATS_URL"]
        match = re.fullmatch(r"nats://(\w+):\$\{(NATS_\w+_PASSWORD)(?::\?[^}]*)?\}@nats:4222", url)
        assert match, url
        assert match[1] == name and match[1] in conf_users
        assert match[2] == f"NATS_{name.upper()}_PASSWORD"
    nats_argv = as_argv(override["nats"]["command"])
    config_in_container = nats_argv[nats_argv.index("--config") + 1]
    mounts = {target: source for source, target in bind_sources(override["nats"])}
    assert (ROOT / mounts[config_in_container]).resolve() == DEPLOY / "nats" / "nats.conf"
    # nats.conf includes accounts.conf from its own directory.
    assert (ROOT / mounts[str(Path(config_in_container).parent / "accounts.conf")]).resolve() == DEPLOY / "nats" / "accounts.conf"
    # Every password the server configuration references is handed to the nats container.
    referenced = set(re.findall(r"\$(NATS_\w+)", accounts))
    assert referenced <= set(environment(override["nats"]))


def test_haproxy_accepts_the_front_door_configuration() -> None:
    haproxy = find_tool("haproxy")
    if haproxy is None:
        skip_loudly("haproxy not installed (Debian: apt-get install haproxy): the front door configuration not checked")
    result = subprocess.run([haproxy, "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cluster_override_runs_r3_and_two_replicas_of_every_service_on_all_three_nodes() -> None:
    override = load_yaml(CLUSTER_OVERRIDE)["services"]
    nodes = {"nats", "nats-2", "nats-3"}
    assert nodes <= set(override)
    for name in SERVICES:
        service = override[name]
        assert service["deploy"]["replicas"] == 2
        env = environment(service)
        assert env["NEPHROTRACK_STREAM_REPLICAS"] == "3"
        first, *others = env["NATS_URL"].split(",")
        assert re.fullmatch(rf"nats://{name}:\$\{{NATS_{name.upper()}_PASSWORD(?::\?[^}}]*)?\}}@nats:4222", first), first
        assert others == ["nats://nats-2:4222", "nats://nats-3:4222"], "credentials once, every node listed"
        assert {url.split("@")[-1].removeprefix("nats://").split(":")[0] for url in env["NATS_URL"].split(",")} == nodes


# --- the image ------------------------------------------------------------------------------------
def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def test_dockerfile_basics() -> None:
    text = _dockerfile()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, flags=re.MULTILINE)
    stages = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert stages and all(stage == "${PYTHON_IMAGE}" for stage in stages)
    assert re.search(r"pip install (--no-deps )?\.", text), "the project itself is installed (pip install .)"
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image must run as a non-root user"
    instructions = text.replace("\\\n", " ").splitlines()  # join continuation lines
    (healthcheck,) = [line for line in instructions if line.startswith("HEALTHCHECK ")]
    command = healthcheck.split(" CMD ", 1)[1]
    assert "python" in command and "/healthz" in command and "curl" not in command
    assert "deploy/healthcheck.py" in text and "/opt/nephrotrack/healthcheck.py" in command


def _ignore_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `*` and `?` stay within a path element, `**` spans them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _dockerignore_excludes(relative: str) -> bool:
    """Docker's rule: the last matching pattern wins, "!" re-includes, and a matched directory
    takes its contents with it."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        regex = _ignore_pattern(pattern.lstrip("!").strip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_dockerfile_copies_exist_and_are_in_the_build_context() -> None:
    sources = []
    for line in _dockerfile().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert {"pyproject.toml", "nephrotrack", "services", "shared", "deploy/healthcheck.py"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _dockerignore_excludes(source), f".dockerignore excludes {source}, which the Dockerfile copies"
    for heavy in (".venv", "var", ".git"):
        assert _dockerignore_excludes(heavy), f".dockerignore should keep {heavy} out of the build context"


def test_image_installs_the_migrations() -> None:
    # `nephrotrack migrate` reads shared/migrations from the installed package; the package data
    # must therefore travel with `pip install .` (namespace packages under shared/, *.mako).
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "*.mako" in pyproject["tool"]["setuptools"]["package-data"]["*"]
    assert pyproject["project"]["scripts"]["nephrotrack"] == "nephrotrack.cli:app"


# --- docker compose itself -------------------------------------------------------------------------
def _compose_env() -> dict[str, str]:
    env = dict(os.environ)
    for variable in set(re.findall(r"\$\{(\w+)", "".join(p.read_text() for p in ALL_COMPOSE_FILES))):
        env.setdefault(variable, "compose-config-check")
    return env


@pytest.mark.parametrize(
    "files",
    [[COMPOSE_FILE], [COMPOSE_FILE, NATS_AUTH_OVERRIDE], ALL_COMPOSE_FILES],
    ids=["base", "with-nats-auth", "with-nats-cluster"],
)
def test_docker_compose_config(files: list[Path]) -> None:
    docker = find_tool("docker")
    if docker is None:
        skip_loudly("docker CLI not installed: `docker compose config -q` was not run")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        answer = (probe.stderr or probe.stdout).strip().splitlines()[:1]
        skip_loudly(f"docker compose plugin missing ({' '.join(answer)}): `docker compose config -q` was not run")
    argv = [docker, "compose", "--project-directory", str(ROOT)]
    for path in files:
        argv += ["-f", str(path)]
    result = subprocess.run([*argv, "config", "-q"], capture_output=True, text=True, timeout=60, env=_compose_env())
    assert result.returncode == 0, result.stderr
