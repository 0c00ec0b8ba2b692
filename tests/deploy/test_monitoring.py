"""Prometheus scrape config, alert rules and the Grafana dashboard.

Metric names must exist: every name a dashboard query or an alert uses is either in
shared/metrics.py's catalogue, in the operations brief's list (lab ingestion, deviations,
projections), or one Prometheus produces itself (up, probe_success, ALERTS). promtool, when
installed, checks the config, the rules, the rules' unit tests and the dashboard's PromQL.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import (
    CONTRACT_PORTS,
    DEPLOY,
    EXTRA_METRICS,
    INFRASTRUCTURE_METRICS,
    ROOT,
    SERVICES,
    catalogue,
    find_tool,
    known_metric_names,
    load_yaml,
    promql_metric_names,
    skip_loudly,
)

PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "nephrotrack.json"


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    return load_yaml(PROMETHEUS_DIR / "prometheus.yml")


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    document = load_yaml(PROMETHEUS_DIR / "alerts.yml")
    return [rule for group in document["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _job(config: dict[str, Any], name: str) -> dict[str, Any]:
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert name in jobs, f"no scrape job {name!r}; jobs: {sorted(jobs)}"
    return jobs[name]


def _targets(job: dict[str, Any]) -> dict[str, str]:
    """target -> its `service` label: static targets, and names found by DNS (every replica of a
    compose service; the label is the name looked up, relabelled from ``__meta_dns_name``)."""
    targets = {target: group.get("labels", {}).get("service")
               for group in job.get("static_configs", []) for target in group["targets"]}
    if job.get("dns_sd_configs"):
        assert {"source_labels": ["__meta_dns_name"], "target_label": "service"} in job["relabel_configs"]
    for lookup in job.get("dns_sd_configs", []):
        assert lookup.get("type", "SRV") == "A", "compose's DNS answers A records, one per replica"
        targets.update({f"{name}:{lookup['port']}": name for name in lookup["names"]})
    return targets


def _promtool() -> str:
    promtool = find_tool("promtool")
    if promtool is None:
        skip_loudly("promtool not installed (Debian: apt-get install prometheus): Prometheus config and rules not checked by promtool")
    return promtool  # type: ignore[return-value]


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd)


# --- scrape configuration ---------------------------------------------------------------------------
def test_scrapes_every_service_metrics_on_its_contract_port(prometheus_config: dict[str, Any]) -> None:
    job = _job(prometheus_config, "nephrotrack")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert _targets(job) == {f"{name}:{CONTRACT_PORTS[name]}": name for name in SERVICES}


def test_probes_every_service_readyz(prometheus_config: dict[str, Any]) -> None:
    job = _job(prometheus_config, "nephrotrack-readiness")
    assert _targets(job) == {f"{name}:{CONTRACT_PORTS[name]}": name for name in SERVICES}
    probed = [rule for rule in job["relabel_configs"] if rule.get("target_label") == "__param_target"]
    assert probed == [{"source_labels": ["__address__"], "regex": "(.+)", "replacement": "http://$1/readyz",
                       "target_label": "__param_target"}], "each replica's own /readyz is probed"
    module = job["params"]["module"][0]
    blackbox = load_yaml(PROMETHEUS_DIR / "blackbox.yml")
    assert blackbox["modules"][module]["http"]["valid_status_codes"] == [200]
    assert any(rule.get("replacement", "").startswith("blackbox:") for rule in job["relabel_configs"])


def test_scrapes_the_nats_exporter(prometheus_config: dict[str, Any]) -> None:
    compose = load_yaml(ROOT / "docker-compose.yml")["services"]
    job = _job(prometheus_config, "nats")
    (target,) = _targets(job)
    host = target.split(":")[0]
    assert host in compose and "http://nats:8222" in compose[host]["command"]


def test_rule_files_resolve(prometheus_config: dict[str, Any]) -> None:
    for pattern in prometheus_config["rule_files"]:
        assert (PROMETHEUS_DIR / pattern).is_file(), f"{pattern} (relative to prometheus.yml) does not exist"


OPERATOR_KEY_SECRET = "/run/secrets/nephrotrack_operator_key"


def test_services_are_scraped_and_probed_as_operator(prometheus_config: dict[str, Any]) -> None:
    """/metrics and /readyz need the operator role: Prometheus and the blackbox exporter send the
    operator key, a compose secret made from NEPHROTRACK_OPERATOR_KEY, mounted into both."""
    scrape = _job(prometheus_config, "nephrotrack")["authorization"]
    assert (scrape.get("type", "Bearer"), scrape["credentials_file"]) == ("Bearer", OPERATOR_KEY_SECRET)
    module = _job(prometheus_config, "nephrotrack-readiness")["params"]["module"][0]
    probe = load_yaml(PROMETHEUS_DIR / "blackbox.yml")["modules"][module]["http"]["authorization"]
    assert (probe.get("type", "Bearer"), probe["credentials_file"]) == ("Bearer", OPERATOR_KEY_SECRET)
    compose = load_yaml(ROOT / "docker-compose.yml")
    secret = OPERATOR_KEY_SECRET.rsplit("/", 1)[1]
    assert compose["secrets"][secret] == {"environment": "NEPHROTRACK_OPERATOR_KEY"}
    for name in ("prometheus", "blackbox"):
        assert secret in compose["services"][name]["secrets"], f"{name} does not get the operator key"
    for name in SERVICES:
        keys = compose["services"][name]["environment"]["NEPHROTRACK_API_KEYS"]
        assert "operator:${NEPHROTRACK_OPERATOR_KEY" in keys, f"{name}: the scrape key is not one of its operator keys"


def test_promtool_check_config(tmp_path: Path) -> None:
    # promtool insists that credentials files exist; the operator key is a compose secret that only
    # exists in the container, so the check runs on a copy pointing at a stand-in file.
    promtool = _promtool()
    stand_in = tmp_path / "operator_key"
    stand_in.write_text("stand-in\n")
    (tmp_path / "alerts.yml").write_text((PROMETHEUS_DIR / "alerts.yml").read_text())
    config = tmp_path / "prometheus.yml"
    config.write_text((PROMETHEUS_DIR / "prometheus.yml").read_text().replace(OPERATOR_KEY_SECRET, str(stand_in)))
    result = _run([promtool, "check", "config", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- alert rules ---------------------------------------------------------------------------------------
def test_every_rule_is_actionable(rules: list[dict[str, Any]]) -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    anchors = {_github_anchor(heading) for heading in re.findall(r"^#+\s+(.+)$", readme, flags=re.MULTILINE)}
    assert rules
    for rule in rules:
        name = rule.get("alert")
        assert name, f"not an alerting rule: {rule}"
        assert rule.get("expr"), name
        assert rule.get("labels", {}).get("severity") in {"critical", "warning"}, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), f"{name}: no summary"
        assert annotations.get("description"), f"{name}: no description"
        runbook = annotations.get("runbook", "")
        assert runbook.startswith("deploy/README.md#"), f"{name}: no runbook"
        assert runbook.split("#", 1)[1] in anchors, f"{name}: {runbook} points at no heading of deploy/README.md"


def _github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _rule(rules: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    return [rule for rule in rules if metric in promql_metric_names(rule["expr"])]


def test_required_alerts_exist(rules: list[dict[str, Any]]) -> None:
    compact = {rule["alert"]: re.sub(r"\s+", " ", rule["expr"]) for rule in rules}

    def has(pattern: str, what: str) -> dict[str, Any]:
        matching = [rule for rule in rules if re.search(pattern, re.sub(r"\s+", " ", rule["expr"]))]
        assert matching, f"no alert for {what}; exprs: {compact}"
        return matching[0]

    lag = has(r"nephrotrack_consumer_pending_messages > 1000", "consumer lag above 1000")
    assert re.search(r"(delta|deriv|increase)\(nephrotrack_consumer_pending_messages\[10m\]\) > 0", lag["expr"]), "lag must be growing over 10m"
    has(r"increase\(nephrotrack_messages_dead_lettered_total\[5m\]\) > 0", "dead letters")
    has(r"nephrotrack_outbox_oldest_unsent_age_seconds > 300", "a stuck outbox")
    has(r"nephrotrack_projection_lag_seconds > 300", "stale projections")
    has(r"nephrotrack_publish_failures_total", "publish failures")
    down = has(r"^up == 0$", "a service down")
    assert down.get("for") == "2m"
    has(r"probe_success\{[^}]*nephrotrack-readiness[^}]*\} == 0", "a service not ready")


def test_alerts_use_known_metrics(rules: list[dict[str, Any]]) -> None:
    known = known_metric_names()
    for rule in rules:
        unknown = promql_metric_names(rule["expr"]) - known
        assert not unknown, f"{rule['alert']} uses unknown metrics {unknown}"


def test_promtool_check_rules() -> None:
    result = _run([_promtool(), "check", "rules", str(PROMETHEUS_DIR / "alerts.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests() -> None:
    # deploy/prometheus/alerts.test.yml: synthetic series -> which alerts fire, with which text.
    result = _run([_promtool(), "test", "rules", "alerts.test.yml"], cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana ---------------------------------------------------------------------------------------------
def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    found = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((panel["title"], target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        if text:
            found.append((f"variable {variable['name']}", re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", text)))
    return found


def test_dashboard_uses_only_known_metrics(dashboard: dict[str, Any]) -> None:
    known = known_metric_names()
    queries = _queries(dashboard)
    assert len(queries) >= 20
    for title, expr in queries:
        unknown = promql_metric_names(expr) - known
        assert not unknown, f"panel {title!r} queries unknown metrics {unknown}: {expr}"


def test_dashboard_covers_every_metric(dashboard: dict[str, Any]) -> None:
    used = set().union(*(promql_metric_names(expr) for _, expr in _queries(dashboard)))
    for family, samples in catalogue().items():
        assert samples & used, f"shared/metrics.py's {family} is on no dashboard panel"
    for name in EXTRA_METRICS | {"up", "probe_success"}:
        assert name in used, f"{name} is on no dashboard panel"


def test_dashboard_panels_for_on_call(dashboard: dict[str, Any]) -> None:
    queries = " ".join(expr for _, expr in _queries(dashboard))
    assert "histogram_quantile(0.99, sum by (service, route, le)" in queries, "HTTP p99 latency by route"
    assert "histogram_quantile(0.99, sum by (consumer, le)" in queries, "handler p99 latency per consumer"
    assert "sum by (source, reason)" in queries, "lab rejections by source and reason"
    assert "sum by (code)" in queries, "protocol deviations by code"
    assert "sum by (service, event_type)" in queries, "events appended by type"


def test_dashboard_panels_are_well_formed(dashboard: dict[str, Any]) -> None:
    datasource = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["title"]
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert panel["targets"], panel["title"]


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """Every dashboard query, with Grafana's variables filled in, is valid PromQL (promtool parses
    it as a recording rule)."""
    promtool = _promtool()
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    substitutions = {"$service": ".*", "$__rate_interval": "1m", "$__range": "1h"}
    records = []
    for index, (title, expr) in enumerate(_queries(dashboard)):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unhandled Grafana variable in {title!r}: {expr}"
        records.append({"record": f"dashboard:query_{index}", "expr": expr})
    import yaml

    rules_file = tmp_path / "dashboard-queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = _run([promtool, "check", "rules", str(rules_file)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning() -> None:
    datasources = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus" and prometheus["url"] == "http://prometheus:9090"
    providers = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "nephrotrack.yml")
    assert providers["providers"][0]["type"] == "file"


def test_known_metric_names_sanity() -> None:
    names = known_metric_names()
    assert "nephrotrack_http_request_duration_seconds_bucket" in names
    assert "nephrotrack_events_appended_total" in names
    assert "nephrotrack_outbox_backlog" in names
    assert INFRASTRUCTURE_METRICS <= names
    expr = ('histogram_quantile(0.99, sum by (service, le) '
            '(rate(nephrotrack_handler_duration_seconds_bucket{service=~"$service"}[$__rate_interval]))) > 5 and up == 0')
    assert promql_metric_names(expr) == {"nephrotrack_handler_duration_seconds_bucket", "up"}
