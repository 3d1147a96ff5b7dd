"""`broker.enqueue`, the one way the service and its tools hand a message to a producer: a full
local queue is waited out, never a dropped message or an error in the middle of a batch."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from order_viewer.adapters.kafka.broker import Headers, enqueue
from tests.fakes import Queued, StalledProducer


def delivered(error: KafkaError | None, _: Any) -> None:
    """A delivery report that is only passed on, never called here."""


def test_a_full_queue_is_polled_until_the_message_fits_and_it_is_queued_once() -> None:
    producer = StalledProducer(full=3)
    headers: Headers = [("replayed.from", b"dlq/0/7")]
    enqueue(
        producer, "orders", key=b"k", value=b"v", on_delivery=delivered, headers=headers,
        timestamp=1_700_000_000_000, partition=2,
    )  # fmt: skip
    assert len(producer.polls) == 3
    # Each wait lets the delivery reports run, and is short: the queue drains as acknowledged.
    assert all(0 < timeout <= 1 for timeout in producer.polls)
    assert producer.queued == [
        Queued("orders", b"k", b"v", 2, delivered, 1_700_000_000_000, headers)
    ]


def test_a_message_with_room_is_queued_at_once_with_the_producers_own_defaults() -> None:
    producer = StalledProducer()
    enqueue(producer, "orders", key=None, value=None)
    assert producer.polls == []
    # Partition -1 is the producer's partitioner, time stamp 0 its clock.
    assert producer.queued == [Queued("orders", None, None, -1, None, 0, None)]


def test_any_other_error_reaches_the_caller_without_waiting() -> None:
    # The dead-letter writer tells a message too large from the rest by this error.
    too_large = KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    producer = StalledProducer(full=1, error=too_large)
    with pytest.raises(KafkaException) as raised:
        enqueue(producer, "dlq", key=b"k", value=b"v" * 10)
    assert raised.value is too_large
    assert producer.polls == []
    assert producer.queued == []
