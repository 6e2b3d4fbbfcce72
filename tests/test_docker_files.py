"""The compose stack's files agree with each other and with the app's metrics (no Docker needed).

docker/compose.yml runs every Conductor process in prometheus-client's multiprocess mode except
Flower, Prometheus scrapes web:8000/metrics, and Grafana is provisioned with a datasource and the
Conductor dashboard, whose PromQL may name only metrics the app exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
PROMETHEUS_CONFIG = DOCKER / "prometheus.yml"
PROMETHEUS_RULES = DOCKER / "prometheus-rules.yml"
GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "conductor.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"

MULTIPROC_DIR = "/var/run/conductor-metrics"
METRICS_VOLUME = "metrics"
# Processes that record event metrics: they must share the multiprocess directory.
METRIC_WRITERS = {
    "migrate",
    "web",
    "worker_urgent",
    "worker_maintenance",
    "worker_receipts",
    "worker_callbacks",
    "worker_release",
    "worker_bulk",
    "beat",
}

# What web:8000/metrics exports (messaging/metrics.py and the scrape-time collectors behind the
# /metrics view): family -> (type, labels). Histograms are exposed as _bucket/_sum/_count series.
WEB_METRICS_ENDPOINT: dict[str, tuple[str, frozenset[str]]] = {
    "conductor_dispatch_latency_seconds": ("histogram", frozenset({"channel", "priority"})),
    "conductor_delivery_latency_seconds": ("histogram", frozenset({"channel", "priority"})),
    "conductor_provider_attempts_total": ("counter", frozenset({"channel", "provider", "outcome"})),
    "conductor_provider_errors_total": ("counter", frozenset({"channel", "provider", "error_type"})),
    "conductor_messages": ("gauge", frozenset({"channel", "provider", "state"})),
    "conductor_delivery_rate": ("gauge", frozenset({"channel"})),
    "conductor_queue_depth": ("gauge", frozenset({"queue"})),
    "conductor_dead_letters": ("gauge", frozenset({"channel", "error_type"})),
    "conductor_circuit_state": ("gauge", frozenset({"provider", "state"})),
    "conductor_messages_delivery_unknown": ("gauge", frozenset({"channel", "provider"})),
    "conductor_alerts_open": ("gauge", frozenset({"kind", "channel", "provider", "severity"})),
    "conductor_receipts_unmatched": ("gauge", frozenset({"provider", "reason"})),
    "conductor_receipts_pending": ("gauge", frozenset({"provider"})),
    "conductor_callbacks_sent_total": ("counter", frozenset({"outcome"})),
    "conductor_callbacks_failed_total": ("counter", frozenset({"reason"})),
    "conductor_callback_latency_seconds": ("histogram", frozenset()),
    "conductor_callback_request_seconds": ("histogram", frozenset()),
    "conductor_callback_backlog_age_seconds": ("gauge", frozenset({"endpoint"})),
    "conductor_callbacks_pending": ("gauge", frozenset()),
    "conductor_periodic_job_last_success_age_seconds": ("gauge", frozenset({"task"})),
    "conductor_periodic_job_interval_seconds": ("gauge", frozenset({"task"})),
    "conductor_periodic_job_overdue": ("gauge", frozenset({"task"})),
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# These tests only read files: keep the suite's autouse Redis fixtures (tests/conftest.py) out of them.
@pytest.fixture(autouse=True)
def _clean_redis():
    yield


@pytest.fixture(autouse=True)
def _fresh_provider_state():
    yield


# --- helpers -----------------------------------------------------------------------------------


def _load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...]
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def _mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) for each volume, short or long syntax."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts.append((volume.get("source", ""), volume["target"], bool(volume.get("read_only"))))
        else:
            source, target, *mode = volume.split(":")
            mounts.append((source, target, "ro" in "".join(mode).split(",")))
    return mounts


def _command(service: dict) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else command


def _app_services(services: dict[str, dict]) -> dict[str, dict]:
    """Services built from the Conductor image, i.e. running Django code."""
    return {
        name: service
        for name, service in services.items()
        if isinstance(service.get("build"), dict) and service["build"].get("dockerfile") == "docker/Dockerfile"
    }


def _host_path(source: str) -> Path:
    """A bind mount's source, relative to the compose file's directory."""
    return (COMPOSE.parent / source).resolve()


def _ports(service: dict) -> set[str]:
    return {str(port) for port in service.get("ports") or []}


def _panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels inside a collapsed row
    return panels


def _exprs(dashboard: dict) -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and query variables."""
    exprs = [target["expr"] for panel in _panels(dashboard) for target in panel.get("targets", []) if "expr" in target]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_METRIC = re.compile(r"\bconductor_[a-zA-Z0-9_:]*")
