"""What the deployment tests share: the tools (installed beforehand by `make test`, never here),
the files under deploy/, and the metric names the service really exposes."""

from __future__ import annotations

import re
import tempfile
from functools import cache
from pathlib import Path

import pytest
import yaml

from devstack.deploy_tools import INSTALL_COMMAND, helm_path, prometheus_path, promtool_path
from order_viewer.adapters.cache import OrderCache
from order_viewer.adapters.http.auth.tokens import TokenFile
from order_viewer.adapters.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "order-viewer"
PRODUCTION_VALUES = DEPLOY / "helm" / "production-values.yaml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"

# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})


def _required(tool: str, found: Path | None) -> Path:
    if found is None:
        pytest.fail(f"{tool} is not installed: run `{INSTALL_COMMAND}` (make test runs it)")
    return found


@pytest.fixture(scope="session")
def helm() -> Path:
    return _required("helm", helm_path())


@pytest.fixture(scope="session")
def promtool() -> Path:
    return _required("promtool", promtool_path())


@pytest.fixture(scope="session")
def prometheus() -> Path:
    return _required("prometheus", prometheus_path())


@cache
def exposed_metrics() -> dict[str, frozenset[str]]:
    """Every sample name the service's /metrics can show, with its label names, read from the
    service's own registry after one use of each labelled metric (unused ones show no sample)."""
    metrics = Metrics(OrderCache(10, max_bytes=1000))
    metrics.dead_lettered.labels("invalid_json").inc()
    metrics.retries.labels("database").inc()
    metrics.write_timeouts.labels("lock").inc()
    metrics.consumer_lag.labels("orders", "0").set(1)
    metrics.http.record("/readyz", 200, 0.001)
    with tempfile.TemporaryDirectory() as directory:  # the tokens file's gauge too
        tokens = Path(directory) / "tokens"
        tokens.write_text("")
        metrics.count_token_file(TokenFile(tokens))
    exposed: dict[str, frozenset[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                exposed[sample.name] = frozenset(sample.labels) | TARGET_LABELS
    return exposed


def recording_rules() -> set[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def alerting_rules() -> list[dict[str, object]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


_FUNCTIONS_AND_WORDS = frozenset(
    {
        "sum", "max", "min", "avg", "count", "rate", "deriv", "increase", "by", "on",
        "and", "or", "unless", "histogram_quantile", "label_values", "without", "ignoring",
        "offset", "bool",
    }
)  # fmt: skip
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")
_GROUPING = re.compile(r"\b(?:by|on)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def unknown_names(expr: str, extra_series: dict[str, frozenset[str]] | None = None) -> list[str]:
    """Metric and label names of a PromQL expression that the service does not expose: each
    is a query that would show nothing. `extra_series` adds series defined elsewhere
    (recording rules, Prometheus' own `up`) with their labels."""
    series = {**exposed_metrics(), **(extra_series or {})}
    # Strings and range or offset durations are not names.
    bare = re.sub(r'"[^"]*"', '""', expr)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    problems: list[str] = []
    used_labels: set[str] = set()
    for match in _SELECTOR.finditer(_GROUPING.sub("", bare)):
        name, matchers = match.group(1), match.group(2) or ""
        if name in _FUNCTIONS_AND_WORDS or re.fullmatch(r"[0-9.e]+", name):
            continue
        if name not in series:
            problems.append(f"metric {name}")
            continue
        used_labels |= series[name]
        for label in _MATCHER.findall(matchers):
            if label not in series[name]:
                problems.append(f"label {label} of {name}")
    for grouping in _GROUPING.findall(bare):
        for label in filter(None, (part.strip() for part in grouping.split(","))):
            if label not in used_labels:
                problems.append(f"label {label} in by/on ({grouping})")
    return problems
