"""The PostgreSQL side of keeping instances in step, in-process against the real server: the
notifications a committed write sends, the listener that hears them (and loses its connection),
and the retention expirer."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import psycopg
import pytest

from order_viewer.adapters.postgres.expirer import PostgresOrderExpirer
from order_viewer.adapters.postgres.listener import (
    CHANGES_CHANNEL,
    PostgresChangeListener,
    change_payloads,
)
from order_viewer.adapters.postgres.reader import stored_versions
from order_viewer.adapters.postgres.writer import PostgresOrderWriter
from order_viewer.domain.model import PreparedOrder, parse_order
from order_viewer.entrypoints.generate import make_order
from order_viewer.service.ports import Deletion, RejectedByDatabase
from order_viewer.service.retry import Health, Patience
from tests.audit import orphan_rows, row_counts
from tests.conftest import Stack, wait_until

pytestmark = pytest.mark.integration

_rng = random.Random(1010)


def prepared(order: dict[str, Any], offset: int = 0) -> PreparedOrder:
    return PreparedOrder.of(parse_order(json.dumps(order).encode()), 0, offset)


def renamed(order: dict[str, Any], name: str) -> dict[str, Any]:
    return {**order, "delivery": {**order["delivery"], "name": name}}


def created(order: dict[str, Any], days_ago: float) -> dict[str, Any]:
    instant = datetime.now(UTC) - timedelta(days=days_ago)
    return {**order, "date_created": instant.isoformat().replace("+00:00", "Z")}


def heard(connection: psycopg.Connection[Any], timeout: float = 1.0) -> list[str]:
    return [n.payload for n in connection.notifies(timeout=timeout) if n.channel == CHANGES_CHANNEL]


def announced(payloads: list[str]) -> list[str]:
    """The ids the payloads name, sorted (a batch's come in the order the merge returned them)."""
    return sorted(uid for payload in payloads for uid in payload.split(" ")[1:])


@pytest.fixture
def listening(stack: Stack) -> Iterator[psycopg.Connection[Any]]:
    with stack.connect() as connection:
        connection.execute(f"LISTEN {CHANGES_CHANNEL}")
        yield connection


@pytest.fixture
def writer(stack: Stack) -> Iterator[PostgresOrderWriter]:
    writer = PostgresOrderWriter(stack.database_url, "writer-1")
    yield writer
    writer.close()


def test_stored_replaced_and_deleted_orders_are_announced_when_the_write_commits(
    listening: psycopg.Connection[Any], writer: PostgresOrderWriter
) -> None:
    a, b, c = (make_order(_rng) for _ in range(3))
    writer.write([prepared(a, 1), prepared(b, 2)])
    # New orders too: another instance may remember their ids as absent.
    payloads = heard(listening)
    assert [payload.split(" ")[0] for payload in payloads] == ["writer-1"]
    assert announced(payloads) == sorted([a["order_uid"], b["order_uid"]])
    writer.write(
        [prepared(renamed(a, "A2"), 3), prepared(c, 4), prepared(b, 2)],
        [Deletion(b["order_uid"], 0, 1), Deletion("never-stored", 0, 9)],
    )
    # b is unchanged and its tombstone older than its stored version: a and c are announced.
    assert announced(heard(listening)) == sorted([a["order_uid"], c["order_uid"]])
    writer.write([], [Deletion(b["order_uid"], 0, 5)])
    assert heard(listening) == [f"writer-1 {b['order_uid']}"]


def test_a_write_that_rolls_back_announces_nothing(
    stack: Stack, listening: psycopg.Connection[Any], writer: PostgresOrderWriter
) -> None:
    a, bad = make_order(_rng), make_order(_rng)
    writer.write([prepared(a, 1)])
    assert announced(heard(listening)) == [a["order_uid"]]
    refused = prepared(bad, 2)
    negative = msgspec.structs.replace(refused.order.payment, amount=-1)
    broken = PreparedOrder(
        msgspec.structs.replace(refused.order, payment=negative),
        0, 2, refused.document, refused.sha256,
    )  # fmt: skip
    with pytest.raises(RejectedByDatabase):
        writer.write([prepared(renamed(a, "Never"), 3), broken], [Deletion(a["order_uid"], 0, 4)])
    assert heard(listening, 0.5) == []
    assert row_counts(stack, [a["order_uid"]])["orders"] == 1


def test_many_changes_are_announced_in_payloads_under_the_limit(
    listening: psycopg.Connection[Any], writer: PostgresOrderWriter
) -> None:
    orders = [make_order(_rng, order_uid=f"{n:04d}-" + "x" * 59) for n in range(400)]
    uids = sorted(order["order_uid"] for order in orders)
    writer.write([prepared(order, 1) for order in orders])
    assert announced(heard(listening, 2.0)) == uids  # new
    writer.write([prepared(renamed(order, "Again"), 2) for order in orders])
    payloads = heard(listening, 2.0)
    assert len(payloads) > 1
    assert all(len(payload.encode()) < 8000 for payload in payloads)
    assert announced(payloads) == uids  # replaced
    assert {payload.split(" ")[0] for payload in payloads} == {"writer-1"}


def test_the_payloads_of_a_batch_go_in_one_statement(
    listening: psycopg.Connection[Any],
    writer: PostgresOrderWriter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    orders = [make_order(_rng, order_uid=f"{n:04d}-" + "y" * 59) for n in range(300)]
    writer.write([prepared(order, 1) for order in orders])
    heard(listening, 2.0)  # the new orders' announcements, before the statements are counted
    notifying: list[str] = []
    execute = psycopg.Cursor.execute

    def counted(cursor: psycopg.Cursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        if "pg_notify" in str(query):
            notifying.append(str(query))
        return execute(cursor, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", counted)
    writer.write([prepared(renamed(order, "Again"), 2) for order in orders])
    payloads = heard(listening, 2.0)
    assert len(payloads) > 1
    assert len(notifying) == 1
    assert announced(payloads) == sorted(order["order_uid"] for order in orders)


def test_payloads_split_exactly_at_the_limit() -> None:
    ids = ["i" * 64] * 1000
    payloads = list(change_payloads("me", ids))
    assert all(len(payload) <= 7900 for payload in payloads)
    assert max(len(payload) for payload in payloads) > 7900 - 65
    assert sum(len(payload.split(" ")) - 1 for payload in payloads) == 1000
    assert list(change_payloads("me", [])) == []


class Recorder:
    """The listener's `Changes`, recording what it was told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple[str, ...]]] = []
        self.lock = threading.Lock()

    def changed(self, order_uids: Sequence[str]) -> None:
        with self.lock:
            self.events.append(("changed", tuple(order_uids)))

    def lost(self) -> None:
        with self.lock:
            self.events.append(("lost", ()))

    def listening(self) -> None:
        with self.lock:
            self.events.append(("listening", ()))

    def count(self, kind: str) -> int:
        with self.lock:
            return sum(1 for event, _ in self.events if event == kind)


@pytest.fixture
def every_change() -> Recorder:
    """What the listener tells of every notification, its own instance's included."""
    return Recorder()


@pytest.fixture
def listener(stack: Stack, every_change: Recorder) -> Iterator[tuple[Recorder, threading.Event]]:
    recorder, stop = Recorder(), threading.Event()
    patience = Patience(Health("database", logging.getLogger("test.database")), stop, 0.2)
    thread = threading.Thread(
        target=PostgresChangeListener(
            stack.database_url, "me", recorder, patience, every_change
        ).run
    )
    thread.start()
    try:
        wait_until(lambda: recorder.count("listening") == 1, 10, "the listener to listen")
        yield recorder, stop
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def notify(stack: Stack, payload: str) -> None:
    with stack.connect() as connection:
        connection.execute("SELECT pg_notify(%s, %s)", (CHANGES_CHANNEL, payload))


def test_the_listener_reports_other_instances_changes_and_skips_its_own(
    stack: Stack, listener: tuple[Recorder, threading.Event], every_change: Recorder
) -> None:
    recorder, _ = listener
    a = make_order(_rng)
    own = PostgresOrderWriter(stack.database_url, "me")
    other = PostgresOrderWriter(stack.database_url, "other")
    try:
        own.write([prepared(a, 1)])
        own.write([prepared(renamed(a, "Mine"), 2)])
        other.write([prepared(renamed(a, "Theirs"), 3)])
    finally:
        own.close()
        other.close()
    wait_until(lambda: recorder.count("changed") == 1, 10, "the other instance's change")
    assert recorder.events[1:] == [("changed", (a["order_uid"],))]
    # The streams of orders' changes hear all three, their own instance's (the first store,
    # then the replacement) first.
    wait_until(lambda: every_change.count("changed") == 3, 10, "the three changes")
    assert every_change.events == [
        ("listening", ()),
        ("changed", (a["order_uid"],)),
        ("changed", (a["order_uid"],)),
        ("changed", (a["order_uid"],)),
    ]


@pytest.mark.parametrize(
    ("payload", "reported"),
    [
        ("", None),
        ("other", None),
        ("me a b", None),
        ("other a", ("a",)),
        ("other  a", ("", "a")),
        ("other " + "z" * 7990, ("z" * 7990,)),
        ("other ☃ 'quoted' ;DROP", ("☃", "'quoted'", ";DROP")),
    ],
)
def test_hostile_notifications_only_ever_drop_cache_entries(
    stack: Stack,
    listener: tuple[Recorder, threading.Event],
    payload: str,
    reported: tuple[str, ...] | None,
) -> None:
    recorder, _ = listener
    notify(stack, payload)
    notify(stack, "other end-marker")
    wait_until(lambda: recorder.count("changed") >= 1 + (reported is not None), 10, "the marker")
    expected = ([("changed", reported)] if reported is not None else []) + [
        ("changed", ("end-marker",))
    ]
    assert recorder.events[1:] == expected


def listener_pids(stack: Stack) -> list[int]:
    with stack.connect() as connection:
        rows = connection.execute(
            "SELECT pid FROM pg_stat_activity "
            "WHERE application_name = 'order-viewer-listener' AND datname = current_database()"
        ).fetchall()
    return [int(pid) for (pid,) in rows]


def test_a_terminated_listener_connection_is_reported_lost_then_listens_again(
    stack: Stack, listener: tuple[Recorder, threading.Event]
) -> None:
    recorder, _ = listener
    (pid,) = listener_pids(stack)
    with stack.connect() as connection:
        connection.execute("SELECT pg_terminate_backend(%s)", (pid,))
    wait_until(lambda: recorder.count("listening") == 2, 10, "the listener to listen again")
    assert [event for event, _ in recorder.events] == ["listening", "lost", "listening"]
    assert listener_pids(stack) not in ([], [pid])
    notify(stack, "other after")
    wait_until(lambda: recorder.count("changed") == 1, 10, "a change heard after reconnecting")


def test_the_expirer_deletes_the_oldest_in_bounded_batches_and_skips_locked_rows(
    stack: Stack, listening: psycopg.Connection[Any], writer: PostgresOrderWriter
) -> None:
    old = [created(make_order(_rng), 40_000 + n) for n in range(5)]
    recent = [created(make_order(_rng), 1) for _ in range(2)]
    writer.write([prepared(order, n) for n, order in enumerate(old + recent)])
    writer.write([], [Deletion("gone-long-ago", 0, 1)])
    with stack.connect() as connection:
        connection.execute(
            "UPDATE order_tombstones SET deleted_at = now() - interval '40000 days' "
            "WHERE order_uid = 'gone-long-ago'"
        )
    heard(listening, 0.2)
    before = datetime.now(UTC) - timedelta(days=36_500)  # before any generated order
    expirer = PostgresOrderExpirer(stack.database_url, "sweeper")
    locked_uid = old[-1]["order_uid"]  # the oldest
    try:
        with stack.connect() as holder, holder.transaction():
            holder.execute("SELECT 1 FROM orders WHERE order_uid = %s FOR UPDATE", (locked_uid,))
            started = time.monotonic()
            first = expirer.expire(before, 2)
            assert time.monotonic() - started < 2  # did not wait for the lock
            assert locked_uid not in first.order_uids
            assert len(first.order_uids) == 2
            assert first.tombstones == 1
            rest = expirer.expire(before, 10)
        last = expirer.expire(before, 10)
    finally:
        expirer.close()
    expired = [*first.order_uids, *rest.order_uids, *last.order_uids]
    assert sorted(expired) == sorted(order["order_uid"] for order in old)
    assert last.order_uids == (locked_uid,)
    assert row_counts(stack, expired)["orders"] == 0
    assert row_counts(stack, [o["order_uid"] for o in recent])["orders"] == 2
    assert orphan_rows(stack) == 0
    assert announced(heard(listening)) == sorted(expired)


def test_the_expirers_deletions_are_heard_by_its_own_instance_too(
    stack: Stack, listener: tuple[Recorder, threading.Event]
) -> None:
    recorder, _ = listener
    old = created(make_order(_rng), 40_000)
    own, expirer = (
        PostgresOrderWriter(stack.database_url, "me"),
        PostgresOrderExpirer(stack.database_url, "me"),
    )
    try:
        own.write([prepared(old, 1)])
        expired = expirer.expire(datetime.now(UTC) - timedelta(days=36_500), 10)
    finally:
        own.close()
        expirer.close()
    assert expired.order_uids == (old["order_uid"],)
    wait_until(lambda: recorder.count("changed") == 1, 10, "the expiry to be heard")
    assert recorder.events[1:] == [("changed", (old["order_uid"],))]


def test_stored_versions_are_the_digests_of_the_stored_orders_only(
    stack: Stack, writer: PostgresOrderWriter
) -> None:
    a, b = make_order(_rng), make_order(_rng)
    writer.write([prepared(a, 1), prepared(b, 2)])
    writer.write([], [Deletion(b["order_uid"], 0, 3)])
    uids = [a["order_uid"], b["order_uid"], "never-stored", "'; DROP TABLE orders; --"]
    assert stored_versions(stack.database_url, uids, chunk=2) == {
        a["order_uid"]: prepared(a, 1).sha256
    }
    assert stored_versions(stack.database_url, []) == {}