_SELECTOR = re.compile(r"\b(conductor_[a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def _metric_names(expr: str) -> set[str]:
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def _family(series: str) -> str | None:
    """The WEB_METRICS_ENDPOINT family a series name belongs to, or None."""
    if series in WEB_METRICS_ENDPOINT and WEB_METRICS_ENDPOINT[series][0] != "histogram":
        return series
    for suffix in HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and WEB_METRICS_ENDPOINT.get(base, ("",))[0] == "histogram":
            return base
    return None


def _labels_of(series: str) -> set[str]:
    family = _family(series)
    labels = set(WEB_METRICS_ENDPOINT[family][1]) if family else set()
    return labels | {"le"} if series.endswith("_bucket") else labels


# --- compose: multiprocess metrics directory ---------------------------------------------------


def test_every_django_service_shares_the_multiprocess_metrics_directory(services):
    app = _app_services(services)
    assert METRIC_WRITERS <= set(app), f"expected {sorted(METRIC_WRITERS)} among the app services {sorted(app)}"
    for name, service in app.items():
        if name == "flower":
            continue
        assert _environment(service).get("PROMETHEUS_MULTIPROC_DIR") == MULTIPROC_DIR, name
        assert (METRICS_VOLUME, MULTIPROC_DIR, False) in _mounts(service), name


def test_every_long_running_service_restarts_and_migrate_runs_once(services):
    """A process that exits comes back (as supervisord does under make run): Docker restarts every
    service but the one-shot migrate, which others wait on to complete."""
    for name, service in services.items():
        expected = "no" if name == "migrate" else "unless-stopped"
        assert service.get("restart") == expected, f"{name}: restart={service.get('restart')!r}"


def test_every_procfile_process_is_a_compose_service(services):
    """The Procfile is the list of Conductor's processes (make run, the systemd units): compose runs each."""
    procfile = ROOT / "Procfile"
    names = [line.split(":", 1)[0] for line in procfile.read_text().splitlines() if line and line[0].isalpha()]
    assert names and set(names) <= set(_app_services(services)), set(names) - set(services)


def test_metrics_volume_is_declared(compose):
    assert METRICS_VOLUME in (compose.get("volumes") or {})


def test_flower_is_not_in_multiprocess_mode(services):
    flower, web = services["flower"], services["web"]
    assert "PROMETHEUS_MULTIPROC_DIR" not in _environment(flower)
    assert all(target != MULTIPROC_DIR for _, target, _ in _mounts(flower))
    # Otherwise the same settings as every other process (broker, database, secret key), and its login.
    assert set(_environment(flower)) == set(_environment(web)) - {"PROMETHEUS_MULTIPROC_DIR"} | {"FLOWER_BASIC_AUTH"}


def test_migrate_empties_the_metrics_directory_before_migrating(services):
    command = _command(services["migrate"])
    wipe = command.find(f"rm -rf {MULTIPROC_DIR}/*")
    migrate = command.find("manage.py migrate")
    assert 0 <= wipe < migrate, command
    assert "&&" in command[wipe:migrate], "migrate must not run when the wipe failed"


def test_metric_writers_start_after_migrate(services):
    for name in METRIC_WRITERS - {"migrate"}:
        depends_on = services[name].get("depends_on") or {}
        assert isinstance(depends_on, dict), name
        assert depends_on.get("migrate", {}).get("condition") == "service_completed_successfully", name


def test_image_makes_the_metrics_directory_writable_for_its_user():
    dockerfile = DOCKERFILE.read_text()
    user = re.search(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert user, "the image runs as a named user"
    before_user = dockerfile[: user.start()]
    assert re.search(rf"mkdir -p [^&]*{re.escape(MULTIPROC_DIR)}", before_user)
    assert re.search(rf"chown[^&]* {user.group(1)} [^&]*{re.escape(MULTIPROC_DIR)}", before_user)


# --- compose: what is exposed, and with which secrets -------------------------------------------


def test_unauthenticated_or_operator_surfaces_answer_on_this_host_only(services):
    # Flower can revoke tasks, the sandbox's control API injects faults: neither on every interface.
    assert _ports(services["flower"]) == {"127.0.0.1:5555:5555"}
    assert _ports(services["sandbox"]) == {"127.0.0.1:8025:8025"}


def test_flower_asks_for_a_login_from_the_environment(services):
    basic_auth = _environment(services["flower"]).get("FLOWER_BASIC_AUTH", "")
    assert re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?[^}]+\}", basic_auth), basic_auth  # required, no default


