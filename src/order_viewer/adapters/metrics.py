"""Prometheus metrics: what the service consumed, stored, dead-lettered and served."""

from __future__ import annotations

import json
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from order_viewer.adapters.cache import MaskedViews, OrderCache
from order_viewer.adapters.http.auth.tokens import TokenFile
from order_viewer.service.events import OrderEvents
from order_viewer.service.ports import SettledBatch, TimeoutCause

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# The path of an order is this prefix and its id, whatever the client sent after it.
ORDER_PATH = "/order/"
ORDER_ROUTE = f"{ORDER_PATH}{{order_uid}}"
TRAIL_SUFFIX = "/trail"
TRAIL_ROUTE = f"{ORDER_ROUTE}{TRAIL_SUFFIX}"
# The stream of an order's changes: its path and this suffix.
EVENTS_SUFFIX = "/events"
EVENTS_ROUTE = f"{ORDER_ROUTE}{EVENTS_SUFFIX}"
PAGE_FILES = "/static"
DOCS_FILES = "/docs/static"
_ROUTES = ("/", "/orders", "/livez", "/readyz", "/metrics", "/openapi.json", "/docs")


# The gauges the ingest process alone sets: the serving process exposes its values of them.
INGEST_GAUGES = frozenset(
    {"order_viewer_consumer_lag_messages", "order_viewer_newest_order_age_seconds"}
)


