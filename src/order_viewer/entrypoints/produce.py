"""The `produce` command: realistic orders, a chosen share of them broken, sent to the topic."""

from __future__ import annotations

import json
import logging
import random
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaError, Message, Producer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from order_viewer.adapters.kafka.broker import enqueue, ensure_topics
from order_viewer.config import Settings, kafka_client
from order_viewer.entrypoints.generate import break_order, encode, make_order
from order_viewer.service.retry import Health, Patience

log = logging.getLogger(__name__)

PLAIN_PROGRESS_SECONDS = 5


@dataclass(frozen=True, slots=True)
class ProduceSummary:
    sent: int
    invalid: int
    failed: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


def messages(
    count: int, invalid_ratio: float, seed: int | None
) -> Iterator[tuple[bytes | None, bytes, bool]]:
    """(key, value, is_invalid) for `count` generated orders, made as they are sent so that a
    large count needs no memory and no wait before the first message."""
    rng = random.Random(seed)
    for _ in range(count):
        order = make_order(rng)
        key = order["order_uid"].encode()
        if rng.random() < invalid_ratio:
            value, _code = break_order(rng, order)
            yield key, value, True
        else:
            yield key, encode(order), False


def file_message(path: Path) -> tuple[bytes | None, bytes, bool]:
    """The file's bytes as they are, keyed by its order_uid when it has one."""
    value = path.read_bytes()
    try:
        uid = json.loads(value).get("order_uid")
    except (ValueError, AttributeError):
        uid = None
    return (uid.encode() if isinstance(uid, str) else None, value, False)


def produce(
    settings: Settings,
    batch: Iterable[tuple[bytes | None, bytes, bool]],
    total: int,
    interactive: bool,
) -> ProduceSummary:
    """Send the messages and wait for the broker's acknowledgements. Progress shows as a bar in
    a terminal (`interactive`), else as a line every few seconds."""
    # Nothing stops a command line run but Ctrl-C, which ends the waiting for the broker too.
    broker = Patience(
        Health("Kafka broker", log), threading.Event(), settings.retry_max_backoff_ms / 1000
    )
    client = kafka_client(settings)
    ensure_topics(
        client,
        [settings.kafka_topic, settings.kafka_dlq_topic],
        settings.kafka_topic_partitions,
        broker,
    )
    producer = Producer({**client, "acks": "all", "linger.ms": 20, "enable.idempotence": True})
    failures: list[KafkaError] = []
    acknowledged = 0

    def delivered(error: KafkaError | None, _: Message) -> None:
        nonlocal acknowledged
        if error is None:
            acknowledged += 1
        else:
            failures.append(error)

    started = time.perf_counter()
    invalid = 0
    with Progress(
        TextColumn("producing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        disable=not interactive,
    ) as progress:  # fmt: skip
        task = progress.add_task("orders", total=total)
        last_line = started
        for key, value, is_invalid in batch:
            invalid += is_invalid
            if not interactive and time.perf_counter() - last_line >= PLAIN_PROGRESS_SECONDS:
                # Without a terminal (CI, a pipe) a bar would not show: a line now and then.
                last_line = time.perf_counter()
                print(f"producing: {acknowledged:,} of {total:,} acknowledged", file=sys.stderr)
            enqueue(producer, settings.kafka_topic, key=key, value=value, on_delivery=delivered)
            producer.poll(0)
            progress.update(task, completed=acknowledged)
        while producer.flush(0.2) > 0:
            progress.update(task, completed=acknowledged)
        progress.update(task, completed=acknowledged)
    return ProduceSummary(
        sent=acknowledged,
        invalid=invalid,
        failed=len(failures),
        seconds=time.perf_counter() - started,
    )
