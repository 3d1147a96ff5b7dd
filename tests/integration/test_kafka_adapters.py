"""The Kafka adapters in-process, against the real broker: topic creation, the dead-letter
writer, and the consumer loop driving the service layer until its stop event is set."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

import order_viewer.adapters.kafka.broker
import order_viewer.adapters.kafka.consumer
from order_viewer.adapters.cache import OrderCache
from order_viewer.adapters.kafka.broker import DeadLetterWriter, ensure_topics
from order_viewer.adapters.kafka.consumer import (
    RESTARTS_BEFORE_STUCK,
    Batching,
    OrderConsumer,
    group_progress,
    messages_waiting,
)
from order_viewer.adapters.metrics import Metrics
from order_viewer.domain.model import PreparedOrder, Rejection
from order_viewer.entrypoints.generate import SAMPLE_ORDER
from order_viewer.service.ingest import OrderIngest
from order_viewer.service.ports import (
    ConsumedMessage,
    Deletion,
    Handled,
    RejectedMessage,
    WriteResult,
)
from order_viewer.service.readiness import Liveness
from order_viewer.service.retry import Health, Patience
from tests.conftest import (
    Record,
    Stack,
    Topics,
    committed_lag,
    consume_all,
    free_port,
    produce,
    wait_until,
)
from tests.fakes import FakeWriter
from tests.frozen_fetching import freezing, frozen_marker

pytestmark = pytest.mark.integration


def broker(stop: threading.Event) -> Patience:
    return Patience(Health("Kafka broker", logging.getLogger("test.broker")), stop, 0.5)


def client(stack: Stack) -> dict[str, Any]:
    return {"bootstrap.servers": stack.bootstrap_servers}


def test_missing_topics_are_created_and_existing_ones_kept(stack: Stack, topics: Topics) -> None:
    names = [topics.orders, topics.dead_letters]
    ensure_topics(client(stack), names[:1], 2, broker(threading.Event()))
    ensure_topics(client(stack), names, 4, broker(threading.Event()))
    admin = AdminClient(client(stack))

    def both_listed() -> dict[str, Any] | None:
        # A topic just created reaches the metadata of another connection a moment later.
        listed = admin.list_topics(timeout=10).topics
        return listed if all(name in listed for name in names) else None

    listed = wait_until(both_listed, 10, "both topics in the broker's metadata")
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
        ConsumedMessage("orders", 2, 41, b"key\x00", b"\xff not json"),
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


def test_dead_letters_a_producer_holds_past_the_bound_are_sent_by_a_new_one(
    stack: Stack, topics: Topics, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The first producer the writer makes is the real client sent to an address where no broker
    # listens: its letters stay queued, neither delivered nor reported until their 30 s timeout,
    # as a wedged producer holds them. The writer must not wait that long past its bound.
    made = itertools.count(1)
    nowhere = f"127.0.0.1:{free_port()}"

    class FirstOneAstray(Producer):
        def __init__(self, config: dict[str, Any]) -> None:
            astray = next(made) == 1
            super().__init__({**config, "bootstrap.servers": nowhere} if astray else config)

    monkeypatch.setattr(order_viewer.adapters.kafka.broker, "Producer", FirstOneAstray)
    monkeypatch.setattr(order_viewer.adapters.kafka.broker, "UNREPORTED_BOUND_SECONDS", 2.0)
    ensure_topics(client(stack), [topics.dead_letters], 1, broker(threading.Event()))
    writer = DeadLetterWriter(
        client(stack), topics.dead_letters, broker(threading.Event()), Metrics(OrderCache(0))
    )
    rejected = [
        RejectedMessage(
            ConsumedMessage("orders", 0, offset, None, b"not json"),
            Rejection("invalid_json", "not JSON", None),
        )
        for offset in range(3)
    ]
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, "order_viewer.adapters.kafka.broker"):
            writer.send(rejected)
    finally:
        writer.close()
    assert time.monotonic() - started < 20
    letters = consume_all(stack, topics.dead_letters, 3)
    assert sorted(dict(letter.headers())["source.offset"] for letter in letters) == [
        b"0",
        b"1",
        b"2",
    ]
    assert "held 3 letters for 2 s, past its own timeout" in caplog.text


@dataclass
class RunningConsumer:
    consumer: OrderConsumer
    cache: OrderCache
    dead_letters: DeadLetterWriter
    metrics: Metrics
    liveness: Liveness


@contextmanager
def running_consumer(
    stack: Stack,
    topics: Topics,
    writers: Sequence[FakeWriter],
    batching: Batching,
    stall_timeout_seconds: float = 600,
) -> Iterator[RunningConsumer]:
    """The consumer loop in a thread, storing through `writers` (one per lane); stopped and
    joined on exit."""
    stop = threading.Event()
    patience = broker(stop)
    ensure_topics(client(stack), [topics.orders, topics.dead_letters], 2, patience)
    cache = OrderCache(100)
    metrics = Metrics(cache)
    dead_letters = DeadLetterWriter(client(stack), topics.dead_letters, patience, metrics)
    database = Patience(Health("database", logging.getLogger("test.database")), stop, 0.5)
    liveness = Liveness()
    consumer = OrderConsumer(
        client={**client(stack), "group.id": topics.group, "session.timeout.ms": 6000},
        topic=topics.orders,
        batching=batching,
        ingest=OrderIngest(writers, cache, dead_letters, database, metrics),
        broker=patience.health,
        stop=stop,
        metrics=metrics,
        stall_timeout_seconds=stall_timeout_seconds,
        liveness=liveness,
        admin=AdminClient(client(stack)),
    )
    running = threading.Thread(target=consumer.run)
    running.start()
    try:
        yield RunningConsumer(consumer, cache, dead_letters, metrics, liveness)
    finally:
        stop.set()
        running.join(30)
        dead_letters.close()
    assert not running.is_alive()


def order_messages(prefix: str, count: int) -> list[tuple[bytes, bytes]]:
    messages = []
    for n in range(count):
        order = json.loads(json.dumps(SAMPLE_ORDER))
        order["order_uid"] = f"{prefix}-{n}"
        messages.append((order["order_uid"].encode(), json.dumps(order).encode()))
    return messages


def test_the_consumer_loop_stores_dead_letters_and_commits_until_stopped(
    stack: Stack, topics: Topics
) -> None:
    writer = FakeWriter()
    batching = Batching(max_messages=7, max_bytes=1 << 20, max_wait_seconds=0.05)
    with running_consumer(stack, topics, [writer], batching) as running:
        produce(stack, topics.orders, [*order_messages("loop", 20), (b"broken", b"{")])
        wait_until(lambda: len(writer.stored) == 20, 60, "the orders to be stored")
        assert running.consumer.consuming.is_set()
        (letter,) = consume_all(stack, topics.dead_letters, 1)
        assert letter.key() == b"broken"
    assert not running.consumer.consuming.is_set()
    # Closing committed what was stored: a new member of the group would read nothing again.
    assert committed_lag(stack, topics) == 0
    assert all(running.cache.get(f"loop-{n}") is not None for n in range(20))


class GatedWriter(FakeWriter):
    """Holds every write until the gate opens, noting when each began."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.began: list[float] = []

    def write(
        self,
        batch: Sequence[PreparedOrder],
        deletions: Sequence[Deletion] = (),
        handled: Sequence[Handled] = (),
    ) -> WriteResult:
        self.began.append(time.monotonic())
        self.gate.wait(60)
        return super().write(batch, deletions, handled)


