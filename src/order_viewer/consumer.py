"""The Kafka consumer loop: batches of messages in, orders stored, offsets stored after."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from order_viewer.broker import DeadLetterWriter, Stopped, client_config, ensure_topics
from order_viewer.config import Settings
from order_viewer.metrics import Metrics
from order_viewer.retry import Backoff, Health
from order_viewer.service import BatchOutcome, Message, OrderIngest, PreparedBatch
from order_viewer.store import TransientStoreError

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_SECONDS = 10.0


class OrderConsumer:
    """Consumes the orders topic until stopped.

    Offsets follow the pattern librdkafka documents for at-least-once delivery: automatic
    commits are on but only of offsets the loop has *stored*, and it stores a message's offset
    only after its order is committed in PostgreSQL or the broker acknowledged its dead letter.
    A crash therefore re-delivers at most the unfinished batch, which the store absorbs.
    """

    def __init__(
        self, settings: Settings, ingest: OrderIngest, stop: threading.Event, metrics: Metrics
    ) -> None:
        self._settings = settings
        self._ingest = ingest
        self._stop = stop
        self._metrics = metrics
        self.running = False
        self._database = Health("database", log)
        self._broker = Health("Kafka broker", log)
        self._since_report: Counter[str] = Counter()
        self._last_report = time.monotonic()

    def run(self) -> None:
        try:
            ensure_topics(self._settings, self._stop)
        except Stopped:
            return
        consumer = Consumer(
            client_config(
                self._settings,
                **{
                    **group_membership(self._settings),
                    "enable.auto.commit": True,
                    "enable.auto.offset.store": False,
                    "auto.offset.reset": "earliest",
                    "max.poll.interval.ms": self._settings.kafka_max_poll_interval_ms,
                    "statistics.interval.ms": 5000,
                    # librdkafka's default read-ahead is 64 MiB of messages, on top of the two
                    # batches held here; two batches ahead keep the database as busy.
                    "queued.max.messages.kbytes": 2 * self._settings.batch_max_bytes // 1024,
                    "stats_cb": self._metrics.librdkafka_statistics,
                },
            )
        )
        dead_letters = DeadLetterWriter(self._settings, self._stop, self._metrics)
        consumer.subscribe(
            [self._settings.kafka_topic],
            on_assign=_log_assignment("assigned"),
            on_revoke=_log_assignment("revoked"),
        )
        self.running = True
        log.info(
            "consuming %s as group %s", self._settings.kafka_topic, self._settings.kafka_group_id
        )
        # The database writes one batch while this thread polls and validates the next.
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        writing: tuple[PreparedBatch, Future[BatchOutcome | None]] | None = None
        stopped = False
        try:
            while not stopped and not self._stop.is_set():
                polled = self._poll(consumer)
                for messages in by_size(polled, self._settings.batch_max_bytes) or [[]]:
                    prepared = self._ingest.prepare(messages) if messages else None
                    if writing is not None:
                        finished, writing = writing, None
                        if not self._finish(*finished, consumer, dead_letters):
                            stopped = True
                            break
                    if prepared is not None:
                        writing = (prepared, writer.submit(self._store, prepared))
        finally:
            self.running = False
            if writing is not None:
                self._finish(*writing, consumer, dead_letters)
            writer.shutdown()
            # close() commits the stored offsets and leaves the group so partitions move at once
            # (a static member stays in it, for its restart to find them).
            consumer.close()
            dead_letters.close()
            log.info("consumer stopped")

    def _poll(self, consumer: Consumer) -> list[Message]:
        polled = consumer.consume(
            num_messages=self._settings.batch_max_orders,
            timeout=self._settings.batch_max_wait_ms / 1000,
        )
        batch = []
        for kafka_message in polled:
            error = kafka_message.error()
            if error is not None:
                # A fatal error arrives as an event whose code is _FATAL and whose fatal() is
                # false; the consumer can never consume again after one (e.g. fenced).
                if error.fatal() or error.code() == KafkaError._FATAL:
                    raise KafkaException(error)
                # librdkafka reconnects by itself; say so once, not at every attempt.
                self._broker.failed(str(error))
                continue
            topic, partition, offset = (
                kafka_message.topic(),
                kafka_message.partition(),
                kafka_message.offset(),
            )
            # A message without an error always has its position.
            assert topic is not None
            assert partition is not None
            assert offset is not None
            batch.append(
                Message(topic, partition, offset, kafka_message.key(), kafka_message.value())
            )
        if batch:
            self._broker.recovered()
            self._metrics.messages_consumed.inc(len(batch))
            self._metrics.batch_size.observe(len(batch))
        return batch

    def _finish(
        self,
        batch: PreparedBatch,
        written: Future[BatchOutcome | None],
        consumer: Consumer,
        dead_letters: DeadLetterWriter,
    ) -> bool:
        """Wait for the batch's write, send its dead letters, then store its offsets; False if a
        stop came first (its offsets are then left for the next owner to re-read)."""
        outcome = written.result()
        if outcome is None:
            return False
        if outcome.rejected:
            for entry in outcome.rejected:
                message, rejection = entry.message, entry.rejection
                log.warning(
                    "rejected message %s/%d@%d: %s (%s%s)",
                    message.topic, message.partition, message.offset, rejection.code,
                    rejection.message, f", field {rejection.field}" if rejection.field else "",
                    extra={
                        "topic": message.topic, "partition": message.partition,
                        "offset": message.offset, "reason": rejection.code,
                        "field": rejection.field,
                    },
                )  # fmt: skip
            try:
                dead_letters.send(outcome.rejected)
            except Stopped:
                return False
        _store_offsets(consumer, batch.messages)
        self._report(batch, outcome)
        return True

    def _store(self, batch: PreparedBatch) -> BatchOutcome | None:
        """The batch stored, retrying while the database is away; None if stopped meanwhile."""
        backoff = Backoff(self._settings.retry_max_backoff_ms / 1000, self._stop)
        while True:
            started = time.perf_counter()
            try:
                outcome = self._ingest.store(batch)
            except TransientStoreError as error:
                self._database.failed(str(error))
                self._metrics.retries.labels("database").inc()
                if not backoff.wait():
                    return None
                continue
            self._metrics.write_duration.observe(time.perf_counter() - started)
            self._database.recovered()
            return outcome

    def _report(self, batch: PreparedBatch, outcome: BatchOutcome) -> None:
        """Count the batch, and log the throughput every few seconds."""
        metrics = self._metrics
        metrics.orders_stored.inc(outcome.inserted)
        metrics.orders_replaced.inc(outcome.replaced)
        for entry in outcome.rejected:
            metrics.dead_lettered.labels(entry.rejection.code).inc()
        if batch.orders:
            metrics.order_stored(max(p.order.date_created for p, _ in batch.orders.values()))
        since = self._since_report
        since.update(
            stored=outcome.inserted + outcome.replaced, dead_lettered=len(outcome.rejected)
        )
        elapsed = time.monotonic() - self._last_report
        if elapsed >= PROGRESS_INTERVAL_SECONDS:
            if since:
                log.info(
                    "stored %d orders (%.0f/s) and dead-lettered %d messages in the last %.0f s",
                    since["stored"], since["stored"] / elapsed, since["dead_lettered"], elapsed,
                )  # fmt: skip
            since.clear()
            self._last_report = time.monotonic()


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


def by_size(messages: list[Message], max_bytes: int) -> list[list[Message]]:
    """The messages in order, cut into batches of at most `max_bytes` of values (a message
    larger than that is a batch of its own): validated orders take several times the bytes of
    their messages, so a count alone would not bound the memory of a batch."""
    batches: list[list[Message]] = []
    size = 0
    for message in messages:
        length = len(message.value or b"")
        if not batches or (size + length > max_bytes and batches[-1]):
            batches.append([])
            size = 0
        batches[-1].append(message)
        size += length
    return batches


def _store_offsets(consumer: Consumer, batch: Sequence[Message]) -> None:
    next_offsets: dict[tuple[str, int], int] = {}
    for message in batch:
        position = (message.topic, message.partition)
        next_offsets[position] = max(next_offsets.get(position, 0), message.offset + 1)
    try:
        consumer.store_offsets(
            offsets=[
                TopicPartition(topic, partition, offset)
                for (topic, partition), offset in next_offsets.items()
            ]
        )
    except KafkaException as error:
        # The partition moved to another instance during a long batch; it will re-read the
        # batch, and the store makes that harmless.
        log.info("could not store offsets (%s); the new owner re-reads them", error.args[0])


def _log_assignment(verb: str) -> Any:
    def callback(_: Consumer, partitions: list[TopicPartition]) -> None:
        if partitions:
            log.info(
                "partitions %s: %s", verb, ", ".join(f"{p.topic}/{p.partition}" for p in partitions)
            )

    return callback