def test_no_weak_secret_key_and_no_wildcard_host_by_default(services):
    for name, service in _app_services(services).items():
        env = _environment(service)
        assert re.fullmatch(r"\$\{SECRET_KEY:\?[^}]+\}", env["SECRET_KEY"]), name  # required, no default
        hosts = re.fullmatch(r"\$\{ALLOWED_HOSTS:-([^}]*)\}", str(env["ALLOWED_HOSTS"]))
        assert hosts and "*" not in hosts.group(1) and "web" in hosts.group(1).split(","), name
        assert env["CONDUCTOR_MODE"] == "${CONDUCTOR_MODE:-sandbox}", name  # sandbox mode, explicitly


# --- compose: Prometheus and Grafana -----------------------------------------------------------


def test_prometheus_scrapes_web_metrics_every_15s(services):
    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus")
    assert _ports(prometheus) == {"127.0.0.1:9090:9090"}  # no authentication: this host only
    config_mounts = [m for m in _mounts(prometheus) if m[1] == "/etc/prometheus/prometheus.yml"]
    assert config_mounts and config_mounts[0][2], "prometheus.yml mounted read-only"
    assert _host_path(config_mounts[0][0]) == PROMETHEUS_CONFIG

    config = _load_yaml(PROMETHEUS_CONFIG)
    default_interval = config.get("global", {}).get("scrape_interval", "1m")
    jobs = [
        job
        for job in config["scrape_configs"]
        if any("web:8000" in static.get("targets", []) for static in job.get("static_configs", []))
    ]
    assert len(jobs) == 1, "exactly one job scrapes web:8000"
    assert jobs[0].get("metrics_path", "/metrics") == "/metrics"
    assert jobs[0].get("scrape_interval", default_interval) == "15s"


def _check_names_only_exported_metrics_and_labels(expr: str) -> None:
    names = _metric_names(expr)
    assert names, f"no Conductor metric in {expr!r}"
    unknown = {name for name in names if _family(name) is None}
    assert not unknown, f"{expr!r} names {sorted(unknown)}, not in WEB_METRICS_ENDPOINT"
    code = _STRING.sub('""', expr)
    for series, matchers in _SELECTOR.findall(code):
        extra = set(_MATCHER_LABEL.findall(matchers)) - _labels_of(series)
        assert not extra, f"{series} has no label {sorted(extra)} in {expr!r}"
    known_labels = set().union(*(_labels_of(name) for name in names))
    for grouping in _GROUPING.findall(code):
        extra = {label.strip() for label in grouping.split(",") if label.strip()} - known_labels
        assert not extra, f"grouping by unknown label {sorted(extra)} in {expr!r}"


def test_prometheus_loads_the_alerting_rules_and_they_name_exported_metrics(services):
    config = _load_yaml(PROMETHEUS_CONFIG)
    mounts = {target: (_host_path(source), read_only) for source, target, read_only in _mounts(services["prometheus"])}
    assert config["rule_files"] == ["/etc/prometheus/rules.yml"]
    assert mounts["/etc/prometheus/rules.yml"] == (PROMETHEUS_RULES, True)

    rules = [rule for group in _load_yaml(PROMETHEUS_RULES)["groups"] for rule in group["rules"]]
    for rule in rules:
        assert rule["alert"] and rule["labels"]["severity"] in {"warning", "critical"}, rule
        _check_names_only_exported_metrics_and_labels(rule["expr"])
    # A periodic job overdue (beat or its worker stopped) alerts on the age of its last success.
    overdue = [rule for rule in rules if "conductor_periodic_job_last_success_age_seconds" in rule["expr"]]
    assert any("conductor_periodic_job_interval_seconds" in rule["expr"] for rule in overdue)


