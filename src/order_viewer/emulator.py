"""The `produce` command: realistic orders, a chosen share of them broken, sent to the topic."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaError, Message, Producer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from order_viewer.broker import client_config, ensure_topics
from order_viewer.config import Settings
from order_viewer.generate import break_order, encode, make_order


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
) -> list[tuple[bytes | None, bytes, bool]]:
    """(key, value, is_invalid) for `count` generated orders."""
    rng = random.Random(seed)
    generated = []
    for _ in range(count):
        order = make_order(rng)
        key = order["order_uid"].encode()
        if rng.random() < invalid_ratio:
            value, _code = break_order(rng, order)
            generated.append((key, value, True))
        else:
            generated.append((key, encode(order), False))
    return generated


def file_message(path: Path) -> tuple[bytes | None, bytes, bool]:
    """The file's bytes as they are, keyed by its order_uid when it has one."""
    value = path.read_bytes()
    try:
        uid = json.loads(value).get("order_uid")
    except (ValueError, AttributeError):
        uid = None
    return (uid.encode() if isinstance(uid, str) else None, value, False)


def produce(
    settings: Settings, batch: list[tuple[bytes | None, bytes, bool]], show_progress: bool
) -> ProduceSummary:
    ensure_topics(settings, threading.Event())
    producer = Producer(
        client_config(settings, **{"acks": "all", "linger.ms": 20, "enable.idempotence": True})
    )
    failures: list[KafkaError] = []
    acknowledged = 0

    def delivered(error: KafkaError | None, _: Message) -> None:
        nonlocal acknowledged
        if error is None:
            acknowledged += 1
        else:
            failures.append(error)

    started = time.perf_counter()
    with Progress(
        TextColumn("producing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        disable=not show_progress,
    ) as progress:  # fmt: skip
        task = progress.add_task("orders", total=len(batch))
        for key, value, _invalid in batch:
            while True:
                try:
                    producer.produce(
                        settings.kafka_topic, key=key, value=value, on_delivery=delivered
                    )
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
            progress.update(task, completed=acknowledged)
        while producer.flush(0.2) > 0:
            progress.update(task, completed=acknowledged)
        progress.update(task, completed=acknowledged)
    return ProduceSummary(
        sent=acknowledged,
        invalid=sum(1 for *_, invalid in batch if invalid),
        failed=len(failures),
        seconds=time.perf_counter() - started,
    )
