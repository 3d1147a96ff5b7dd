"""The composition root: the one place that reads the settings, builds the adapters and the
service layer over them, and runs the start-up steps in their order.

Every other module receives what it needs as arguments (a Kafka client configuration, a topic, a
`Patience`), never the whole settings, so that each can be built alone in a test.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import psycopg
import sqlalchemy.exc
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from starlette.types import ASGIApp

from order_viewer.adapters import logs
from order_viewer.adapters.cache import MaskedViews, OrderCache
from order_viewer.adapters.http.access import AccessConfigurationError, AccessPolicy
from order_viewer.adapters.http.api import create_app
from order_viewer.adapters.http.auth import Authenticator, protected_mode_problem
from order_viewer.adapters.http.auth.jwt import JwtVerifier
from order_viewer.adapters.http.auth.limiter import FailureLimiter
from order_viewer.adapters.http.auth.tokens import TokenFileError, open_token_file
from order_viewer.adapters.http.forwarded import TrustedProxies
from order_viewer.adapters.ingest_process import (
    CANNOT_GO_ON,
    IngestFailed,
    IngestLink,
    IngestProcess,
    IngestStatus,
    die_with_the_serving_process,
    report_status,
)
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
from order_viewer.service.readiness import IngestHere, Liveness, Readiness
from order_viewer.service.retention import expire_orders
from order_viewer.service.retry import Health, Patience, retry

log = logging.getLogger(__name__)

# How often the retention sweep looks for expired orders, and how many it deletes per transaction.
RETENTION_SWEEP_SECONDS = 60.0
RETENTION_BATCH = 1000


@dataclass(frozen=True, slots=True)
class Parts:
    """The serving process's parts, built and wired, not started."""

    settings: Settings
    stop: threading.Event
    cache: OrderCache
    metrics: Metrics
    database: Patience
    reader: PostgresOrderReader
    lookup: OrderLookup
    coherence: CacheCoherence
    events: OrderEvents
    listener: PostgresChangeListener
    expirer: PostgresOrderExpirer | None
    readiness: Readiness
    app: ASGIApp
    # The ingest process beside this one, not started.
    ingest: IngestProcess
    # None unless the OTEL_* variables turn tracing on.
    tracing: Tracing | None


@dataclass(frozen=True, slots=True)
class IngestParts:
    """The ingest process's parts, built and wired, not started."""

    settings: Settings
    stop: threading.Event
    metrics: Metrics
    database: Patience
    broker: Patience
    writers: list[PostgresOrderWriter]
    dead_letters: DeadLetterWriter
    ingest: OrderIngest
    consumer: OrderConsumer
    liveness: Liveness
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
    """Every part of the serving process, unstarted; `access` guards the routes with order data,
    and None (open to all) is refused when the settings ask for authentication."""
    if access is None and settings.http_auth != "none":
        raise ValueError(f"HTTP_AUTH={settings.http_auth} but no access policy to enforce it")
    stop = threading.Event()
    database = _patience("database", stop, settings)
    database_url = str(settings.database_url)
    # Names this instance (both its processes) in its change notifications, so that it skips
    # its own.
    instance = uuid.uuid4().hex
    cache = OrderCache(
        settings.cache_capacity, settings.cache_max_bytes, settings.cache_absent_capacity
    )
    metrics = Metrics(cache)
    tracing = _tracing(settings)
    reader = PostgresOrderReader(database_url, settings.database_pool_size, tracing)
    ingest = IngestProcess(
        ingest_process_main, (settings, instance), cache, settings.retry_max_backoff_ms / 1000
    )
    metrics.add_ingest(ingest.families)
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
    readiness = Readiness(lookup.database_reachable, coherence.listening_now, ingest)
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
        settings, stop, cache, metrics, database, reader, lookup, coherence, events, listener,
        expirer, readiness, app, ingest, tracing,
    )  # fmt: skip


def build_ingest(
    settings: Settings, instance: str, written: IngestLink, stop: threading.Event
) -> IngestParts:
    """Every part of the ingest process, unstarted: what it commits goes to `written`."""
    database = _patience("database", stop, settings)
    broker = _patience("Kafka broker", stop, settings)
    database_url = str(settings.database_url)
    kafka = kafka_client(settings)
    metrics = Metrics(None)
    tracing = _tracing(settings)
    writers = [
        PostgresOrderWriter(database_url, instance, settings.database_write_timeout_seconds)
        for _ in range(settings.database_writers)
    ]
    dead_letters = DeadLetterWriter(kafka, settings.kafka_dlq_topic, broker, metrics)
    trail = PostgresDeadLetterTrail(database_url) if settings.order_trail_enabled else None
    ingest = OrderIngest(
        writers,
        written,
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
        admin=AdminClient(kafka),
    )
    return IngestParts(
        settings, stop, metrics, database, broker, writers, dead_letters, ingest, consumer,
        liveness, kafka, trail, tracing,
    )  # fmt: skip


