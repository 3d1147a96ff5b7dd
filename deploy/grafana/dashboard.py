"""The order-viewer Grafana dashboard, as code: `python deploy/grafana/dashboard.py` writes
order-viewer.json beside this file. A test checks that the committed file is what this code
makes and that every query names metrics the service exposes."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DashboardLink,
    DatasourceVariable,
    QueryVariable,
    Row,
    TextBoxVariable,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DashboardLinkType,
    DataSourceRef,
    Panel,
    VariableRefresh,
)

OUTPUT = Path(__file__).with_name("order-viewer.json")
UID = "order-viewer"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
JOB = 'job="$job"'
RATE = "[$__rate_interval]"
HEIGHT = 8
# Where the traces are (docs/OPERATIONS.md): Jaeger's UI, by default the compose tracing
# profile's. The service's histograms carry no exemplars (its HTTP statistics are counted by
# hand, docs/PERFORMANCE.md), so the latency panels link to the traces of their time range, which
# Jaeger's search takes in microseconds.
TRACES_UI = "http://127.0.0.1:16686"
TRACES_SEARCH = (
    "${traces}/search?service=order-viewer&lookback=custom&start=${__from}000&end=${__to}000"
)


def query(expr: str, legend: str) -> Dataquery:
    return Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)


def with_queries(panel: Timeseries | Stat, queries: tuple[Dataquery, ...]) -> Timeseries | Stat:
    for ref_id, target in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(target.ref_id(ref_id))
    return panel


def timeseries(title: str, unit: str, *queries: Dataquery, width: int = 12) -> Builder[Panel]:
    panel = Timeseries().title(title).unit(unit).datasource(DATASOURCE)
    return with_queries(panel.height(HEIGHT).span(width), queries)


def with_traces(panel: Builder[Panel], operation: str) -> Builder[Panel]:
    """The panel with a link to the traces of `operation` in its time range."""
    assert isinstance(panel, Timeseries)
    link = (
        DashboardLink(f"Traces: {operation}")
        .type(DashboardLinkType.LINK)
        .url(f"{TRACES_SEARCH}&operation={quote(operation)}")
        .target_blank(True)
    )
    return panel.links([link])


def stat(title: str, unit: str, *queries: Dataquery, width: int = 12) -> Builder[Panel]:
    panel = Stat().title(title).unit(unit).datasource(DATASOURCE)
    return with_queries(panel.height(HEIGHT).span(width), queries)


def rate(metric: str, by: str = "", selector: str = JOB) -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{{selector}}}{RATE}))"


def quantile(q: float, histogram: str, by: str = "le") -> str:
    return f"histogram_quantile({q}, {rate(histogram + '_bucket', by)})"


def ingest() -> list[Builder[Panel]]:
    batch = "order_viewer_batch_size_messages"
    write = "order_viewer_database_write_duration_seconds"
    return [
        timeseries(
            "Throughput: consumed vs stored",
            "ops",
            query(rate("order_viewer_messages_consumed_total"), "consumed"),
            query(rate("order_viewer_orders_stored_total"), "stored (new)"),
            query(rate("order_viewer_orders_replaced_total"), "stored (replaced)"),
            query(rate("order_viewer_messages_dead_lettered_total"), "dead-lettered"),
        ),
        timeseries(
            "Consumer lag per partition",
            "short",
            # A pod that lost a partition keeps its last figure: the live owner's is the max.
            query(
                f"max by (topic, partition) (order_viewer_consumer_lag_messages{{{JOB}}})",
                "{{topic}}/{{partition}}",
            ),
        ),
        timeseries(
            "Dead letters by reason",
            "ops",
            query(rate("order_viewer_messages_dead_lettered_total", "reason"), "{{reason}}"),
        ),
        timeseries(
            "Retries after transient failures, by what failed",
            "ops",
            query(rate("order_viewer_transient_failure_retries_total", "kind"), "{{kind}}"),
            query(
                rate("order_viewer_dead_letter_write_failures_total"),
                "dead letters not acknowledged",
            ),
        ),
        timeseries(
            "Batch size",
            "short",
            query(quantile(0.5, batch), "p50"),
            query(quantile(0.99, batch), "p99"),
            query(f"{rate(batch + '_sum')} / {rate(batch + '_count')}", "mean"),
        ),
        with_traces(
            timeseries(
                "Database write latency (one batch)",
                "s",
                query(quantile(0.5, write), "p50"),
                query(quantile(0.99, write), "p99"),
            ),
            "INSERT orders",
        ),
        timeseries(
            "Age of the newest stored order",
            "s",
            query(f"order_viewer_newest_order_age_seconds{{{JOB}}}", "{{instance}}"),
            width=24,
        ),
    ]


def cache() -> list[Builder[Panel]]:
    hits = rate("order_viewer_cache_hits_total")
    misses = rate("order_viewer_cache_misses_total")
    return [
        timeseries(
            "Cache hit ratio",
            "percentunit",
            query(f"{hits} / ({hits} + {misses})", "hit ratio"),
            width=8,
        ),
        timeseries(
            "Cache entries",
            "short",
            query(f"order_viewer_cache_entries{{{JOB}}}", "{{instance}} entries"),
            query(f"order_viewer_cache_capacity{{{JOB}}}", "{{instance}} capacity"),
            width=8,
        ),
        timeseries(
            "Cache bytes",
            "bytes",
            query(f"order_viewer_cache_bytes{{{JOB}}}", "{{instance}} bytes"),
            query(f"order_viewer_cache_max_bytes{{{JOB}}}", "{{instance}} limit"),
            width=8,
        ),
        timeseries(
            "Cache evictions",
            "ops",
            query(rate("order_viewer_cache_evictions_total"), "evictions"),
        ),
        stat(
            "Cache warm-up time at start",
            "s",
            query(f"order_viewer_cache_warm_up_duration_seconds{{{JOB}}}", "{{instance}}"),
        ),
    ]


def http() -> list[Builder[Panel]]:
    requests = "order_viewer_http_requests_total"
    latency = "order_viewer_http_request_duration_seconds"
    return [
        timeseries(
            "Requests by route and status",
            "reqps",
            query(rate(requests, "route, status"), "{{route}} {{status}}"),
        ),
        with_traces(
            timeseries(
                "Latency by route",
                "s",
                query(quantile(0.5, latency, "route, le"), "p50 {{route}}"),
                query(quantile(0.99, latency, "route, le"), "p99 {{route}}"),
            ),
            "GET /order/{order_uid}",
        ),
        timeseries(
            "5xx ratio (readiness probes left out)",
            "percentunit",
            query(
                rate(requests, selector=f'{JOB},route!="/readyz",status=~"5.."')
                + " / "
                + rate(requests, selector=f'{JOB},route!="/readyz"'),
                "5xx",
            ),
            width=24,
        ),
    ]


def build() -> Dashboard:
    dashboard = (
        Dashboard("order-viewer")
        .uid(UID)
        .tags(["order-viewer", "kafka", "postgresql"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            QueryVariable("job")
            .label("Job")
            .datasource(DATASOURCE)
            .query("label_values(order_viewer_messages_consumed_total, job)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        )
        .with_variable(
            TextBoxVariable("traces").label("Traces UI (Jaeger)").default_value(TRACES_UI)
        )
    )
    for title, panels in (("Ingest", ingest()), ("Cache", cache()), ("HTTP", http())):
        dashboard = dashboard.with_row(Row(title))
        for panel in panels:
            dashboard = dashboard.with_panel(panel)
    return dashboard


def render() -> str:
    return json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render())
