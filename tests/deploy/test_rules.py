"""The alert rules: valid for promtool, unit-tested alert by alert, on real metric names, each
with its runbook section."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import (
    ALERT_TESTS,
    ALERTS,
    OPERATIONS,
    TARGET_LABELS,
    alerting_rules,
    recording_rules,
    unknown_names,
)


def run(command: list[str | Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        check=False,
        cwd=ALERTS.parent,
    )


def recorded_series() -> dict[str, frozenset[str]]:
    """Recording rules' outputs carry the labels their `by` keeps; `up` is Prometheus' own."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    series = {"up": TARGET_LABELS}
    for rule in (rule for group in groups for rule in group["rules"] if "record" in rule):
        kept = re.findall(r"\bby\s*\(([^)]*)\)", rule["expr"])
        labels = {label.strip() for grouping in kept for label in grouping.split(",")}
        series[rule["record"]] = frozenset(labels - {"le"}) | {"job"}
    return series


def test_promtool_accepts_the_rules(promtool: Path) -> None:
    result = run([promtool, "check", "rules", ALERTS])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_unit_tests_pass(promtool: Path) -> None:
    result = run([promtool, "test", "rules", ALERT_TESTS])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_would_catch_an_alert_that_no_longer_fires(promtool: Path, tmp_path: Path) -> None:
    """The unit tests are not vacuous: with one threshold raised out of reach they fail."""
    broken = ALERTS.read_text().replace(
        "order_viewer:messages_dead_lettered:rate5m > 0.1",
        "order_viewer:messages_dead_lettered:rate5m > 1e9",
    )
    assert broken != ALERTS.read_text()
    (tmp_path / ALERTS.name).write_text(broken)
    (tmp_path / ALERT_TESTS.name).write_text(ALERT_TESTS.read_text())
    result = subprocess.run(
        [str(promtool), "test", "rules", ALERT_TESTS.name],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "OrderViewerDeadLetterRateHigh" in result.stdout + result.stderr


def test_every_alert_has_a_unit_test_where_it_fires_and_one_where_it_stays_silent() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    names = {str(rule["alert"]) for rule in alerting_rules()}
    assert names - fires == set(), "alerts never shown to fire"
    assert names - silent == set(), "alerts never shown to stay silent"


def test_the_issue_asks_for_each_of_these_alerts() -> None:
    assert {str(rule["alert"]) for rule in alerting_rules()} == {
        "OrderViewerConsumerLagGrowing",
        "OrderViewerNoOrdersStored",
        "OrderViewerDeadLetterRateHigh",
        "OrderViewerDatabaseUnavailable",
        "OrderViewerBrokerUnavailable",
        "OrderViewerDown",
        "OrderViewerNotReady",
        "OrderViewerCacheHitRatioCollapsed",
        "OrderViewerHttpErrors",
        "OrderViewerHttpLatencyHigh",
        "OrderViewerTokensFileLinesRefused",
        "OrderViewerDatabaseWritesTimingOut",
        "OrderViewerConsumerStalled",
    }


@pytest.mark.parametrize("rule", alerting_rules(), ids=lambda rule: str(rule["alert"]))
def test_every_alert_links_its_runbook_section(rule: dict[str, object]) -> None:
    annotations = rule["annotations"]
    assert isinstance(annotations, dict)
    document, _, anchor = annotations["runbook"].partition("#")
    assert document == "docs/OPERATIONS.md"
    assert anchor == str(rule["alert"]).lower()
    headings = re.findall(r"^#+ +(\S+)\s*$", OPERATIONS.read_text(), re.MULTILINE)
    assert rule["alert"] in headings, f"docs/OPERATIONS.md has no section {rule['alert']}"
    assert rule["labels"] in ({"severity": "warning"}, {"severity": "critical"})


def test_every_rule_names_metrics_and_labels_the_service_exposes() -> None:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    problems = {
        rule.get("record") or rule["alert"]: unknown_names(rule["expr"], recorded_series())
        for group in groups
        for rule in group["rules"]
    }
    assert {name: found for name, found in problems.items() if found} == {}
    assert recording_rules() <= set(recorded_series())


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("rate(kafka_consumer_lag[5m])", "metric kafka_consumer_lag"),
        ("order_viewer_consumer_lag{topic='x'}", "metric order_viewer_consumer_lag"),
        (
            'order_viewer_messages_dead_lettered_total{code="invalid_json"}',
            "label code of order_viewer_messages_dead_lettered_total",
        ),
        (
            "sum by (route) (rate(order_viewer_messages_consumed_total[5m]))",
            "label route in by/on (route)",
        ),
    ],
)
def test_the_name_check_flags_what_the_service_does_not_expose(expr: str, problem: str) -> None:
    assert problem in unknown_names(expr)
