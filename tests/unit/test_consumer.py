from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import Consumer

from order_viewer.config import Settings
from order_viewer.consumer import by_size, group_membership, lane_groups
from order_viewer.ports import Message


def message(offset: int, size: int | None) -> Message:
    return Message("orders", 0, offset, b"k", None if size is None else b"x" * size)


def test_batches_are_cut_by_bytes_in_order() -> None:
    messages = [message(0, 40), message(1, 40), message(2, 40), message(3, 100), message(4, 10)]
    batches = by_size(messages, 100)
    assert [[m.offset for m in batch] for batch in batches] == [[0, 1], [2], [3], [4]]


def test_empty_values_and_oversized_messages_still_get_a_batch() -> None:
    messages = [message(0, None), message(1, 0), message(2, 500), message(3, 1)]
    batches = by_size(messages, 100)
    assert [[m.offset for m in batch] for batch in batches] == [[0, 1], [2], [3]]
    assert by_size([], 100) == []


def on(partition: int, offset: int) -> Message:
    return Message("orders", partition, offset, b"k", b"{}")


def three_lanes(partition: int) -> int:
    return partition % 3


def positions(groups: list[tuple[frozenset[int], list[Message]]]) -> list[Any]:
    return [
        (sorted(lanes), [(m.partition, m.offset) for m in messages]) for lanes, messages in groups
    ]


def test_a_small_poll_is_one_batch_of_all_its_lanes_in_the_order_it_came() -> None:
    messages = [on(0, 0), on(4, 0), on(1, 0), on(0, 1)]
    groups = lane_groups(messages, three_lanes, 5, lambda lane: True)
    assert positions(groups) == [([0, 1], [(0, 0), (4, 0), (1, 0), (0, 1)])]
    assert lane_groups([], three_lanes, 5, lambda lane: True) == []


def test_a_large_poll_is_a_batch_per_lane_the_free_lanes_first() -> None:
    messages = [on(0, 0), on(1, 0), on(2, 0), on(3, 0), on(1, 1), on(5, 0)]
    groups = lane_groups(messages, three_lanes, 5, lambda lane: lane != 0)
    assert positions(groups) == [
        ([1], [(1, 0), (1, 1)]),
        ([2], [(2, 0), (5, 0)]),
        ([0], [(0, 0), (3, 0)]),
    ]


def test_a_large_poll_of_one_lane_is_one_batch() -> None:
    messages = [on(3, n) for n in range(10)]
    assert positions(lane_groups(messages, three_lanes, 5, lambda lane: True)) == [
        ([0], [(3, n) for n in range(10)])
    ]


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, {"group.id": "order-viewer", "session.timeout.ms": 45_000}),
        (
            {"kafka_group_instance_id": "viewer-0", "kafka_session_timeout_ms": 10_000},
            {
                "group.id": "order-viewer",
                "session.timeout.ms": 10_000,
                "group.instance.id": "viewer-0",
            },
        ),
        (
            {"kafka_group_protocol": "consumer"},
            {"group.id": "order-viewer", "group.protocol": "consumer"},
        ),
    ],
)
def test_group_membership_is_one_librdkafka_accepts(
    settings: dict[str, Any], expected: dict[str, object]
) -> None:
    membership = group_membership(Settings(_env_file=None, **settings))
    assert membership == expected
    # librdkafka checks its configuration when the client is made, before any connection.
    Consumer({"bootstrap.servers": "127.0.0.1:9", **membership}).close()
