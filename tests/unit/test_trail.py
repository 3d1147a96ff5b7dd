"""The trail's pure parts: the API's cursor, what the consumer takes from a message's timestamp
and `replayed.from` header, the paths that are trails, and the order in which the ingest records
a batch's dead letters."""

from __future__ import annotations

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_NOT_AVAILABLE

from order_viewer.adapters.http.access import required_scope
from order_viewer.adapters.http.trail import InvalidCursor, cursor_of, key_of
from order_viewer.adapters.kafka.consumer import LATEST_TIMESTAMP_MS, replayed_from, timestamp_ms
from order_viewer.adapters.metrics import route_template, trail_of
from order_viewer.service.ingest import OrderIngest, prepare_batch
from order_viewer.service.ports import ConsumedMessage, Stopped
from tests.fakes import FakeDeadLetterTrail
from tests.unit.test_service import Ingest, message, order


@pytest.mark.parametrize("key", [0, 1, 2, 255, 256, 10**12, 2**63 - 1])
def test_a_cursor_stands_for_its_key_alone(key: int) -> None:
    cursor = cursor_of(key)
    assert len(cursor) == 11
    assert key_of(cursor) == key


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "A",
        "_" * 11,  # beyond a bigint
        "gAAAAAAAAAA",  # 2**63: beyond a bigint
        cursor_of(1)[:-1] + "F",  # the same bytes, written another way
        cursor_of(1) + "=",
        cursor_of(1) + "A",
        "AAAAAAAAAA=",
        "AAAAAAAA+AE",
        "AAAAAAAA/AE",
        "AAAAAAAAAA\u0415",
        "AAAAAAAAA\nE",
        "x" * 10_000,
        cursor_of(1) + "\n",
    ],
)
def test_anything_else_is_not_a_cursor(cursor: str) -> None:
    with pytest.raises(InvalidCursor):
        key_of(cursor)


@pytest.mark.parametrize(
    ("header", "kept"),
    [
        (b"orders.dlq/0/5", "orders.dlq/0/5"),
        (b"my_dlq-2/2147483647/9223372036854775807", "my_dlq-2/2147483647/9223372036854775807"),
        (b"orders.dlq/2147483648/5", None),
        (b"orders.dlq/0/9223372036854775808", None),
        (b"orders.dlq/01/5", None),
        (b"orders.dlq/-1/5", None),
        (b"orders.dlq/0/5\n", None),
        (b"orders.dlq/0/5/6", None),
        (b"orders dlq/0/5", None),
        (b"/0/5", None),
        (b"t" * 250 + b"/0/5", None),
        (b"x" * 100_000, None),
        (b"\xff\xfe/0/5", None),
        ("orders.dlq/0/5".encode("utf-16"), None),
        (b"", None),
        (None, None),
        ("orders.dlq/0/5", None),  # not bytes
    ],
)
def test_only_a_dead_letters_position_is_taken_from_replayed_from(
    header: bytes | str | None, kept: str | None
) -> None:
    assert replayed_from([("other", b"x"), ("replayed.from", header)]) == kept


def test_the_first_replayed_from_header_counts_and_none_is_none() -> None:
    assert replayed_from(None) is None
    assert replayed_from([]) is None
    assert replayed_from([("replayed.from", b"a/0/1"), ("replayed.from", b"b/0/2")]) == "a/0/1"
    assert replayed_from([("replayed.from", b"bad"), ("replayed.from", b"b/0/2")]) is None


@pytest.mark.parametrize(
    ("kind", "milliseconds", "kept"),
    [
        (TIMESTAMP_CREATE_TIME, 1_700_000_000_123, 1_700_000_000_123),
        (TIMESTAMP_CREATE_TIME, 0, 0),
        (TIMESTAMP_CREATE_TIME, LATEST_TIMESTAMP_MS, LATEST_TIMESTAMP_MS),
        (TIMESTAMP_CREATE_TIME, LATEST_TIMESTAMP_MS + 1, None),
        (TIMESTAMP_CREATE_TIME, -1, None),
        (TIMESTAMP_CREATE_TIME, -(2**63), None),
        (TIMESTAMP_CREATE_TIME, 2**63 - 1, None),
        (TIMESTAMP_NOT_AVAILABLE, 1_700_000_000_123, None),
    ],
)
def test_a_message_timestamp_is_kept_only_within_a_datetimes_range(
    kind: int, milliseconds: int, kept: int | None
) -> None:
    assert timestamp_ms(kind, milliseconds) == kept