class Metrics:
    """Every metric of one service process, in a registry of its own (`registry`); `exposed`
    adds the ingest process's figures (`add_ingest`) to them, for `/metrics`. Without a cache:
    the ingest process's, which has none."""

    def __init__(self, cache: OrderCache | None) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._combined = _Combined(registry)
        self.exposed = CollectorRegistry(auto_describe=False)
        self.exposed.register(self._combined)
        self.messages_consumed = Counter(
            "order_viewer_messages_consumed",
            "Messages read from the orders topic.",
            registry=registry,
        )
        self.orders_stored = Counter(
            "order_viewer_orders_stored", "Orders stored for the first time.", registry=registry
        )
        self.orders_replaced = Counter(
            "order_viewer_orders_replaced",
            "Stored orders replaced by a later message with other content.",
            registry=registry,
        )
        self.orders_deleted = Counter(
            "order_viewer_orders_deleted",
            "Stored orders deleted by a tombstone (KAFKA_TOMBSTONES=delete).",
            registry=registry,
        )
        self.orders_expired = Counter(
            "order_viewer_orders_expired",
            "Stored orders deleted by this instance for being older than ORDER_RETENTION_DAYS.",
            registry=registry,
        )
        self.listener_connected = Gauge(
            "order_viewer_change_listener_connected",
            "1 while the connection that hears other instances' changes is listening, else 0 "
            "(the cache then answers nothing until its entries are verified).",
            registry=registry,
        )
        self.changes_heard = Counter(
            "order_viewer_changes_heard",
            "Orders other instances stored, replaced or deleted, as heard by this one.",
            registry=registry,
        )
        self.dead_lettered = Counter(
            "order_viewer_messages_dead_lettered",
            "Messages sent to the dead-letter topic, by reason code.",
            ["reason"],
            registry=registry,
        )
        self.dead_letter_failures = Counter(
            "order_viewer_dead_letter_write_failures",
            "Dead-letter deliveries the broker did not acknowledge (each is retried).",
            registry=registry,
        )
        self.retries = Counter(
            "order_viewer_transient_failure_retries",
            "Retries after a transient failure, by what failed.",
            ["kind"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "order_viewer_batch_size_messages",
            "Messages per consumed batch.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
            registry=registry,
        )
        self.write_duration = Histogram(
            "order_viewer_database_write_duration_seconds",
            "Time to store one batch in PostgreSQL (one transaction).",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.write_timeouts = Counter(
            "order_viewer_database_write_timeouts",
            "Writes cut by their deadline (DATABASE_WRITE_TIMEOUT_SECONDS), each retried, by "
            "cause: lock (another session held a lock too long), statement (a statement ran too "
            "long) or unresponsive (the server answered nothing).",
            ["cause"],
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "order_viewer_consumer_lag_messages",
            "End offset minus committed offset, per partition of the orders topic.",
            ["topic", "partition"],
            registry=registry,
        )
        self.consumer_restarts = Counter(
            "order_viewer_consumer_restarts",
            "Kafka consumers the service closed and made again, by reason (stalled: it asked "
            "for messages for KAFKA_STALL_TIMEOUT_MS and got none while the broker answered and "
            "held some beyond its position; unassigned: it had no partition, and its group "
            "committed nothing, for that long while messages waited).",
            ["reason"],
            registry=registry,
        )
        # Exposed at 0 from the start: a labelled counter appears with its first increment,
        # which Prometheus cannot see as a rise, and the first restart is the one to notice.
        for reason in ("stalled", "unassigned"):
            self.consumer_restarts.labels(reason)
        self.warm_up_duration = Gauge(
            "order_viewer_cache_warm_up_duration_seconds",
            "How long loading the cache at start took.",
            registry=registry,
        )
        self._newest_order: datetime | None = None
        newest_age = Gauge(
            "order_viewer_newest_order_age_seconds",
            "Now minus date_created of the newest order stored since start.",
            registry=registry,
        )
        newest_age.set_function(self._newest_order_age)
        self.http = HttpStats()
        registry.register(self.http)
        if cache is not None:
            registry.register(_CacheCollector(cache))

    def add_ingest(self, families: Callable[[], list[Metric]]) -> None:
        """Expose the ingest process's figures (its `ingest_families`, as last heard) with this
        process's own."""
        self._combined.ingest = families

    def ingest_families(self) -> list[Metric]:
        """What this process counted and measured of the ingest, for the serving process to
        expose: every counter and histogram (added there to its own), and the gauges only the
        ingest sets (`INGEST_GAUGES`)."""
        return [
            family
            for family in self.registry.collect()
            if family.type in _ADDED or family.name in INGEST_GAUGES
        ]

    def count_masked_views(self, views: MaskedViews) -> None:
        """Gauges of the masked views too, which exist only with authentication on."""
        self.registry.register(_MaskedViewsCollector(views))

    def count_token_file(self, tokens: TokenFile) -> None:
        """A gauge of the tokens file too, which is read only with HTTP_AUTH=token."""
        self.registry.register(_TokenFileCollector(tokens))

    def count_event_streams(self, events: OrderEvents) -> None:
        """Gauges of the streams of orders' changes, which exist only where the app serves them."""
        open_streams = Gauge(
            "order_viewer_http_event_streams",
            "Streams of orders' changes (GET /order/{id}/events) open now.",
            registry=self.registry,
        )
        open_streams.set_function(lambda: events.open_streams)
        Gauge(
            "order_viewer_http_event_streams_max",
            "HTTP_EVENTS_MAX_STREAMS: beyond it a new stream gets 503.",
            registry=self.registry,
        ).set(events.max_streams)

    def order_stored(self, date_created: datetime) -> None:
        if self._newest_order is None or date_created > self._newest_order:
            self._newest_order = date_created

    # What the service layer counts and measures (`ports.ServiceMetrics`).

    def write_timed_out(self, cause: TimeoutCause) -> None:
        self.write_timeouts.labels(cause).inc()

    def batch_written(self, seconds: float) -> None:
        self.write_duration.observe(seconds)

    def retried(self, kind: str) -> None:
        self.retries.labels(kind).inc()

    def batch_settled(self, batch: SettledBatch) -> None:
        self.orders_stored.inc(batch.inserted)
        self.orders_replaced.inc(batch.replaced)
        self.orders_deleted.inc(batch.deleted)
        for reason in batch.dead_lettered:
            self.dead_lettered.labels(reason).inc()
        if batch.newest is not None:
            self.order_stored(batch.newest)

    def warmed_up(self, seconds: float) -> None:
        self.warm_up_duration.set(seconds)

    def heard_changes(self, orders: int) -> None:
        self.changes_heard.inc(orders)

    def listener_state(self, listening: bool) -> None:
        self.listener_connected.set(int(listening))

    def expired(self, orders: int) -> None:
        self.orders_expired.inc(orders)

    def _newest_order_age(self) -> float:
        if self._newest_order is None:
            return float("nan")
        return time.time() - self._newest_order.timestamp()

    def librdkafka_statistics(self, statistics_json: str) -> None:
        """Consumer lag from librdkafka's periodic statistics (no extra broker requests)."""
        statistics = json.loads(statistics_json)
        for topic, details in statistics.get("topics", {}).items():
            for partition, figures in details.get("partitions", {}).items():
                lag = figures.get("consumer_lag", -1)
                if partition != "-1" and lag >= 0:
                    self.consumer_lag.labels(topic, partition).set(lag)


def order_below(path: str, suffix: str) -> str | None:
    """The order id (as the path holds it, whatever it is) of a path that asks for the resource
    `suffix` of an order (its trail, its events), or None. An order id holds no '/', so no
    order is taken for one of them."""
    rest = path[len(ORDER_PATH) :]
    if path.startswith(ORDER_PATH) and rest.endswith(suffix):
        return rest[: -len(suffix)]
    return None


def trail_of(path: str) -> str | None:
    """The order id whose trail `path` asks for, or None."""
    return order_below(path, TRAIL_SUFFIX)


def events_of(path: str) -> str | None:
    """The order id whose stream of changes `path` asks for, or None."""
    return order_below(path, EVENTS_SUFFIX)


def route_template(path: str) -> str:
    """The route a path belongs to; never the raw id, so the label set stays small."""
    if path.startswith(ORDER_PATH):
        if trail_of(path) is not None:
            return TRAIL_ROUTE
        return ORDER_ROUTE if events_of(path) is None else EVENTS_ROUTE
    for files in (PAGE_FILES, DOCS_FILES):
        if path.startswith(files + "/"):
            return files
    return path if path in _ROUTES else "other"


class HttpStats(Collector):
    """HTTP requests by route template and status, and their latency histogram by route.

    Counted by hand rather than with prometheus_client's Counter and Histogram: those take a
    lock and resolve labels on every call, a large share of a cache hit's time (the figures are
    in docs/PERFORMANCE.md). Only the event loop thread records, and scrapes run on it too.
    """

    def __init__(self) -> None:
        # (route, status) -> [count, sum of seconds, count per bucket (the last is +Inf)]
        self._requests: dict[tuple[str, int], list[Any]] = {}

    def record(self, route: str, status: int, seconds: float) -> None:
        entry = self._requests.get((route, status))
        if entry is None:
            entry = self._requests[(route, status)] = [0, 0.0, [0] * (len(_LATENCY_BUCKETS) + 1)]
        entry[0] += 1
        entry[1] += seconds
        entry[2][bisect_left(_LATENCY_BUCKETS, seconds)] += 1

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "order_viewer_http_requests",
            "HTTP requests, by route template and status.",
            labels=["route", "status"],
        )
        by_route: dict[str, list[Any]] = {}
        for (route, status), (count, seconds, buckets) in self._requests.items():
            requests.add_metric([route, str(status)], count)
            total = by_route.setdefault(route, [0.0, [0] * len(buckets)])
            total[0] += seconds
            total[1] = [a + b for a, b in zip(total[1], buckets, strict=True)]
        yield requests
        duration = HistogramMetricFamily(
            "order_viewer_http_request_duration_seconds",
            "Time from request to the end of the response, by route template.",
            labels=["route"],
        )
        for route, (seconds, buckets) in by_route.items():
            cumulative = list(accumulate(buckets))
            bounds = [*(str(bound) for bound in _LATENCY_BUCKETS), "+Inf"]
            duration.add_metric([route], list(zip(bounds, cumulative, strict=True)), seconds)
        yield duration


# The kinds of metric whose figures from two processes are added up, sample by sample.
_ADDED = frozenset({"counter", "histogram"})


def combined(own: Iterable[Metric], other: Iterable[Metric]) -> list[Metric]:
    """Two processes' metric families as one: counters and histograms added up sample by sample
    (except when each began, `own`'s), `other`'s gauges in place of `own`'s, and the families
    only one of them has as they are."""
    others = {family.name: family for family in other}
    families = []
    for family in own:
        theirs = others.pop(family.name, None)
        if theirs is None:
            families.append(family)
        elif family.type not in _ADDED:
            families.append(theirs)
        else:
            families.append(_added(family, theirs))
    families.extend(others.values())
    return families


def _added(own: Metric, other: Metric) -> Metric:
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], Sample] = {}
    for family in (own, other):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            if key not in samples:
                samples[key] = sample
                values[key] = sample.value
            elif not sample.name.endswith("_created"):
                values[key] += sample.value
    added = Metric(own.name, own.documentation, own.type, own.unit)
    added.samples = [sample._replace(value=values[key]) for key, sample in samples.items()]
    return added


