"""The compose file agrees with the service's settings and with the image. No Docker engine is
needed: `docker-compose config` (installed by `make test`'s bootstrap) validates and resolves it."""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from order_viewer.adapters.http.auth import METRICS_READ
from order_viewer.adapters.http.auth.tokens import parse_token_file, token_digest
from order_viewer.config import Settings, tracing_enabled
from order_viewer.entrypoints.cli import _parser
from tests.unit.test_packaging import CONTRACT_DEFAULTS, ROOT, SETTINGS, healthcheck_url

COMPOSE_FILE = ROOT / "docker-compose.yml"


@cache
def compose_config() -> dict[str, Any]:
    """The compose file as docker-compose resolves it (anchors merged, syntax normalised)."""
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed: run `make install`")
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose_config()["services"]
    return found


def image_services() -> dict[str, dict[str, Any]]:
    """The services that run the image of the Dockerfile."""
    return {name: service for name, service in services().items() if "build" in service}


def environment(service: str) -> dict[str, str]:
    return {name: str(value) for name, value in services()[service]["environment"].items()}


def published_ports(service: str) -> list[tuple[str | None, str, str]]:
    """The host address (None: every interface), host port and container port of each port the
    service publishes, in either form docker-compose resolves them to: a mapping, or text
    (`127.0.0.1:8081:8081/tcp`) when an address is given."""
    ports = []
    for port in services()[service]["ports"]:
        if isinstance(port, dict):
            ports.append((port.get("host_ip"), str(port["published"]), str(port["target"])))
        else:
            host_ip, published, target = port.removesuffix("/tcp").rsplit(":", 2)
            ports.append((host_ip, published, target))
    return ports


def test_the_compose_file_runs_migrate_then_serve_and_an_optional_emulator() -> None:
    assert set(image_services()) == {"migrate", "order-viewer", "emulator"}
    for name, service in image_services().items():
        # The command line must be one the CLI accepts (a typo would exit 2 in the container).
        _parser().parse_args(service["command"])
        assert service["restart"] == ("unless-stopped" if name == "order-viewer" else "no")
    assert services()["order-viewer"]["command"] == ["serve"]
    assert services()["migrate"]["command"] == ["migrate"]
    assert services()["emulator"]["profiles"] == ["emulator"]
    assert services()["order-viewer"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "kafka": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }


@pytest.mark.parametrize("service", ["migrate", "order-viewer", "emulator"])
def test_every_variable_given_to_the_image_is_a_valid_setting(service: str) -> None:
    env = environment(service)
    assert set(env) <= set(SETTINGS), f"not settings: {sorted(set(env) - set(SETTINGS))}"
    for name in set(env) & set(CONTRACT_DEFAULTS):
        assert env[name] == str(SETTINGS[name].default), f"{service}: {name} is not the default"
    # Each value must also pass the setting's own validation. (Any: as str, mypy would check the
    # values against the keyword options of Settings too, such as _case_sensitive.)
    values: dict[str, Any] = {name.lower(): value for name, value in env.items()}
    Settings(_env_file=None, **values)


def test_the_service_publishes_its_http_port_and_listens_on_every_interface() -> None:
    env = environment("order-viewer")
    assert set(CONTRACT_DEFAULTS) <= set(env), "write the contract defaults out explicitly"
    assert env["HTTP_HOST"] == "0.0.0.0"
    [(_, published, target)] = published_ports("order-viewer")
    assert published == target == env["HTTP_PORT"]

    url = urlsplit(healthcheck_url(services()["order-viewer"]["healthcheck"]["test"]))
    assert url.path == "/readyz"
    assert str(url.port) == env["HTTP_PORT"]


def test_every_port_is_published_on_the_hosts_loopback_only() -> None:
    """The service with its public demo tokens (one reads personal data whole) was published
    on every interface of the host, and Prometheus and Grafana with it."""
    publishing = {name for name, service in services().items() if "ports" in service}
    assert publishing == {"order-viewer", "prometheus", "grafana", "jaeger"}
    for name in publishing:
        for host_ip, published, _ in published_ports(name):
            assert host_ip == "127.0.0.1", (name, published)


