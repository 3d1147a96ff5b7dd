"""The Grafana dashboard: the committed JSON is what deploy/grafana/dashboard.py makes, every
query names metrics and labels the service exposes, and the panels the issue asks for are there."""

from __future__ import annotations

import importlib.util
import json
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.deploy.conftest import DEPLOY, unknown_names

GENERATOR = DEPLOY / "grafana" / "dashboard.py"
DASHBOARD = DEPLOY / "grafana" / "order-viewer.json"
# What Grafana substitutes before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": "order-viewer"}


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("order_viewer_dashboard", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def queries() -> dict[tuple[str, str], str]:
    """Every panel's queries by (panel title, legend), with Grafana's variables replaced as
    Grafana would."""
    found = {}
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found[(panel["title"], target["legendFormat"])] = expr
    return found


def expressions() -> list[str]:
    return list(queries().values())


def test_the_committed_dashboard_is_the_generated_one() -> None:
    assert DASHBOARD.read_text() == generator().render(), (
        "run `python deploy/grafana/dashboard.py` and commit order-viewer.json"
    )


@pytest.mark.parametrize("expr", expressions())
def test_every_query_names_metrics_and_labels_the_service_exposes(expr: str) -> None:
    assert unknown_names(expr) == []
    assert "$" not in expr, "a Grafana variable the test does not know"


def test_every_panel_queries_the_chosen_data_source_and_job() -> None:
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    variables = {variable["name"] for variable in dashboard()["templating"]["list"]}
    assert variables == {"datasource", "job", "traces"}
    for panel in panels():
        assert panel["datasource"] == datasource, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        assert all(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == datasource
            assert 'job="$job"' in target["expr"], f"{panel['title']} ignores the job"


def test_the_panels_cover_what_operators_watch() -> None:
    titles = [panel["title"] for panel in panels()]
    for wanted in (
        "Throughput: consumed vs stored",
        "Consumer lag per partition",
        "Dead letters by reason",
        "Batch size",
        "Database write latency (one batch)",
        "Cache hit ratio",
        "Cache entries",
        "Requests by route and status",
        "Latency by route",
        "Cache warm-up time at start",
    ):
        assert wanted in titles


def test_no_two_panels_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_the_latency_panels_link_to_the_traces_of_their_operation_and_time_range() -> None:
    [traces] = [v for v in dashboard()["templating"]["list"] if v["name"] == "traces"]
    assert traces["query"] == "http://127.0.0.1:16686"  # the compose tracing profile's Jaeger
    linked = {
        panel["title"]: urlsplit(link["url"])
        for panel in panels()
        for link in panel.get("links", [])
    }
    assert set(linked) == {"Database write latency (one batch)", "Latency by route"}
    for url, operation in zip(
        linked.values(), ("INSERT orders", "GET /order/{order_uid}"), strict=True
    ):
        assert url.path == "${traces}/search"
        assert parse_qs(url.query) == {
            "service": ["order-viewer"],
            "lookback": ["custom"],
            "start": ["${__from}000"],
            "end": ["${__to}000"],
            "operation": [operation],
        }