def test_grafana_login_and_provisioning(services):
    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana")
    assert "3000:3000" in _ports(grafana)
    env = _environment(grafana)
    assert str(env.get("GF_AUTH_ANONYMOUS_ENABLED")).lower() == "false"
    assert env.get("GF_SECURITY_ADMIN_PASSWORD") == "${GRAFANA_ADMIN_PASSWORD:-admin}"

    mounts = {target: (_host_path(source), read_only) for source, target, read_only in _mounts(grafana)}
    assert mounts["/etc/grafana/provisioning"] == (GRAFANA / "provisioning", True)

    datasources = _load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert [(d["type"], d["url"]) for d in datasources] == [("prometheus", "http://prometheus:9090")]

    providers = _load_yaml(GRAFANA / "provisioning" / "dashboards" / "conductor.yml")["providers"]
    assert len(providers) == 1
    dashboards_path = providers[0]["options"]["path"]
    assert dashboards_path in mounts, "the provider reads a directory compose mounts"
    assert mounts[dashboards_path][0] == DASHBOARD.parent


# --- Grafana dashboard -------------------------------------------------------------------------


def test_dashboard_identity_and_variables(dashboard):
    assert dashboard["uid"] == "conductor-overview"
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    channel = variables["channel"]
    query = channel["query"]["query"] if isinstance(channel["query"], dict) else channel["query"]
    assert query == "label_values(conductor_messages, channel)"


def test_every_query_uses_the_datasource_variable(dashboard):
    panels = [panel for panel in _panels(dashboard) if panel["type"] != "row"]
    assert len({panel["id"] for panel in _panels(dashboard)}) == len(_panels(dashboard)), "panel ids are unique"
    for panel in panels:
        assert panel["targets"], panel["title"]
        for source in [panel["datasource"], *(target["datasource"] for target in panel["targets"])]:
            assert source == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_dashboard_names_only_exported_metrics_and_labels(dashboard):
    for expr in _exprs(dashboard):
        _check_names_only_exported_metrics_and_labels(expr)


def test_dashboard_metrics_are_in_docs_metrics_md(dashboard):
    if not METRICS_DOC.exists():
        pytest.skip("docs/metrics.md does not exist yet")
    documented = set(_METRIC.findall(METRICS_DOC.read_text()))
    for expr in _exprs(dashboard):
        for series in _metric_names(expr):
            candidates = {series} | {series.removesuffix(s) for s in (*HISTOGRAM_SUFFIXES, "_total")}
            assert candidates & documented, f"{series} (in {expr!r}) is not in docs/metrics.md"


def test_dashboard_shows_the_five_promised_charts_circuits_and_alerts(dashboard):
    by_metric: dict[str, list[tuple[dict, str]]] = {}
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            for name in _metric_names(target["expr"]):
                by_metric.setdefault(_family(name), []).append((panel, " ".join(target["expr"].split())))

    def exprs(family: str) -> list[str]:
        return [expr for _, expr in by_metric.get(family, [])]

    # 1. delivery rate by channel
    assert exprs("conductor_delivery_rate")
    # 2. latency p50/p95/p99 by channel, accepted->dispatched and accepted->delivered
    for family in ("conductor_dispatch_latency_seconds", "conductor_delivery_latency_seconds"):
        for quantile in ("0.5", "0.95", "0.99"):
            assert any(
                expr.startswith(f"histogram_quantile({quantile},")
                and re.search(r"by \((channel, le|le, channel)\)", expr)
                and f"rate({family}_bucket" in expr
                for expr in exprs(family)
            ), f"{family} p{quantile}"
    # 3. queue depth per queue
    assert any("by (queue)" in expr for expr in exprs("conductor_queue_depth"))
    # 4. dead letters summed by channel
    assert any("sum by (channel)" in expr for expr in exprs("conductor_dead_letters"))
    # 5. error rate by error type: errors by error_type over all attempts
    assert any(
        "by (error_type) (rate(conductor_provider_errors_total" in expr
        and "/" in expr
        and "rate(conductor_provider_attempts_total" in expr
        for expr in exprs("conductor_provider_errors_total")
    )
    # circuit states and open alerts
    assert {panel["type"] for panel, _ in by_metric["conductor_circuit_state"]} & {"stat", "state-timeline"}
    assert {panel["type"] for panel, _ in by_metric["conductor_alerts_open"]} == {"table"}
