"""Orders from the real Kafka broker into the real PostgreSQL, through `order-viewer serve`."""

from __future__ import annotations

import copy
import random
import threading
import time
from collections.abc import Callable

import pytest

from order_viewer.entrypoints.generate import SAMPLE_ORDER, break_order, make_order
from tests.audit import (
    assert_stored_exactly,
    orphan_rows,
    row_counts,
    stored_documents,
    stream,
    wait_stored,
)
from tests.conftest import (
    ServiceProcess,
    Stack,
    Topics,
    committed_lag,
    consume_all,
    encode_orders,
    produce,
    wait_until,
)

pytestmark = pytest.mark.integration


def test_sample_lands_in_the_tables_exactly(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    start_service()
    sample = copy.deepcopy(SAMPLE_ORDER)
    sample["order_uid"] = f"sample-{topics.group[-10:]}"
    sample["payment"]["transaction"] = sample["order_uid"]
    produce(stack, topics.orders, encode_orders([sample]))

    wait_stored(stack, [sample["order_uid"]])
    assert stored_documents(stack, [sample["order_uid"]]) == {sample["order_uid"]: sample}
    assert row_counts(stack, [sample["order_uid"]]) == {
        "orders": 1,
        "delivery": 1,
        "payment": 1,
        "items": 1,
    }
    with stack.connect() as connection:
        row = connection.execute(
            "SELECT p.amount, o.date_created FROM orders o JOIN payment p USING (order_uid) "
            "WHERE order_uid = %s",
            (sample["order_uid"],),
        ).fetchone()
    assert row is not None
    amount, date_created = row
    assert amount == 1817
    assert date_created.isoformat() == "2021-11-26T06:22:19+00:00"


def test_mixed_batch_stores_valid_and_dead_letters_invalid(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    start_service()
    rng = random.Random(7)
    valid = [make_order(rng) for _ in range(60)]
    invalid: list[tuple[bytes, bytes, str]] = []
    for _ in range(25):
        order = make_order(rng)
        value, code = break_order(rng, order)
        invalid.append((order["order_uid"].encode(), value, code))
    messages = encode_orders(valid) + [(key, value) for key, value, _ in invalid]
    rng.shuffle(messages)
    produce(stack, topics.orders, [*messages, (b"tombstone", None), (b"empty", b"")])

    wait_stored(stack, [order["order_uid"] for order in valid])
    expected = {order["order_uid"]: order for order in valid}
    assert stored_documents(stack, list(expected)) == expected

    dead = consume_all(stack, topics.dead_letters, len(invalid) + 2)
    assert len(dead) == len(invalid) + 2
    by_value = {(message.key(), message.value()): message for message in dead}
    for key, value, code in invalid:
        message = by_value[(key, value)]  # byte-for-byte, with its key
        headers = dict(message.headers())
        assert headers["error.code"].decode() == code
        assert headers["error.message"]
        assert headers["source.topic"].decode() == topics.orders
        assert int(headers["source.offset"]) >= 0
        assert int(headers["source.partition"]) >= 0
    assert dict(by_value[(b"tombstone", None)].headers())["error.code"] == b"empty_value"
    assert dict(by_value[(b"empty", b"")].headers())["error.code"] == b"empty_value"
    # Nothing invalid reached the database.
    assert row_counts(stack, [key.decode() for key, *_ in invalid])["orders"] == 0
    wait_until(lambda: committed_lag(stack, topics) == 0, 30, "offsets committed to the end")


def test_duplicate_changes_nothing_and_newer_message_replaces(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    start_service()
    rng = random.Random(11)
    order = make_order(rng)
    uid = order["order_uid"]
    produce(stack, topics.orders, encode_orders([order]))
    wait_stored(stack, [uid])
    with stack.connect() as connection:
        before = connection.execute(
            "SELECT xmin::text, stored_at FROM orders WHERE order_uid = %s", (uid,)
        ).fetchone()

    produce(stack, topics.orders, encode_orders([order, order]))
    wait_until(lambda: committed_lag(stack, topics) == 0, 30, "the duplicates to be consumed")
    with stack.connect() as connection:
        after = connection.execute(
            "SELECT xmin::text, stored_at FROM orders WHERE order_uid = %s", (uid,)
        ).fetchone()
    assert after == before
    assert row_counts(stack, [uid])["orders"] == 1

    updated = make_order(rng, order_uid=uid)
    updated["items"] = updated["items"][:1] + [updated["items"][0]] * 2
    newest = make_order(rng, order_uid=uid)
    produce(stack, topics.orders, encode_orders([updated, newest]))
    wait_until(lambda: stored_documents(stack, [uid]).get(uid) == newest, 30, "the newest version")
    assert row_counts(stack, [uid]) == {
        "orders": 1,
        "delivery": 1,
        "payment": 1,
        "items": len(newest["items"]),
    }
    assert orphan_rows(stack) == 0


# With several writers, batches of different partitions are in flight at once when the kill
# comes, each with its own offsets to store.
@pytest.mark.parametrize("writers", ["1", "3"])
def test_sigkill_mid_stream_loses_and_duplicates_nothing(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess], writers: str
) -> None:
    # The restarted instance waits for the killed one's session to end: 6 s here, not 45 (the
    # crash loop of tests/faults runs with the default).
    service = start_service(KAFKA_SESSION_TIMEOUT_MS="6000", DATABASE_WRITERS=writers)
    rng = random.Random(2024)
    orders = [make_order(rng) for _ in range(20_000)]
    producer = threading.Thread(target=stream, args=(stack, topics.orders, orders, 6.0))
    producer.start()
    wait_until(
        lambda: row_counts(stack, [o["order_uid"] for o in orders[:2000]])["orders"] > 100,
        60,
        "the service to be storing",
    )
    service.kill()
    producer.join()
    service.start()
    assert_stored_exactly(stack, topics, orders)


def test_a_static_member_restarted_after_a_crash_resumes_before_its_session_expires(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    """The group keeps a killed member's partitions for its session timeout, and an instance
    that comes back under a new member id waits that long. Under the same
    KAFKA_GROUP_INSTANCE_ID it is the same member and takes them back at once."""
    session_seconds = 60
    service = start_service(
        KAFKA_GROUP_INSTANCE_ID="order-viewer-0",
        KAFKA_SESSION_TIMEOUT_MS=str(session_seconds * 1000),
    )
    rng = random.Random(4711)
    before = [make_order(rng) for _ in range(200)]
    produce(stack, topics.orders, encode_orders(before))
    wait_stored(stack, [order["order_uid"] for order in before])
    service.kill()
    after = [make_order(rng) for _ in range(200)]
    produce(stack, topics.orders, encode_orders(after))
    restarted = time.monotonic()
    service.start()
    wait_stored(stack, [order["order_uid"] for order in after], timeout=session_seconds / 2)
    print(f"\nstatic member: stored again {time.monotonic() - restarted:.1f} s after the restart")
    assert_stored_exactly(stack, topics, before + after)


def test_a_static_member_fenced_by_another_with_its_id_stops_with_the_reason(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    """Two instances given one KAFKA_GROUP_INSTANCE_ID: the broker fences the older one, whose
    consumer can then never consume again. It must stop and say why, not look alive."""
    first = start_service(KAFKA_GROUP_INSTANCE_ID="order-viewer-0")
    wait_until(lambda: "partitions assigned" in first.log(), 30, "the first to consume")
    second = start_service(KAFKA_GROUP_INSTANCE_ID="order-viewer-0")
    fenced = first.process
    assert fenced is not None
    assert second.process is not None
    wait_until(lambda: fenced.poll() is not None, 60, "the fenced instance to stop")
    assert fenced.returncode == 1
    assert (
        "Kafka reported an error the service cannot recover from: Fatal error: Broker: "
        "Static consumer fenced by other consumer with same group.instance.id"
    ) in first.log()
    assert second.process.poll() is None


def test_database_outage_mid_stream_is_waited_out(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    service = start_service()
    rng = random.Random(99)
    orders = [make_order(rng) for _ in range(5000)]
    producer = threading.Thread(target=stream, args=(stack, topics.orders, orders, 4.0))
    producer.start()
    wait_until(
        lambda: row_counts(stack, [o["order_uid"] for o in orders[:1000]])["orders"] > 10,
        60,
        "the service to be storing",
    )
    stack.servers.pg_stop()
    try:
        time.sleep(15)
        assert service.process is not None
        assert service.process.poll() is None, "the service must wait, not exit"
    finally:
        stack.servers.pg_start()
    producer.join()
    assert_stored_exactly(stack, topics, orders)
    assert "database unavailable, retrying" in service.log()
    assert "database recovered" in service.log()