class _Combined(Collector):
    """A process's own metrics with the ingest process's added (`combined`)."""

    def __init__(self, own: CollectorRegistry) -> None:
        self._own = own
        self.ingest: Callable[[], list[Metric]] = list

    def collect(self) -> Iterator[Metric]:
        yield from combined(self._own.collect(), self.ingest())


class _MaskedViewsCollector(Collector):
    """The masked views' cache, which the cache's bounds bound too: memory beside the cache's."""

    def __init__(self, views: MaskedViews) -> None:
        self._views = views

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "order_viewer_masked_views_entries",
            "Masked orders kept for tokens without orders:read:pii.",
            value=len(self._views),
        )
        yield GaugeMetricFamily(
            "order_viewer_masked_views_bytes",
            "Bytes of masked order bodies kept, as held (compressed), beside the cache's "
            "(bounded by CACHE_MAX_BYTES).",
            value=self._views.bytes,
        )


class _TokenFileCollector(Collector):
    """The lines of HTTP_TOKENS_FILE that admit no token for not parsing. While the file cannot
    be read at all no token is admitted, Prometheus' own included: that shows as a scrape that
    fails (OrderViewerDown), not as a figure here."""

    def __init__(self, tokens: TokenFile) -> None:
        self._tokens = tokens

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "order_viewer_tokens_file_refused_lines",
            "Lines of HTTP_TOKENS_FILE refused at its last read (each admits no token; the log "
            "names their numbers).",
            value=self._tokens.refused_lines,
        )


