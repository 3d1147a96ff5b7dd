"""The composition root: the one place that reads the settings, builds the adapters and the
service layer over them, and runs the start-up steps in their order.

Every other module receives what it needs as arguments (a Kafka client configuration, a topic, a
`Patience`), never the whole settings, so that each can be built alone in a test.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

import psycopg
import sqlalchemy.exc
from confluent_kafka import KafkaException
from starlette.types import ASGIApp

from order_viewer.adapters.cache import MaskedViews, OrderCache
from order_viewer.adapters.http.access import AccessConfigurationError, AccessPolicy
from order_viewer.adapters.http.api import create_app
from order_viewer.adapters.http.auth import Authenticator, protected_mode_problem
from order_viewer.adapters.http.auth.jwt import JwtVerifier
from order_viewer.adapters.http.auth.limiter import FailureLimiter
from order_viewer.adapters.http.auth.tokens import TokenFileError, open_token_file
from order_viewer.adapters.http.forwarded import TrustedProxies
from order_viewer.adapters.kafka.broker import DeadLetterWriter, ensure_topics
from order_viewer.adapters.kafka.consumer import Batching, OrderConsumer
from order_viewer.adapters.metrics import Metrics
from order_viewer.adapters.otlp import otlp_batches
from order_viewer.adapters.postgres.expirer import PostgresOrderExpirer
from order_viewer.adapters.postgres.listener import PostgresChangeListener
from order_viewer.adapters.postgres.migrate import migrate
from order_viewer.adapters.postgres.reader import (
    PostgresOrderReader,
    newest_documents,
    stored_versions,
)
from order_viewer.adapters.postgres.trail import PostgresDeadLetterTrail
from order_viewer.adapters.postgres.writer import PostgresOrderWriter
from order_viewer.adapters.tracing import Tracing, start_tracing
from order_viewer.config import Settings, kafka_client, span_queue_size, tracing_enabled
from order_viewer.service.coherence import CacheCoherence
from order_viewer.service.events import OrderEvents
from order_viewer.service.ingest import OrderIngest
from order_viewer.service.lookup import OrderLookup, warm_up
from order_viewer.service.ports import Stopped
from order_viewer.service.readiness import Liveness, Readiness
from order_viewer.service.retention import expire_orders
from order_viewer.service.retry import Health, Patience, retry

log = logging.getLogger(__name__)

# How often the retention sweep looks for expired orders, and how many it deletes per transaction.
RETENTION_SWEEP_SECONDS = 60.0
RETENTION_BATCH = 1000


@dataclass(frozen=True, slots=True)
class Parts:
    """A service process's parts, built and wired, not started."""

    settings: Settings
    stop: threading.Event
    cache: OrderCache
    metrics: Metrics
    database: Patience
    broker: Patience
    reader: PostgresOrderReader
    writers: list[PostgresOrderWriter]
    dead_letters: DeadLetterWriter
    ingest: OrderIngest
    lookup: OrderLookup
    consumer: OrderConsumer
    coherence: CacheCoherence
    events: OrderEvents
    listener: PostgresChangeListener
    expirer: PostgresOrderExpirer | None
    readiness: Readiness
    app: ASGIApp
    # What every Kafka client shares (`config.kafka_client`), each adding its own.
    kafka: dict[str, Any]
    # Records dead letters in the orders' trails; None with ORDER_TRAIL_ENABLED=false.
    trail: PostgresDeadLetterTrail | None
    # None unless the OTEL_* variables turn tracing on.
    tracing: Tracing | None


def access_policy(settings: Settings) -> AccessPolicy | None:
    """The access policy `serve` enforces; None with HTTP_AUTH=none. Raises
    AccessConfigurationError when the settings would serve orders to anyone beyond loopback
    (protected mode) or name a tokens file that cannot be used."""
    problem = protected_mode_problem(
        settings.http_auth, settings.http_host, allow_anonymous=settings.http_allow_anonymous
    )
    if problem is not None:
        raise AccessConfigurationError(problem)
    authenticator: Authenticator
    if settings.http_auth == "token":
        assert settings.http_tokens_file is not None  # the settings validated it
        try:
            authenticator = open_token_file(settings.http_tokens_file)
        except TokenFileError as error:
            raise AccessConfigurationError(f"HTTP_TOKENS_FILE: {error}") from None
    elif settings.http_auth == "jwt":
        assert settings.http_jwt_jwks_url is not None
        assert settings.http_jwt_issuer is not None
        assert settings.http_jwt_audience is not None
        authenticator = JwtVerifier(
            str(settings.http_jwt_jwks_url),
            settings.http_jwt_issuer,
            settings.http_jwt_audience,
            max_lifetime=settings.http_jwt_max_lifetime_seconds,
        )
    else:
        return None
    return AccessPolicy(
        authenticator,
        FailureLimiter(),
        MaskedViews(settings.cache_capacity, settings.cache_max_bytes),
        TrustedProxies(settings.http_trusted_proxies) if settings.http_trusted_proxies else None,
    )