def test_an_order_that_finds_the_database_idle_is_written_at_once_and_the_next_gather(
    stack: Stack, topics: Topics
) -> None:
    """A batch waits for more messages only while the database writes the one before: a lone
    order is not held for BATCH_MAX_WAIT_MS, and what arrives during a write goes in one batch."""
    writer = GatedWriter()
    batching = Batching(max_messages=1000, max_bytes=1 << 20, max_wait_seconds=30)
    with running_consumer(stack, topics, [writer], batching):
        (first,) = order_messages("first", 1)
        produce(stack, topics.orders, [first])
        produced = time.monotonic()
        wait_until(lambda: writer.began, 20, "the first order's write to begin")
        # Not the 30 s of max_wait_seconds (the group's first assignment takes some seconds).
        assert writer.began[0] - produced < 20
        produce(stack, topics.orders, order_messages("next", 10))
        time.sleep(2)  # for the consumer to fetch them while the first write is held
        writer.gate.set()
        wait_until(lambda: len(writer.stored) == 11, 20, "the orders to be stored")
    first_batch, second_batch = writer.batches
    assert first_batch == ["first-0"]
    # One batch, in the order of each partition (two partitions: interleaved somehow).
    assert sorted(second_batch) == sorted(f"next-{n}" for n in range(10))