def test_the_service_reaches_the_compose_postgres_and_kafka() -> None:
    postgres = services()["postgres"]["environment"]
    for service in ("migrate", "order-viewer"):
        url = urlsplit(environment(service)["DATABASE_URL"])
        assert url.hostname == "postgres"
        assert url.port in (None, 5432)
        assert (url.username, url.password) == (
            postgres["POSTGRES_USER"],
            postgres["POSTGRES_PASSWORD"],
        )
        assert url.path == f"/{postgres['POSTGRES_DB']}"

    advertised = services()["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    advertised_addresses = {listener.split("://")[1] for listener in advertised.split(",")}
    for service in ("order-viewer", "emulator"):
        servers = environment(service)["KAFKA_BOOTSTRAP_SERVERS"].split(",")
        assert {server.rsplit(":", 1)[0] for server in servers} == {"kafka"}
        assert set(servers) <= advertised_addresses


def mounts(service: str) -> dict[str, Path]:
    """The repository's files and folders mounted in the service: mount point -> file."""
    found = {}
    for volume in services()[service]["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("/"):  # named volumes have no path
            found[target] = Path(source)
    return found


def prometheus_config() -> dict[str, Any]:
    prometheus = services()["prometheus"]
    files = mounts("prometheus")
    config_flag = next(c for c in prometheus["command"] if c.startswith("--config.file="))
    config_path = config_flag.split("=", 1)[1]
    config: dict[str, Any] = yaml.safe_load(files[config_path].read_text())
    return config


def demo_tokens() -> dict[str, Any]:
    """The token file the compose service reads, by token digest."""
    service = services()["order-viewer"]
    env = service["environment"]
    assert env["HTTP_AUTH"] == "token"
    # docker-compose config resolves a bind mount to source:target:mode, the source absolute.
    mounts = [volume.split(":") for volume in service["volumes"]]
    [(source, _, mode)] = [m for m in mounts if m[1] == env["HTTP_TOKENS_FILE"]]
    assert mode == "ro"
    table = parse_token_file(Path(source).read_text())
    assert table.refused == []
    return dict(table.principals)


def test_the_observability_profile_runs_prometheus_with_the_alert_rules() -> None:
    prometheus = services()["prometheus"]
    assert prometheus["profiles"] == ["observability"]
    assert prometheus["image"].startswith("prom/prometheus:v")
    files = mounts("prometheus")
    for source in files.values():
        assert source.exists(), source
    config = prometheus_config()
    [rules] = config["rule_files"]
    assert files[rules] == ROOT / "deploy" / "prometheus" / "alerts.yml"
    [job] = config["scrape_configs"]
    [target] = job["static_configs"][0]["targets"]
    port = environment("order-viewer")["HTTP_PORT"]
    assert target == f"order-viewer:{port}"
    assert job["metrics_path"] == "/metrics"


def test_the_compose_prometheus_scrapes_with_a_demo_token_for_metrics_only() -> None:
    [job] = prometheus_config()["scrape_configs"]
    authorization = job["authorization"]
    assert authorization.get("type", "Bearer") == "Bearer"
    client = demo_tokens().get(token_digest(authorization["credentials"]))
    assert client is not None, "the scrape token is none of the service's token file"
    assert client.scopes == {METRICS_READ}


def test_the_observability_profile_runs_grafana_with_its_data_source_and_dashboard() -> None:
    grafana = services()["grafana"]
    assert grafana["profiles"] == ["observability"]
    assert grafana["image"].startswith("grafana/grafana:")
    files = mounts("grafana")
    provisioning = "/etc/grafana/provisioning"
    [datasource_file] = files[f"{provisioning}/datasources"].glob("*.yml")
    [datasource] = yaml.safe_load(datasource_file.read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["isDefault"] is True
    [(_, _, prometheus_port)] = published_ports("prometheus")
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"

    [provider_file] = files[f"{provisioning}/dashboards"].glob("*.yml")
    [provider] = yaml.safe_load(provider_file.read_text())["providers"]
    folder = provider["options"]["path"]
    dashboards = {target: source for target, source in files.items() if target.startswith(folder)}
    assert dashboards == {
        f"{folder}/order-viewer.json": ROOT / "deploy" / "grafana" / "order-viewer.json"
    }
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home in dashboards


# ------------------------------------------------------------------------------- Dockerfile


def test_compose_serves_behind_the_demo_tokens_the_readme_prints() -> None:
    root = Path(__file__).resolve().parents[2]
    demo = demo_tokens()
    readme = (root / "README.md").read_text()
    printed = re.findall(r"^\| `(\w+)` \| [^|]+ \| `([A-Za-z0-9_-]{43})` \|$", readme, re.M)
    assert len(printed) == len(demo) == 3
    for name, token in printed:
        assert demo[token_digest(token)].name == name


def test_the_tracing_profile_runs_jaeger_which_the_service_exports_to_once_asked() -> None:
    jaeger = services()["jaeger"]
    assert jaeger["profiles"] == ["tracing"]
    assert jaeger["image"].startswith("jaegertracing/jaeger:2.")
    assert published_ports("jaeger") == [("127.0.0.1", "16686", "16686")]
    env = environment("order-viewer")
    assert urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"]).netloc == "jaeger:4318"
    # Off unless asked for: no span is made, nothing is sent to a Jaeger not running.
    assert env["OTEL_TRACES_EXPORTER"] == "none"
    values: dict[str, Any] = {name.lower(): value for name, value in env.items()}
    assert not tracing_enabled(Settings(_env_file=None, **values))
