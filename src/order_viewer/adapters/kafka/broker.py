"""Kafka adapters: topic creation, producing and the dead-letter writer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from order_viewer.adapters.metrics import Metrics
from order_viewer.service.ports import RejectedMessage, Stopped
from order_viewer.service.retry import Patience, retry

log = logging.getLogger(__name__)


# Largest rejected message sent on with its value, before compression.
LARGEST_DEAD_LETTER_BYTES = 128 * 1024 * 1024

# What a producer of dead letters (the service's writer, and the tool that sends them back)
# needs: every in-sync replica acknowledges, each message is written once, and a message is
# sent on as it came, however large the consumer received it (a compressed batch can carry one
# far above the broker's 1 MB limit); compressed, most fit again.
DEAD_LETTER_PRODUCER: Mapping[str, Any] = {
    "acks": "all",
    "enable.idempotence": True,
    "compression.type": "lz4",
    "message.max.bytes": LARGEST_DEAD_LETTER_BYTES,
}


def ensure_topics(
    client: dict[str, Any], names: Sequence[str], partitions: int, broker: Patience
) -> None:
    """Create the topics that are missing; existing ones are used as they are. Waits for the
    broker while it is away (raises Stopped if a stop comes first)."""
    admin = AdminClient(client)

    def attempt() -> None:
        existing = admin.list_topics(timeout=5).topics
        missing = [
            NewTopic(name, num_partitions=partitions) for name in names if name not in existing
        ]
        created_topics = admin.create_topics(missing, operation_timeout=10) if missing else {}
        for name, created in created_topics.items():
            try:
                created.result()
                log.info("created topic %s", name)
            except KafkaException as error:
                if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise

    retry(attempt, transient=(KafkaException,), patience=broker)


Headers = list[tuple[str, str | bytes | None]]
Delivered = Callable[[KafkaError | None, Any], None]


class MessageProducer(Protocol):
    """What `enqueue` asks of a Kafka producer (confluent_kafka's, or a fake in unit tests)."""

    def produce(
        self,
        topic: str,
        *,
        value: bytes | None,
        key: bytes | None,
        partition: int,
        on_delivery: Delivered | None,
        timestamp: int,
        headers: Headers | None,
    ) -> None: ...

    def poll(self, timeout: float) -> int: ...


def enqueue(
    producer: MessageProducer,
    topic: str,
    *,
    key: bytes | None,
    value: bytes | None,
    on_delivery: Delivered | None = None,
    headers: Headers | None = None,
    timestamp: int = 0,
    partition: int = -1,
) -> None:
    """Hand one message to the producer's local queue, waiting while the queue is full: polling
    runs the delivery reports, and each acknowledged message makes room. The producer only
    raises BufferError when its queue is full, so no message is dropped and no caller stops in
    the middle of a batch for it. `timestamp` 0 is the producer's clock, `partition` -1 its
    partitioner; any other error of `produce` is the caller's."""
    while True:
        try:
            producer.produce(
                topic,
                key=key,
                value=value,
                partition=partition,
                on_delivery=on_delivery,
                timestamp=timestamp,
                headers=headers,
            )
            return
        except BufferError:
            producer.poll(0.1)


class _Undelivered(Exception):
    """The broker did not acknowledge some dead letters; they are sent again."""


class DeadLetterWriter:
    """Sends rejected messages, unchanged with their key, to the dead-letter topic, with headers
    that say why and where they came from; returns only once the broker has acknowledged all."""

    def __init__(
        self, client: dict[str, Any], topic: str, broker: Patience, metrics: Metrics
    ) -> None:
        self._topic = topic
        self._broker = broker
        self._metrics = metrics
        self._producer = Producer(
            {**client, **DEAD_LETTER_PRODUCER, "linger.ms": 5, "message.timeout.ms": 30_000}
        )

    def send(self, rejected: Sequence[RejectedMessage]) -> None:
        pending = [(entry, True) for entry in rejected]

        def attempt() -> None:
            nonlocal pending
            failed: list[tuple[RejectedMessage, bool]] = []
            for entry, with_value in pending:
                self._produce(entry, with_value, failed)
            while self._producer.flush(0.5) > 0:
                if self._broker.stop.is_set():
                    raise Stopped
            if failed:
                pending = failed
                raise _Undelivered(f"{len(failed)} dead letters not acknowledged")

        retry(
            attempt,
            transient=(_Undelivered,),
            patience=self._broker,
            on_retry=self._metrics.retries.labels("dead_letter").inc,
        )

    def _produce(
        self, entry: RejectedMessage, with_value: bool, failed: list[tuple[RejectedMessage, bool]]
    ) -> None:
        message, rejection = entry.message, entry.rejection
        headers: Headers = [
            ("error.code", rejection.code.encode()),
            ("error.message", rejection.message.encode()),
            ("source.topic", message.topic.encode()),
            ("source.partition", str(message.partition).encode()),
            ("source.offset", str(message.offset).encode()),
        ]
        if rejection.field is not None:
            headers.append(("error.field", rejection.field.encode()))
        # The trace goes on with the letter, and with its replay.
        headers.extend(message.trace if entry.trace is None else entry.trace)
        if not with_value:
            # Even compressed, the message is beyond what the topic takes: its key, reason and
            # origin still go, so that it can be found at its source offset.
            size = len(message.value or b"")
            headers.append(("error.value_dropped", f"{size} bytes, too large".encode()))
            log.warning(
                "dead letter of %s/%d@%d sent without its %d-byte value: too large for %s",
                message.topic, message.partition, message.offset, size,
                self._topic,
            )  # fmt: skip

        def delivered(error: KafkaError | None, _: object) -> None:
            if error is not None:
                self._broker.health.failed(str(error))
                self._metrics.dead_letter_failures.inc()
                failed.append((entry, with_value and error.code() != KafkaError.MSG_SIZE_TOO_LARGE))

        try:
            enqueue(
                self._producer,
                self._topic,
                key=message.key,
                value=message.value if with_value else None,
                headers=headers,
                on_delivery=delivered,
            )
        except KafkaException as error:
            if not with_value or error.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE:
                raise
            self._produce(entry, False, failed)

    def close(self) -> None:
        self._producer.flush(5)