class SlowWriter(FakeWriter):
    """Takes a while over every write, noting when each began and ended."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[tuple[float, float]] = []

    def write(
        self,
        batch: Sequence[PreparedOrder],
        deletions: Sequence[Deletion] = (),
        handled: Sequence[Handled] = (),
    ) -> WriteResult:
        began = time.monotonic()
        time.sleep(0.3)
        result = super().write(batch, deletions, handled)
        self.spans.append((began, time.monotonic()))
        return result


def test_each_partition_is_stored_in_order_by_its_lane_and_the_lanes_write_at_once(
    stack: Stack, topics: Topics
) -> None:
    """With two writers, partition 0's orders go to the first and partition 1's to the second,
    each in offset order; the two write at the same time; offsets are committed once stored."""
    writers = [SlowWriter(), SlowWriter()]
    # Every poll split by lane, however small, and several writes for each lane.
    batching = Batching(max_messages=4, max_bytes=1 << 20, max_wait_seconds=0.05, split_from=1)
    ensure_topics(client(stack), [topics.orders], 2, broker(threading.Event()))
    produce(
        stack,
        topics.orders,
        [
            Record(key, value, partition=n % 2)
            for n, (key, value) in enumerate(order_messages("lane", 40))
        ],
    )
    with running_consumer(stack, topics, writers, batching) as running:
        wait_until(
            lambda: sum(len(writer.stored) for writer in writers) == 40,
            60,
            "the orders to be stored",
        )
        assert running.cache.get("lane-39") is not None
    first, second = (writer.spans for writer in writers)
    assert any(a < d and c < b for a, b in first for c, d in second), "no two writes overlapped"
    for lane, writer in enumerate(writers):
        stored = [
            (prepared.partition, prepared.offset)
            for batch in writer.batches
            for prepared in (writer.stored[uid] for uid in batch)
        ]
        assert {partition for partition, _ in stored} == {lane}
        assert [offset for _, offset in stored] == list(range(20))
    assert committed_lag(stack, topics) == 0


def test_messages_waiting_count_from_the_position_else_the_committed_offset_else_the_start(
    stack: Stack, topics: Topics
) -> None:
    ensure_topics(client(stack), [topics.orders], 3, broker(threading.Event()))
    produce(
        stack,
        topics.orders,
        [
            Record(key, value, partition=n % 2)
            for n, (key, value) in enumerate(order_messages("w", 20))
        ],
    )
    consumer = Consumer(
        {
            **client(stack),
            "group.id": topics.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",  # as the service's consumer
        }
    )
    try:
        assert messages_waiting(consumer, 10) == {}  # nothing assigned
        consumer.assign([TopicPartition(topics.orders, p) for p in range(3)])
        consumer.commit(offsets=[TopicPartition(topics.orders, 1, 4)], asynchronous=False)
        # No position yet: partition 0 from its start, 1 from its committed offset, 2 is empty.
        assert messages_waiting(consumer, 10) == {
            f"{topics.orders}/0": 10,
            f"{topics.orders}/1": 6,
            f"{topics.orders}/2": 0,
        }
        consumed = consume_from(consumer, 13)
        assert messages_waiting(consumer, 10) == {
            f"{topics.orders}/0": 10 - consumed[0],
            f"{topics.orders}/1": 6 - consumed[1],
            f"{topics.orders}/2": 0,
        }
    finally:
        consumer.close()


def consume_from(consumer: Consumer, count: int) -> dict[int, int]:
    """`count` messages consumed, by partition."""
    by_partition = {0: 0, 1: 0}
    deadline = time.monotonic() + 30
    while sum(by_partition.values()) < count and time.monotonic() < deadline:
        for message in consumer.consume(count - sum(by_partition.values()), timeout=1):
            assert message.error() is None
            partition = message.partition()
            assert partition is not None
            by_partition[partition] += 1
    assert sum(by_partition.values()) == count
    return by_partition


def test_messages_waiting_are_unknown_when_no_broker_answers() -> None:
    nowhere = {"bootstrap.servers": f"127.0.0.1:{free_port()}", "group.id": "nowhere"}
    consumer = Consumer(nowhere)
    try:
        consumer.assign([TopicPartition("orders", 0)])
        started = time.monotonic()
        assert messages_waiting(consumer, 1) is None
        assert time.monotonic() - started < 5
    finally:
        consumer.close()


def stalled_restarts(metrics: Metrics, reason: str = "stalled") -> float:
    value = metrics.registry.get_sample_value(
        "order_viewer_consumer_restarts_total", {"reason": reason}
    )
    assert value is not None
    return value


def written_once(writer: FakeWriter, uids: list[str]) -> bool:
    written = [uid for batch in writer.batches for uid in batch]
    return sorted(written) == sorted(uids)


@pytest.fixture
def switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file that tells the consumers the loop makes to freeze (see tests.frozen_fetching)."""
    switch = tmp_path / "freeze"
    monkeypatch.setattr(order_viewer.adapters.kafka.consumer, "Consumer", freezing(switch))
    return switch