@pytest.mark.parametrize(
    ("path", "uid", "scope", "route"),
    [
        ("/order/abc/trail", "abc", "orders:trail", "/order/{order_uid}/trail"),
        ("/order//trail", "", "orders:trail", "/order/{order_uid}/trail"),
        ("/order/a/b/trail", "a/b", "orders:trail", "/order/{order_uid}/trail"),
        ("/order/trail", None, "orders:read", "/order/{order_uid}"),
        ("/order/abc", None, "orders:read", "/order/{order_uid}"),
        ("/order/abc/trailer", None, "orders:read", "/order/{order_uid}"),
        ("/orders", None, "orders:read", "/orders"),
    ],
)
def test_a_trail_path_needs_its_own_scope_and_is_counted_apart(
    path: str, uid: str | None, scope: str, route: str
) -> None:
    assert trail_of(path) == uid
    assert required_scope(path) == scope
    assert route_template(path) == route


class Traced(Ingest):
    """An ingest over fakes that records trails."""

    def __init__(self) -> None:
        super().__init__()
        self.trail = FakeDeadLetterTrail(self.events)
        self.service = OrderIngest(
            [self.writer], self.cache, self.dead_letters, self.patience, self.metrics,
            trail=self.trail,
        )  # fmt: skip


def keyed(offset: int, key: bytes | None, value: bytes | None) -> ConsumedMessage:
    return ConsumedMessage("orders", 0, offset, key, value)


def test_dead_letters_are_recorded_after_the_topic_took_them_and_before_the_acknowledgement() -> (
    None
):
    ingest = Traced()
    ingest.all(
        [
            keyed(0, b"a", b"{nope"),
            keyed(1, b"not an id!", b"{nope"),
            keyed(2, None, b"{nope"),
            keyed(3, b"b", order("b")),
            keyed(4, b"\xc3\xa9", b"{nope"),
        ]
    )
    assert ingest.events == [
        "dead-lettered [0, 1, 2, 4]",
        "trail [('a', 0)]",
        "acknowledged [0, 1, 2, 3, 4]",
    ]


def test_an_outage_while_recording_dead_letters_is_waited_out_before_the_acknowledgement() -> None:
    ingest = Traced()
    ingest.trail.unavailable_for = 2
    ingest.all([keyed(0, b"a", b"{nope")])
    assert ingest.events == ["dead-lettered [0]", "trail [('a', 0)]", "acknowledged [0]"]


def test_a_stop_while_recording_dead_letters_acknowledges_nothing() -> None:
    ingest = Traced()
    ingest.trail.unavailable_for = 10**6
    ingest.stop.set()
    batch = prepare_batch([keyed(0, b"a", b"{nope")])
    outcome = ingest.service.store(batch)
    with pytest.raises(Stopped):
        ingest.service.settle(batch, outcome, ingest.acknowledge)
    assert ingest.events == ["dead-lettered [0]"]


def test_the_writer_is_given_every_valid_message_and_those_superseded_in_the_batch() -> None:
    ingest = Traced()
    ingest.all([message(0, order("a")), message(1, order("a", "B")), message(2, order("c"))])
    handled = [
        (entry.order_uid, entry.message.offset, entry.superseded) for entry in ingest.writer.handled
    ]
    assert sorted(handled) == [("a", 0, True), ("a", 1, False), ("c", 2, False)]
    assert all(entry.sha256 is not None for entry in ingest.writer.handled)


def test_without_a_trail_nothing_is_recorded() -> None:
    ingest = Ingest()
    ingest.all([message(0, order("a")), message(1, b"{nope")])
    assert ingest.writer.handled == []
    assert ingest.events == ["dead-lettered [1]", "acknowledged [0, 1]"]
