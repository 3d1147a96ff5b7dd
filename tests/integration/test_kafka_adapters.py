"""The Kafka adapters in-process, against the real broker: topic creation, the dead-letter
writer, and the consumer loop driving the service layer until its stop event is set."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from order_viewer.broker import DeadLetterWriter, ensure_topics
from order_viewer.cache import OrderCache
from order_viewer.consumer import Batching, OrderConsumer
from order_viewer.generate import SAMPLE_ORDER
from order_viewer.metrics import Metrics
from order_viewer.model import Rejection
from order_viewer.ports import Message, RejectedMessage
from order_viewer.retry import Health, Patience
from order_viewer.service import OrderIngest
from tests.conftest import Stack, Topics, committed_lag, consume_all, produce, wait_until
from tests.fakes import FakeWriter

pytestmark = pytest.mark.integration


def broker(stop: threading.Event) -> Patience:
    return Patience(Health("Kafka broker", logging.getLogger("test.broker")), stop, 0.5)


def client(stack: Stack) -> dict[str, Any]:
    return {"bootstrap.servers": stack.bootstrap_servers}


def test_missing_topics_are_created_and_existing_ones_kept(stack: Stack, topics: Topics) -> None:
    names = [topics.orders, topics.dead_letters]
    ensure_topics(client(stack), names[:1], 2, broker(threading.Event()))
    ensure_topics(client(stack), names, 4, broker(threading.Event()))
    listed = AdminClient(client(stack)).list_topics(timeout=10).topics
    assert len(listed[topics.orders].partitions) == 2
    assert len(listed[topics.dead_letters].partitions) == 4


def test_dead_letters_carry_the_message_unchanged_with_why_and_where(
    stack: Stack, topics: Topics
) -> None:
    ensure_topics(client(stack), [topics.dead_letters], 1, broker(threading.Event()))
    writer = DeadLetterWriter(
        client(stack), topics.dead_letters, broker(threading.Event()), Metrics(OrderCache(0))
    )
    rejected = RejectedMessage(
        Message("orders", 2, 41, b"key\x00", b"\xff not json"),
        Rejection("invalid_json", "not JSON at byte 0", "items.0.price"),
    )
    try:
        writer.send([rejected])
    finally:
        writer.close()
    (letter,) = consume_all(stack, topics.dead_letters, 1)
    assert (letter.key(), letter.value()) == (b"key\x00", b"\xff not json")
    assert dict(letter.headers()) == {
        "error.code": b"invalid_json",
        "error.message": b"not JSON at byte 0",
        "error.field": b"items.0.price",
        "source.topic": b"orders",
        "source.partition": b"2",
        "source.offset": b"41",
    }


def test_the_consumer_loop_stores_dead_letters_and_commits_until_stopped(
    stack: Stack, topics: Topics
) -> None:
    stop = threading.Event()
    patience = broker(stop)
    ensure_topics(client(stack), [topics.orders, topics.dead_letters], 2, patience)
    orders = []
    for n in range(20):
        order = json.loads(json.dumps(SAMPLE_ORDER))
        order["order_uid"] = f"loop-{n}"
        orders.append((order["order_uid"].encode(), json.dumps(order).encode()))
    produce(stack, topics.orders, [*orders, (b"broken", b"{")])

    writer, cache = FakeWriter(), OrderCache(100)
    metrics = Metrics(cache)
    dead_letters = DeadLetterWriter(client(stack), topics.dead_letters, patience, metrics)
    database = Patience(Health("database", logging.getLogger("test.database")), stop, 0.5)
    consumer = OrderConsumer(
        client={**client(stack), "group.id": topics.group, "session.timeout.ms": 6000},
        topic=topics.orders,
        batching=Batching(max_messages=7, max_bytes=1 << 20, max_wait_seconds=0.05),
        ingest=OrderIngest(writer, cache, dead_letters, database, metrics),
        broker=patience.health,
        stop=stop,
        metrics=metrics,
    )
    running = threading.Thread(target=consumer.run)
    running.start()
    try:
        wait_until(lambda: len(writer.stored) == 20, 60, "the orders to be stored")
        assert consumer.consuming.is_set()
        (letter,) = consume_all(stack, topics.dead_letters, 1)
        assert letter.key() == b"broken"
    finally:
        stop.set()
        running.join(30)
        dead_letters.close()
    assert not running.is_alive()
    assert not consumer.consuming.is_set()
    # Closing committed what was stored: a new member of the group would read nothing again.
    assert committed_lag(stack, topics) == 0
    assert all(cache.get(f"loop-{n}") is not None for n in range(20))
