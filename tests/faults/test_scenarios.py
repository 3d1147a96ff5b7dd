"""Fault injection against the real servers: crashes, outages, scale-out, a slow database and
a graceful stop, each ending with the same audit of what PostgreSQL and Kafka hold."""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import httpx
import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition

from order_viewer.domain.model import order_json, parse_order
from order_viewer.entrypoints.generate import break_order, encode, make_order
from tests.audit import orphan_rows, stored_count
from tests.conftest import (
    ServiceProcess,
    Stack,
    Topics,
    committed_lag,
    end_offsets,
    produce,
    read_topic,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]


class Stream:
    """A mixed stream of valid and invalid messages, produced over a few seconds in a thread."""

    def __init__(self, count: int, seed: int, invalid_share: float = 0.05) -> None:
        rng = random.Random(seed)
        self.valid: dict[str, dict[str, Any]] = {}
        self.invalid: dict[bytes, tuple[bytes, str]] = {}  # key -> (value, expected code)
        self.messages: list[tuple[bytes | None, bytes | None]] = []
        for number in range(count):
            order = make_order(rng)
            if rng.random() < invalid_share:
                value, code = break_order(rng, order)
                key = f"invalid-{seed}-{number}".encode()
                self.invalid[key] = (value, code)
                self.messages.append((key, value))
            else:
                self.valid[order["order_uid"]] = order
                self.messages.append((order["order_uid"].encode(), encode(order)))
        self._thread: threading.Thread | None = None

    def start(self, stack: Stack, topic: str, seconds: float) -> Stream:
        def run() -> None:
            chunks = 40
            size = max(1, len(self.messages) // chunks)
            for start in range(0, len(self.messages), size):
                produce(stack, topic, self.messages[start : start + size])
                time.sleep(seconds / chunks)

        self._thread = threading.Thread(target=run, name="producer")
        self._thread.start()
        return self

    def join(self) -> None:
        assert self._thread is not None
        self._thread.join()


def dead_letters(stack: Stack, topic: str, keys: set[bytes], timeout: float = 60) -> dict[Any, Any]:
    """The dead-letter topic's messages by key, read until every one of `keys` was seen."""
    messages = read_topic(
        stack, topic, lambda read: keys <= {message.key() for message in read}, timeout
    )
    return {message.key(): message for message in messages}


def audit(
    stack: Stack, topics: Topics, stream: Stream, since: float | None = None, timeout: float = 240
) -> None:
    """Every valid order stored exactly once with its content, every invalid one dead-lettered
    with its reason, no orphan rows, and the group's committed offsets at the end of the topic.
    Prints the figures (docs/RELIABILITY.md); `since` is when the last fault ended."""
    uids = list(stream.valid)
    wait_until(lambda: stored_count(stack, uids) == len(uids), timeout, "every valid order stored")
    caught_up = time.monotonic()
    expected = {
        uid: hashlib.sha256(order_json(parse_order(encode(order)))).digest()
        for uid, order in stream.valid.items()
    }
    with stack.connect() as connection:
        stored = dict(
            connection.execute(
                "SELECT order_uid, content_sha256 FROM orders WHERE order_uid = ANY(%s)", (uids,)
            ).fetchall()
        )
        items = connection.execute(
            "SELECT count(*) FROM items WHERE order_uid = ANY(%s)", (uids,)
        ).fetchone()
    assert stored == expected, "stored content differs from what was produced"
    assert items is not None
    assert items[0] == sum(len(order["items"]) for order in stream.valid.values())
    assert orphan_rows(stack) == 0

    # At least once: a redelivered batch may dead-letter a message twice, never zero times.
    by_key = dead_letters(stack, topics.dead_letters, set(stream.invalid))
    for key, (value, code) in stream.invalid.items():
        assert key in by_key, f"dead letter missing for {key!r}"
        assert by_key[key].value() == value
        assert dict(by_key[key].headers())["error.code"].decode() == code
    wait_until(lambda: committed_lag(stack, topics) == 0, 90, "offsets committed to the end")
    trail_audit(stack, topics, stream)
    recovery = f"; all stored {caught_up - since:.1f} s after the last fault" if since else ""
    print(
        f"\naudit: produced {len(stream.messages)} ({len(stream.valid)} valid, "
        f"{len(stream.invalid)} invalid); stored {len(stored)}, dead-lettered "
        f"{len(stream.invalid)} with the right reason; duplicates 0, lost 0; every message "
        f"in its order's trail{recovery}"
    )


def trail_audit(stack: Stack, topics: Topics, stream: Stream) -> None:
    """Once every offset is committed (every message acknowledged), each order's trail holds
    every message of it in the topic (at least once: a redelivered batch records its messages
    again), and nothing else: no entry for a message never sent. A valid order's entries carry
    the digest of their own message's version (an order may have been sent in several) and are
    stored, unchanged or older, at least one stored; an invalid one's are dead-lettered with
    its reason."""
    keys = {uid.encode() for uid in stream.valid} | set(stream.invalid)
    # The whole topic: a producer's retry while the broker was away may have written a message
    # twice, and the service handled both copies.
    ends = end_offsets(stack, topics.orders)
    looked_at = 0
    newest: dict[int, int] = {}

    def to_the_end(read: list[Any]) -> bool:
        nonlocal looked_at
        for message in read[looked_at:]:
            newest[message.partition()] = message.offset()
        looked_at = len(read)
        return all(newest.get(partition, -1) >= end - 1 for partition, end in ends.items())

    sent = read_topic(stack, topics.orders, to_the_end, timeout=120)
    coordinates = {
        (message.key().decode(), message.partition(), message.offset()): message.value()
        for message in sent
        if message.key() in keys
    }
    with stack.connect() as connection:
        rows = connection.execute(
            "SELECT order_uid, kafka_partition, kafka_offset, outcome, content_sha256, "
            "reason_code FROM order_trail WHERE topic = %s AND order_uid = ANY(%s)",
            (topics.orders, [key.decode() for key in keys]),
        ).fetchall()
    recorded = {(uid, partition, offset) for uid, partition, offset, *_ in rows}
    assert coordinates.keys() <= recorded, (
        f"{len(coordinates.keys() - recorded)} messages missing in trails"
    )
    assert recorded <= coordinates.keys(), (
        f"{len(recorded - coordinates.keys())} trail entries never sent"
    )
    stored: set[str] = set()
    for uid, partition, offset, outcome, sha256, reason in rows:
        if uid in stream.valid:
            version = order_json(parse_order(coordinates[uid, partition, offset]))
            assert outcome in ("stored", "unchanged", "older"), uid
            assert bytes(sha256) == hashlib.sha256(version).digest(), uid
            if outcome == "stored":
                stored.add(uid)
        else:
            assert (outcome, reason) == ("dead_lettered", stream.invalid[uid.encode()][1]), uid
    assert stored == set(stream.valid), f"{len(set(stream.valid) - stored)} never stored"


def test_crash_loop_of_five_sigkills(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    # Each restart under a new member id waits for the killed one's session to end: a 6 s
    # session keeps five of them within the suite's time, and changes nothing of what is checked.
    service = start_service(KAFKA_SESSION_TIMEOUT_MS="6000")
    stream = Stream(50_000, seed=101).start(stack, topics.orders, seconds=15)
    uids = list(stream.valid)
    rng = random.Random(7)
    for _ in range(5):
        time.sleep(rng.uniform(1.0, 4.0))
        service.kill()
        service.start()
    last_fault = time.monotonic()
    stream.join()
    audit(stack, topics, stream, since=last_fault)
    assert stored_count(stack, uids) == len(uids)


def http_status(service: ServiceProcess, uid: str) -> int:
    return service.get(f"/order/{uid}").status_code


def test_database_outage_and_crash_are_waited_out(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    service = start_service(CACHE_CAPACITY="1000")
    stream = Stream(12_000, seed=102).start(stack, topics.orders, seconds=8)
    first = list(stream.valid)[:50]
    wait_until(lambda: stored_count(stack, first) == len(first), 60, "the service to be storing")
    cached = first[-1]
    assert http_status(service, cached) == 200

    stack.servers.pg_stop()
    try:
        outage_started = time.monotonic()
        while time.monotonic() - outage_started < 30:
            assert service.process is not None
            assert service.process.poll() is None, "the service must wait, not exit"
            assert http_status(service, cached) == 200
            assert http_status(service, "never-stored-order") == 503
            time.sleep(3)
    finally:
        stack.servers.pg_start()
    restarted = time.monotonic()
    stream.join()
    audit(stack, topics, stream, since=restarted)

    second = Stream(8_000, seed=103).start(stack, topics.orders, seconds=6)
    second_uids = list(second.valid)
    wait_until(lambda: stored_count(stack, second_uids) > 100, 60, "a batch in flight")
    stack.servers.pg_crash()  # immediate mode: in-flight transactions are lost, not committed
    stack.servers.pg_start()
    restarted = time.monotonic()
    second.join()
    audit(stack, topics, second, since=restarted)
    assert service.process is not None
    assert service.process.poll() is None
    assert "database recovered" in service.log()


# Two broker restarts, the outage and the audit each have a limit of their own; on a loaded
# machine they add up to more than the suite's default five minutes.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_broker_outage_and_kill_are_recovered_from(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess], protocol: str
) -> None:
    service = start_service(KAFKA_GROUP_PROTOCOL=protocol)
    # Orders of their own for each protocol: the module's tests share one database, where the
    # same seed would find the first run's orders already stored.
    stream = Stream(6_000, seed={"classic": 104, "consumer": 108}[protocol], invalid_share=0.2)
    produce(stack, topics.orders, stream.messages[:3000])
    first = list(stream.valid)[:100]
    wait_until(lambda: stored_count(stack, first) == len(first), 60, "the service to be storing")
    stack.servers.kafka_stop()
    try:
        time.sleep(30)
        assert service.process is not None
        assert service.process.poll() is None
    finally:
        stack.servers.kafka_start()
    produce(stack, topics.orders, stream.messages[3000:4500])
    stack.servers.kafka_kill()
    stack.servers.kafka_start()
    restarted = time.monotonic()
    produce(stack, topics.orders, stream.messages[4500:])
    audit(stack, topics, stream, since=restarted)
    assert service.process.poll() is None
    assert (
        "Kafka broker recovered" in service.log() or "Kafka broker unavailable" not in service.log()
    )


async def statuses(base_urls: list[str], uids: list[str]) -> dict[int, int]:
    """Status counts of GET /order/{uid} for every uid on every instance, 32 at a time."""
    counts: dict[int, int] = {}
    limit = asyncio.Semaphore(32)
    async with httpx.AsyncClient(timeout=30) as client:

        async def one(url: str) -> None:
            async with limit:
                status = (await client.get(url)).status_code
                counts[status] = counts.get(status, 0) + 1

        await asyncio.gather(*(one(f"{base}/order/{uid}") for base in base_urls for uid in uids))
    return counts


def test_scale_out_rebalances_without_loss(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    # A killed member keeps its partitions for the session timeout: 6 s here, not 45.
    settings = {
        "KAFKA_TOPIC_PARTITIONS": "6",
        "CACHE_CAPACITY": "2000",
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
    }
    first = start_service(**settings)
    second = start_service(**settings)
    third = start_service(**settings)
    stream = Stream(3_000, seed=105).start(stack, topics.orders, seconds=5)
    time.sleep(2)
    second.kill()
    killed = time.monotonic()
    fourth = start_service(**settings)
    stream.join()
    audit(stack, topics, stream, since=killed)
    alive = [first, third, fourth]
    for service in alive:
        assert service.process is not None
        assert service.process.poll() is None
        # The others may have stored every order before the group gave the last one its share.
        wait_until(partial(given_partitions, service), 60, "every member to be given partitions")
    started = time.monotonic()
    counts = asyncio.run(statuses([s.base_url for s in alive], list(stream.valid)))
    assert counts == {200: len(alive) * len(stream.valid)}
    print(f"{sum(counts.values())} lookups in {time.monotonic() - started:.1f} s")


def given_partitions(service: ServiceProcess) -> bool:
    return "partitions assigned" in service.log()


def test_slow_database_causes_no_storm_and_loses_nothing(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    service = start_service(KAFKA_SESSION_TIMEOUT_MS="6000", KAFKA_MAX_POLL_INTERVAL_MS="10000")
    stream = Stream(8_000, seed=106).start(stack, topics.orders, seconds=6)
    first = list(stream.valid)[:100]
    wait_until(lambda: stored_count(stack, first) == len(first), 60, "the service to be storing")
    # Every write waits behind this lock for longer than the consumer's poll interval.
    with psycopg.connect(stack.database_url) as blocker:
        blocker.execute("LOCK TABLE orders IN EXCLUSIVE MODE")
        time.sleep(15)
        blocker.rollback()
    released = time.monotonic()
    stream.join()
    audit(stack, topics, stream, since=released)
    metrics = service.get("/metrics").text

    def counter(name: str) -> float:
        found = re.search(rf"^{name} (\S+)", metrics, re.M)
        assert found is not None, name
        return float(found[1])

    consumed = counter("order_viewer_messages_consumed_total")
    stored = counter("order_viewer_orders_stored_total")
    replaced = counter("order_viewer_orders_replaced_total")
    assert stored == len(stream.valid)  # each order stored once
    assert replaced == 0
    # Messages re-read after losing the partitions: at most one more pass, not a storm.
    assert consumed <= 2 * len(stream.messages)


def committed_positions(stack: Stack, topics: Topics) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": stack.bootstrap_servers, "group.id": topics.group})
    try:
        partitions = (
            consumer.list_topics(topics.orders, timeout=10).topics[topics.orders].partitions
        )
        committed = consumer.committed(
            [TopicPartition(topics.orders, p) for p in partitions], timeout=10
        )
        return {tp.partition: tp.offset for tp in committed if tp.offset >= 0}
    finally:
        consumer.close()


def test_sigterm_during_a_large_batch_stops_cleanly_and_resumes_exactly(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    stream = Stream(30_000, seed=107, invalid_share=0.0)
    service = start_service(BATCH_MAX_ORDERS="5000")  # creates the topics
    assert service.terminate() == 0
    produce(stack, topics.orders, stream.messages)
    service.start()
    uids = list(stream.valid)
    wait_until(lambda: stored_count(stack, uids) > 5000, 60, "large batches being stored")
    stopped_at = time.monotonic()
    assert service.terminate(timeout=15) == 0
    assert time.monotonic() - stopped_at < 10
    # Exactly what is stored is committed: the next offset of each partition follows its newest
    # stored message, so the restart neither skips nor repeats.
    with stack.connect() as connection:
        newest = dict(
            connection.execute(
                "SELECT kafka_partition, max(kafka_offset) + 1 FROM orders "
                "WHERE order_uid = ANY(%s) GROUP BY kafka_partition",
                (uids,),
            ).fetchall()
        )
    assert committed_positions(stack, topics) == newest
    service.start()
    audit(stack, topics, stream, since=stopped_at)
    assert "stopping on SIGTERM" in service.log()