@contextmanager
def storing_before(
    stack: Stack, topics: Topics, writer: FakeWriter, count: int, stall_timeout_seconds: float
) -> Iterator[RunningConsumer]:
    """`running_consumer` once it has stored the orders "before-0" to "before-{count - 1}"."""
    batching = Batching(max_messages=50, max_bytes=1 << 20, max_wait_seconds=0.05)
    with running_consumer(stack, topics, [writer], batching, stall_timeout_seconds) as running:
        produce(stack, topics.orders, order_messages("before", count))
        wait_until(lambda: len(writer.stored) == count, 60, "the first orders to be stored")
        yield running


def test_a_consumer_that_fetches_nothing_while_messages_wait_is_replaced_and_loses_nothing(
    stack: Stack, topics: Topics, switch: Path
) -> None:
    writer = FakeWriter()
    with storing_before(stack, topics, writer, 10, stall_timeout_seconds=2) as running:
        switch.write_text("1")  # the consumer made at start fetches nothing from now on
        wait_until(frozen_marker(switch).exists, 30, "the consumer to freeze")
        produce(stack, topics.orders, order_messages("after", 10))
        wait_until(lambda: len(writer.stored) == 20, 60, "the watchdog's new consumer to store")
        restarts = stalled_restarts(running.metrics)
        assert restarts >= 1
        assert running.liveness.not_live() == {}
    # Every message written once: the stalled consumer's offsets were committed as it closed.
    assert written_once(
        writer, [f"before-{n}" for n in range(10)] + [f"after-{n}" for n in range(10)]
    )
    assert committed_lag(stack, topics) == 0