def group_membership(settings: Settings) -> dict[str, str | int]:
    """The consumer group settings, under librdkafka's names."""
    group: dict[str, str | int] = {"group.id": settings.kafka_group_id}
    if settings.kafka_group_protocol == "consumer":
        # librdkafka refuses the session settings under this protocol: the broker holds them.
        group["group.protocol"] = "consumer"
        return group
    group["session.timeout.ms"] = settings.kafka_session_timeout_ms
    if settings.kafka_group_instance_id is not None:
        group["group.instance.id"] = settings.kafka_group_instance_id
    return group


def build(settings: Settings, access: AccessPolicy | None) -> Parts:
    """Every part of the service, unstarted; `access` guards the routes with order data, and
    None (open to all) is refused when the settings ask for authentication."""
    if access is None and settings.http_auth != "none":
        raise ValueError(f"HTTP_AUTH={settings.http_auth} but no access policy to enforce it")
    stop = threading.Event()
    max_backoff = settings.retry_max_backoff_ms / 1000
    # One health record per dependency, shared by every part that uses it, so that an outage
    # is logged once however many parts notice it.
    database = Patience(
        Health("database", logging.getLogger("order_viewer.database")), stop, max_backoff
    )
    broker = Patience(
        Health("Kafka broker", logging.getLogger("order_viewer.broker")), stop, max_backoff
    )
    database_url = str(settings.database_url)
    kafka = kafka_client(settings)
    # Names this instance in its change notifications, so that it skips its own.
    instance = uuid.uuid4().hex
    cache = OrderCache(
        settings.cache_capacity, settings.cache_max_bytes, settings.cache_absent_capacity
    )
    metrics = Metrics(cache)
    tracing = (
        start_tracing(
            settings.kafka_group_id,
            otlp_batches(
                queue_size=span_queue_size(settings),
                batch_size=settings.otel_bsp_max_export_batch_size,
                delay_ms=settings.otel_bsp_schedule_delay,
            ),
        )
        if tracing_enabled(settings)
        else None
    )
    reader = PostgresOrderReader(database_url, settings.database_pool_size, tracing)
    writers = [
        PostgresOrderWriter(database_url, instance, settings.database_write_timeout_seconds)
        for _ in range(settings.database_writers)
    ]
    dead_letters = DeadLetterWriter(kafka, settings.kafka_dlq_topic, broker, metrics)
    trail = PostgresDeadLetterTrail(database_url) if settings.order_trail_enabled else None
    ingest = OrderIngest(
        writers,
        cache,
        dead_letters,
        database,
        metrics,
        delete_on_tombstone=settings.kafka_tombstones == "delete",
        trail=trail,
        tracing=tracing,
    )
    liveness = Liveness()
    consumer = OrderConsumer(
        client={
            **kafka,
            **group_membership(settings),
            "max.poll.interval.ms": settings.kafka_max_poll_interval_ms,
        },
        topic=settings.kafka_topic,
        batching=Batching(
            settings.batch_max_orders,
            settings.batch_max_bytes,
            settings.batch_max_wait_ms / 1000,
        ),
        ingest=ingest,
        broker=broker.health,
        stop=stop,
        metrics=metrics,
        stall_timeout_seconds=settings.kafka_stall_timeout_ms / 1000,
        liveness=liveness,
    )
    lookup = OrderLookup(reader, cache)
    coherence = CacheCoherence(
        cache, metrics, partial(stored_versions, database_url), database, _in_background
    )
    events = OrderEvents(reader.states, settings.http_events_max_streams)
    listener = PostgresChangeListener(database_url, instance, coherence, database, events)
    expirer = (
        PostgresOrderExpirer(database_url, instance)
        if settings.order_retention_days is not None
        else None
    )
    readiness = Readiness(
        lookup.database_reachable,
        consumer.consuming,
        coherence.listening_now,
        ingest.write_timeouts,
        liveness,
    )
    app = create_app(
        lookup,
        readiness,
        metrics if settings.metrics_enabled else None,
        access,
        tls=settings.http_tls_cert_file is not None,
        trails=settings.order_trail_enabled,
        events=events,
        tracing=tracing,
    )
    return Parts(
        settings, stop, cache, metrics, database, broker, reader, writers, dead_letters,
        ingest, lookup, consumer, coherence, events, listener, expirer, readiness, app, kafka,
        trail, tracing,
    )  # fmt: skip