def _patience(dependency: str, stop: threading.Event, settings: Settings) -> Patience:
    """One health record per dependency and process, shared by every part that uses it, so that
    an outage is logged once however many parts notice it."""
    logger = logging.getLogger(
        "order_viewer.database" if dependency == "database" else "order_viewer.broker"
    )
    return Patience(Health(dependency, logger), stop, settings.retry_max_backoff_ms / 1000)


def _tracing(settings: Settings) -> Tracing | None:
    if not tracing_enabled(settings):
        return None
    return start_tracing(
        settings.kafka_group_id,
        otlp_batches(
            queue_size=span_queue_size(settings),
            batch_size=settings.otel_bsp_max_export_batch_size,
            delay_ms=settings.otel_bsp_schedule_delay,
        ),
    )


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
    """The serving process's start-up steps, in order: the schema, the change listener
    listening (it runs in a thread of its own, see `run_in_background`), the warm cache, after
    which the ingest process (started beside, `run_in_background`) consumes. Raises Stopped if a
    stop comes while a dependency is away, and any other exception to say the process cannot go
    on."""
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


def ingest_process_main(
    settings: Settings, instance: str, tickets: Connection, events: Connection
) -> None:
    """The ingest process, from its start to its exit status (0 after a stop, CANNOT_GO_ON if a
    start-up step or the consumer failed for good, the reason logged)."""
    sys.exit(_run_ingest(settings, instance, tickets, events))


def _run_ingest(settings: Settings, instance: str, tickets: Connection, events: Connection) -> int:
    die_with_the_serving_process()
    logs.configure(settings.log_level, settings.log_format)
    os.nice(settings.ingest_niceness)
    stop = threading.Event()
    # The serving process says when to stop (SIGTERM). A terminal's SIGINT reaches both: the
    # serving process's stop then stops this one; stopping by itself, this one would look ended
    # unasked and be started again.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    link = IngestLink(tickets, events, stop)
    parts = build_ingest(settings, instance, link, stop)
    tune_interpreter(settings)
    gc.collect()
    gc.freeze()
    reporter = threading.Thread(
        target=report_status, args=(link, partial(ingest_status, parts), stop), name="status"
    )
    reporter.start()
    failed = threading.Event()
    try:
        if link.wait_for_go():
            _logging_failure(partial(_consume, parts), failed.set)()
    finally:
        stop.set()
        reporter.join()
        close_ingest(parts)
    return CANNOT_GO_ON if failed.is_set() else 0


def _consume(parts: IngestParts) -> None:
    ensure_topics(
        parts.kafka,
        [parts.settings.kafka_topic, parts.settings.kafka_dlq_topic],
        parts.settings.kafka_topic_partitions,
        parts.broker,
    )
    parts.consumer.run()


def ingest_status(parts: IngestParts) -> IngestStatus:
    """What the ingest process says of itself to the serving process."""
    here = IngestHere(parts.consumer.consuming, parts.ingest.write_timeouts, parts.liveness)
    return IngestStatus(
        parts.metrics.ingest_families(), here.consuming(), here.write_failing(), here.stuck()
    )


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
    """`start`, the change listener, the ingest process and the retention sweep, each in a
    thread of its own; if one fails, the reason is logged and `on_failure` called (the server
    stops and the process exits with 1), never a service that stays up unready."""

    def failed() -> None:
        parts.readiness.failed.set()
        parts.stop.set()
        on_failure()

    targets: list[tuple[str, Callable[[], object]]] = [
        ("listener", parts.listener.run),
        ("start", partial(start, parts)),
        (
            "ingest",
            partial(parts.ingest.run, parts.stop, parts.readiness.warmed, parts.coherence.recheck),
        ),
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
        except IngestFailed as error:
            log.error("%s; stopping the service", error)
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
    if parts.expirer is not None:
        parts.expirer.close()
    if parts.tracing is not None:
        # Last, so that the spans of the final requests are exported.
        parts.tracing.shutdown()


def close_ingest(parts: IngestParts) -> None:
    parts.dead_letters.close()
    for writer in parts.writers:
        writer.close()
    if parts.trail is not None:
        parts.trail.close()
    if parts.tracing is not None:
        # Last, so that the spans of the final batches are exported.
        parts.tracing.shutdown()