class LateAssignmentConsumer(Consumer):
    """The real client, handing its partitions on LATE_ASSIGNMENT_SECONDS after the group
    assigned them: a group slow to assign (under KIP-848 the broker answers a new member at a
    later heartbeat), the time spent in the poll that brings the assignment."""

    def subscribe(
        self,
        topics: list[str],
        on_assign: Any = None,
        on_revoke: Any = None,
        on_lost: Any = None,
    ) -> None:
        def assigned(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            time.sleep(LATE_ASSIGNMENT_SECONDS)
            if on_assign is not None:
                on_assign(consumer, partitions)

        others = {"on_revoke": on_revoke, "on_lost": on_lost}
        given = {name: callback for name, callback in others.items() if callback is not None}
        super().subscribe(topics, on_assign=assigned, **given)


LATE_ASSIGNMENT_SECONDS = 3.0


def test_the_wait_for_an_assignment_is_not_a_stall(
    stack: Stack, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(order_viewer.adapters.kafka.consumer, "Consumer", LateAssignmentConsumer)
    ensure_topics(client(stack), [topics.orders, topics.dead_letters], 2, broker(threading.Event()))
    produce(stack, topics.orders, order_messages("waiting", 10))
    writer = FakeWriter()
    batching = Batching(max_messages=50, max_bytes=1 << 20, max_wait_seconds=0.05)
    # The partitions come with messages waiting, longer than the stall timeout after the
    # consumer began to ask.
    with running_consumer(stack, topics, [writer], batching, 2) as running:
        wait_until(lambda: len(writer.stored) == 10, 60, "the orders to be stored")
        assert stalled_restarts(running.metrics) == 0
        assert stalled_restarts(running.metrics, "unassigned") == 0
    assert written_once(writer, [f"waiting-{n}" for n in range(10)])


def test_a_consumer_left_without_partitions_while_messages_wait_is_replaced(
    stack: Stack, topics: Topics, switch: Path
) -> None:
    writer = FakeWriter()
    with storing_before(stack, topics, writer, 10, stall_timeout_seconds=2) as running:
        # A batch's offsets are stored after its write: dropped before that, the partitions
        # would be read again from before it (rightly, but these orders are to be written once).
        wait_until(lambda: committed_lag(stack, topics) == 0, 30, "the offsets to be committed")
        switch.write_text("1 unassigned")  # the group still counts its partitions as its
        wait_until(frozen_marker(switch).exists, 30, "the consumer to drop its partitions")
        produce(stack, topics.orders, order_messages("after", 10))
        wait_until(lambda: len(writer.stored) == 20, 60, "the watchdog's new consumer to store")
        assert stalled_restarts(running.metrics, "unassigned") >= 1
        assert stalled_restarts(running.metrics, "stalled") == 0
        assert running.liveness.not_live() == {}
    assert written_once(
        writer, [f"before-{n}" for n in range(10)] + [f"after-{n}" for n in range(10)]
    )
    assert committed_lag(stack, topics) == 0


def test_group_progress_is_the_committed_offsets_and_what_waits_beyond_them(
    stack: Stack, topics: Topics
) -> None:
    writer = FakeWriter()
    with storing_before(stack, topics, writer, 10, stall_timeout_seconds=600):
        wait_until(lambda: committed_lag(stack, topics) == 0, 30, "the offsets to be committed")
    produce(stack, topics.orders, order_messages("after", 7))
    # The consumer that asks is no member of the group, and never joins one: the offsets come
    # from the broker whatever the asking consumer's membership is doing (a member stuck
    # rejoining cannot answer committed() itself).
    consumer = Consumer({"bootstrap.servers": stack.bootstrap_servers, "group.id": "elsewhere"})
    try:
        progress = group_progress(
            consumer, AdminClient(client(stack)), topics.group, topics.orders, 10
        )
    finally:
        consumer.close()
    assert progress is not None
    names = [f"{topics.orders}/0", f"{topics.orders}/1"]
    assert sorted(progress.committed) == sorted(progress.waiting) == names
    assert sum(progress.committed.values()) == 10
    assert sum(progress.waiting.values()) == 7


def test_group_progress_is_unknown_for_a_topic_or_a_broker_that_is_not_there(
    stack: Stack, topics: Topics
) -> None:
    away: dict[str, str | int | float | bool] = {"bootstrap.servers": f"127.0.0.1:{free_port()}"}
    nowhere = Consumer({**away, "group.id": "nowhere"})
    try:
        started = time.monotonic()
        assert group_progress(nowhere, AdminClient(away), "nowhere", "orders", 1) is None
        assert time.monotonic() - started < 5
    finally:
        nowhere.close()
    here = Consumer({"bootstrap.servers": stack.bootstrap_servers, "group.id": topics.group})
    try:
        admin = AdminClient(client(stack))
        never_made = f"{topics.orders}-never-made"
        assert group_progress(here, admin, topics.group, never_made, 5) is None
    finally:
        here.close()


def test_consumers_that_never_fetch_make_it_stuck_until_one_does(
    stack: Stack, topics: Topics, switch: Path
) -> None:
    writer = FakeWriter()
    with storing_before(stack, topics, writer, 5, stall_timeout_seconds=1) as running:
        switch.write_text("1000")  # every consumer, the new ones too
        wait_until(frozen_marker(switch).exists, 30, "the consumer to freeze")
        produce(stack, topics.orders, order_messages("after", 5))
        stuck = wait_until(running.liveness.not_live, 90, "the consumer to be reported stuck")
        assert stuck["consumer"].startswith(
            f"nothing fetched after {RESTARTS_BEFORE_STUCK} new consumers ("
        )
        assert f"{topics.orders}/" in stuck["consumer"]
        restarts = stalled_restarts(running.metrics)
        assert restarts >= RESTARTS_BEFORE_STUCK + 1
        assert len(writer.stored) < 10  # but one the first consumer polled before it froze
        switch.unlink()
        wait_until(lambda: len(writer.stored) == 10, 60, "the orders to be stored at last")
        wait_until(lambda: running.liveness.not_live() == {}, 10, "the consumer to be live again")
    assert written_once(
        writer, [f"before-{n}" for n in range(5)] + [f"after-{n}" for n in range(5)]
    )
