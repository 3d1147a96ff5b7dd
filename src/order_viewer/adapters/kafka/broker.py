"""Kafka adapters: topic creation, producing and the dead-letter writer."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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


# How long the writer's producer may hold dead letters it neither delivered nor reported failed.
# Each is reported failed within its `message.timeout.ms` (30 s), except when librdkafka's
# idempotent producer stays wedged after a broker restart, holding them for ever (seen in a
# broker fault scenario: a flush unanswered for five minutes). Past this bound the writer purges
# them and sends them again with a new producer.
UNREPORTED_BOUND_SECONDS = 45.0
_DEAD_LETTER_TIMEOUT_MS = 30_000


class _Undelivered(Exception):
    """The broker did not acknowledge some dead letters; they are sent again."""


@dataclass
class _Sending:
    """One attempt's dead letters as their delivery reports come: those that failed, to be sent
    again (without their value if it was too large), and which were reported at all."""

    failed: list[tuple[RejectedMessage, bool]] = field(default_factory=list)
    reported: set[int] = field(default_factory=set)  # ids of the entries


class DeadLetterWriter:
    """Sends rejected messages, unchanged with their key, to the dead-letter topic, with headers
    that say why and where they came from; returns only once the broker has acknowledged all."""

    def __init__(
        self, client: dict[str, Any], topic: str, broker: Patience, metrics: Metrics
    ) -> None:
        self._topic = topic
        self._broker = broker
        self._metrics = metrics
        self._config = {
            **client,
            **DEAD_LETTER_PRODUCER,
            "linger.ms": 5,
            "message.timeout.ms": _DEAD_LETTER_TIMEOUT_MS,
        }
        self._producer = Producer(self._config)

    def send(self, rejected: Sequence[RejectedMessage]) -> None:
        pending = [(entry, True) for entry in rejected]

        def attempt() -> None:
            nonlocal pending
            sending = _Sending()
            for entry, with_value in pending:
                self._produce(entry, with_value, sending)
            bound = time.monotonic() + UNREPORTED_BOUND_SECONDS
            while self._producer.flush(0.5) > 0:
                if self._broker.stop.is_set():
                    raise Stopped
                if time.monotonic() > bound:
                    unreported = [item for item in pending if id(item[0]) not in sending.reported]
                    self._replace_producer(len(unreported))
                    # A report that comes late goes to this attempt's record, no longer read.
                    pending = sending.failed + unreported
                    raise _Undelivered(f"{len(unreported)} dead letters neither sent nor failed")
            if sending.failed:
                pending = sending.failed
                raise _Undelivered(f"{len(sending.failed)} dead letters not acknowledged")

        retry(
            attempt,
            transient=(_Undelivered,),
            patience=self._broker,
            on_retry=self._metrics.retries.labels("dead_letter").inc,
        )

    def _replace_producer(self, unreported: int) -> None:
        """A new producer in place of one that holds dead letters past its own timeout. The old
        one's letters are purged and it is closed in a thread of its own, not waited for: one
        in flight may have reached the broker after all, and is then written twice."""
        log.warning(
            "the dead-letter producer has held %d letters for %.0f s, past its own timeout, "
            "without a report: sending them again with a new producer",
            unreported,
            UNREPORTED_BOUND_SECONDS,
        )
        wedged, self._producer = self._producer, Producer(self._config)
        wedged.purge(in_queue=True, in_flight=True, blocking=False)
        threading.Thread(target=wedged.close, name="dead-letters-close", daemon=True).start()

    def _produce(self, entry: RejectedMessage, with_value: bool, sending: _Sending) -> None:
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
            sending.reported.add(id(entry))
            if error is not None:
                self._broker.health.failed(str(error))
                self._metrics.dead_letter_failures.inc()
                sending.failed.append(
                    (entry, with_value and error.code() != KafkaError.MSG_SIZE_TOO_LARGE)
                )

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
            self._produce(entry, False, sending)

    def close(self) -> None:
        self._producer.flush(5)
