"""The composition root: the one place that reads the settings, builds the adapters and the
service layer over them, and runs the start-up steps in their order.

Every other module receives what it needs as arguments (a Kafka client configuration, a topic, a
`Patience`), never the whole settings, so that each can be built alone in a test.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import psycopg
import sqlalchemy.exc
from confluent_kafka import KafkaException
from starlette.types import ASGIApp

from order_viewer.access import AccessPolicy
from order_viewer.api import create_app
from order_viewer.broker import DeadLetterWriter, client_config, ensure_topics
from order_viewer.cache import OrderCache
from order_viewer.config import Settings
from order_viewer.consumer import Batching, OrderConsumer, group_membership
from order_viewer.metrics import Metrics
from order_viewer.ports import Stopped
from order_viewer.retry import Health, Patience, retry
from order_viewer.service import OrderIngest, OrderLookup, Readiness, warm_up
from order_viewer.store import PostgresOrderReader, PostgresOrderWriter, migrate, newest_documents

log = logging.getLogger(__name__)


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
    writer: PostgresOrderWriter
    dead_letters: DeadLetterWriter
    ingest: OrderIngest
    lookup: OrderLookup
    consumer: OrderConsumer
    readiness: Readiness
    app: ASGIApp


def build(settings: Settings, access: AccessPolicy | None = None) -> Parts:
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
    cache = OrderCache(settings.cache_capacity, settings.cache_max_bytes)
    metrics = Metrics(cache)
    reader = PostgresOrderReader(database_url, settings.database_pool_size)
    writer = PostgresOrderWriter(database_url)
    dead_letters = DeadLetterWriter(
        client_config(settings), settings.kafka_dlq_topic, broker, metrics
    )
    ingest = OrderIngest(writer, cache, dead_letters, database, metrics)
    consumer = OrderConsumer(
        client=client_config(
            settings,
            **group_membership(settings),
            **{"max.poll.interval.ms": settings.kafka_max_poll_interval_ms},
        ),
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
    )
    lookup = OrderLookup(reader, cache)
    readiness = Readiness(lookup.database_reachable, consumer.consuming)
    app = create_app(lookup, readiness, metrics if settings.metrics_enabled else None, access)
    return Parts(
        settings, stop, cache, metrics, database, broker, reader, writer, dead_letters,
        ingest, lookup, consumer, readiness, app,
    )  # fmt: skip


def start(parts: Parts) -> None:
    """The start-up steps, in order, then consumption until the stop: the schema, the warm cache,
    the topics, the consumer. Raises Stopped if a stop comes while a dependency is away, and any
    other exception to say the process cannot go on."""
    settings = parts.settings
    retry(
        partial(migrate, str(settings.database_url)),
        transient=(psycopg.OperationalError, sqlalchemy.exc.OperationalError),
        patience=parts.database,
    )
    warm_up(
        parts.cache,
        partial(newest_documents, str(settings.database_url)),
        parts.database,
        parts.metrics,
    )
    parts.readiness.warmed.set()
    ensure_topics(
        client_config(settings),
        [settings.kafka_topic, settings.kafka_dlq_topic],
        settings.kafka_topic_partitions,
        parts.broker,
    )
    parts.consumer.run()


def run_in_background(parts: Parts, on_failure: Callable[[], object]) -> threading.Thread:
    """`start` in a thread of its own; if it fails, the reason is logged and `on_failure` called
    (the server stops and the process exits with 1), never a service that stays up unready."""

    def run() -> None:
        try:
            start(parts)
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
        parts.readiness.failed.set()
        on_failure()

    thread = threading.Thread(target=run, name="consumer")
    thread.start()
    return thread


def close(parts: Parts) -> None:
    parts.dead_letters.close()
    parts.writer.close()