class _CacheCollector(Collector):
    """Reads the cache's own counters at scrape time, so lookups pay nothing for them."""

    def __init__(self, cache: OrderCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        cache = self._cache
        yield GaugeMetricFamily(
            "order_viewer_cache_entries", "Orders in the cache.", value=len(cache)
        )
        yield GaugeMetricFamily(
            "order_viewer_cache_capacity", "Most orders the cache keeps.", value=cache.capacity
        )
        yield GaugeMetricFamily(
            "order_viewer_cache_bytes",
            "Bytes of order bodies in the cache, as held (compressed).",
            value=cache.bytes,
        )
        if cache.max_bytes is not None:
            yield GaugeMetricFamily(
                "order_viewer_cache_max_bytes",
                "Most bytes of order bodies the cache keeps, as held (compressed).",
                value=cache.max_bytes,
            )
        yield GaugeMetricFamily(
            "order_viewer_cache_suspended",
            "1 while the cache answers no lookup (changes could go unheard, or its entries are "
            "being checked after the change listener reconnected), else 0.",
            value=int(cache.suspended),
        )
        yield CounterMetricFamily(
            "order_viewer_cache_hits", "Lookups answered from the cache.", value=cache.hits
        )
        yield CounterMetricFamily(
            "order_viewer_cache_misses",
            "Lookups not in the cache nor remembered absent: each reads the database.",
            value=cache.misses,
        )
        yield CounterMetricFamily(
            "order_viewer_cache_absent_hits",
            "Lookups answered 404 from memory: ids the database had answered absent for, with no "
            "change of them heard since (neither hits nor misses).",
            value=cache.absent_hits,
        )
        yield GaugeMetricFamily(
            "order_viewer_cache_absent_entries",
            "Ids remembered as absent (bounded by CACHE_ABSENT_CAPACITY).",
            value=cache.absent_entries,
        )
        yield CounterMetricFamily(
            "order_viewer_cache_invalidations",
            "Cached orders dropped because another instance replaced or deleted them, or this "
            "one deleted them.",
            value=cache.invalidations,
        )
        yield CounterMetricFamily(
            "order_viewer_cache_suspensions",
            "Times the cache stopped answering because changes could go unheard (once at "
            "start, until the change listener first listens).",
            value=cache.suspensions,
        )
        yield CounterMetricFamily(
            "order_viewer_cache_evictions",
            "Orders evicted to keep the cache within its bounds.",
            value=cache.evictions,
        )