# The cycle collector looks at young objects every 50,000 allocations instead of every 700: a
# batch being validated and written (2,000 orders of about 15 objects) then mostly dies before it
# is looked at, instead of being promoted and scanned again by the older generations' passes
# (the profile section of `make bench` measures it; docs/PERFORMANCE.md).
COLLECTOR_THRESHOLDS = (50_000, 20, 10)


def tune_interpreter(settings: Settings) -> None:
    """The collector's thresholds and the interpreter's switch interval, for the whole process."""
    gc.set_threshold(*COLLECTOR_THRESHOLDS)
    sys.setswitchinterval(settings.interpreter_switch_interval_us / 1_000_000)


def start(parts: Parts) -> None:
    """The start-up steps, in order, then consumption until the stop: the schema, the change
    listener listening (it runs in a thread of its own, see `run_in_background`), the warm cache,
    the topics, the consumer. Raises Stopped if a stop comes while a dependency is away, and any
    other exception to say the process cannot go on."""
    settings = parts.settings
    tune_interpreter(settings)
    retry(
        partial(migrate, str(settings.database_url)),
        transient=(psycopg.OperationalError, sqlalchemy.exc.OperationalError),
        patience=parts.database,
    )
    while not parts.coherence.listening_now.wait(0.1):
        if parts.stop.is_set():
            raise Stopped
    warm_up(
        parts.cache,
        partial(newest_documents, str(settings.database_url)),
        parts.database,
        parts.metrics,
    )
    # What exists now (modules, the app, the warm cache) lives as long as the process. Frozen,
    # it is skipped by the collector's full passes, which otherwise scanned it all, holding
    # the GIL while reads waited (docs/PERFORMANCE.md).
    gc.collect()
    gc.freeze()
    parts.readiness.warmed.set()
    ensure_topics(
        parts.kafka,
        [settings.kafka_topic, settings.kafka_dlq_topic],
        settings.kafka_topic_partitions,
        parts.broker,
    )
    parts.consumer.run()


def sweep_expired(parts: Parts, retention_days: int) -> None:
    """Delete expired orders now and then every RETENTION_SWEEP_SECONDS, until the stop; the
    first sweep waits for the schema and the warm cache."""
    assert parts.expirer is not None
    while not parts.readiness.warmed.wait(0.5):
        if parts.stop.is_set():
            return
    while True:
        expire_orders(
            parts.expirer, parts.cache, parts.metrics, parts.database,
            retention=timedelta(days=retention_days), batch=RETENTION_BATCH,
        )  # fmt: skip
        if parts.stop.wait(RETENTION_SWEEP_SECONDS):
            return


def run_in_background(parts: Parts, on_failure: Callable[[], object]) -> list[threading.Thread]:
    """`start`, the change listener and the retention sweep, each in a thread of its own; if one
    fails, the reason is logged and `on_failure` called (the server stops and the process exits
    with 1), never a service that stays up unready."""

    def failed() -> None:
        parts.readiness.failed.set()
        parts.stop.set()
        on_failure()

    targets: list[tuple[str, Callable[[], object]]] = [
        ("listener", parts.listener.run),
        ("consumer", partial(start, parts)),
    ]
    if parts.settings.order_retention_days is not None:
        targets.append(
            ("retention", partial(sweep_expired, parts, parts.settings.order_retention_days))
        )
    threads = [
        threading.Thread(target=_logging_failure(target, failed), name=name)
        for name, target in targets
    ]
    for thread in threads:
        thread.start()
    return threads


def _in_background(target: Callable[[], object]) -> None:
    """`target` in a thread of its own that does not hold up the process's exit; a failure is
    logged, not fatal (used to check the cache after the change listener reconnects, a check
    that retries its own failures until it succeeds, a stop or another loss)."""

    def run() -> None:
        try:
            target()
        except Stopped:
            return
        except Exception:
            log.exception("checking the cached orders failed")

    threading.Thread(target=run, name="cache-check", daemon=True).start()


def _logging_failure(
    target: Callable[[], object], failed: Callable[[], object]
) -> Callable[[], None]:
    """`target` run to its end; if it fails for another reason than a stop, the reason is logged
    and `failed` called."""

    def run() -> None:
        try:
            target()
        except Stopped:
            return
        except KafkaException as error:
            # librdkafka's own reason (fenced, authorization, ...) says all there is to say.
            log.error(
                "Kafka reported an error the service cannot recover from: %s; stopping the service",
                error.args[0].str(),
            )
        except Exception:
            log.exception("the service cannot go on; stopping")
        else:
            return
        failed()

    return run


def close(parts: Parts) -> None:
    parts.dead_letters.close()
    for writer in parts.writers:
        writer.close()
    if parts.expirer is not None:
        parts.expirer.close()
    if parts.trail is not None:
        parts.trail.close()
    if parts.tracing is not None:
        # Last, so that the spans of the final batches and requests are exported.
        parts.tracing.shutdown()
