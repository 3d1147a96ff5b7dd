"""Deletes by tombstone, the cache kept in step with other instances, and retention: the service
layer over fakes of its ports (tests/fakes.py)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg_pool import PoolTimeout

from order_viewer.adapters.cache import CachedOrder, OrderCache
from order_viewer.adapters.metrics import Metrics
from order_viewer.adapters.postgres.connection import unavailable
from order_viewer.service.coherence import CacheCoherence
from order_viewer.service.ingest import OrderIngest, prepare_batch
from order_viewer.service.lookup import OrderLookup
from order_viewer.service.ports import (
    ABSENT,
    ConsumedMessage,
    DatabaseBusy,
    DatabaseUnavailable,
    Stopped,
)
from order_viewer.service.retention import expire_orders
from order_viewer.service.retry import Health, Patience
from tests.fakes import FakeDeadLetters, FakeExpirer, FakeReader, FakeWriter
from tests.unit.test_cache import absent
from tests.unit.test_service import order


def keyed(
    offset: int, key: bytes | None, value: bytes | None, partition: int = 0
) -> ConsumedMessage:
    return ConsumedMessage("orders", partition, offset, key, value)


def patience(stop: threading.Event | None = None) -> Patience:
    return Patience(
        Health("database", logging.getLogger("test.database")), stop or threading.Event(), 0.01
    )


class Ingest:
    def __init__(self, delete_on_tombstone: bool = True, capacity: int = 100) -> None:
        self.writer, self.cache = FakeWriter(), OrderCache(capacity, absent_capacity=100)
        self.dead_letters = FakeDeadLetters([])
        self.metrics = Metrics(self.cache)
        self.service = OrderIngest(
            [self.writer], self.cache, self.dead_letters, patience(), self.metrics,
            delete_on_tombstone=delete_on_tombstone,
        )  # fmt: skip

    def all(self, messages: list[ConsumedMessage]) -> None:
        batch = self.service.prepare(messages)
        self.service.settle(batch, self.service.store(batch), lambda _: None)

    def sample(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name)


def test_a_tombstone_deletes_its_order_and_its_cached_copy() -> None:
    ingest = Ingest()
    ingest.all([keyed(0, b"a", order("a")), keyed(1, b"b", order("b"))])
    assert ingest.cache.get("a") is not None
    ingest.all([keyed(2, b"a", None)])
    assert set(ingest.writer.stored) == {"b"}
    assert ingest.cache.get("a") is None
    assert ingest.cache.get("b") is not None
    assert ingest.sample("order_viewer_orders_deleted_total") == 1
    assert ingest.dead_letters.sent == []
    # Again, and an older version delivered again: nothing comes back, nothing counts twice.
    ingest.all([keyed(2, b"a", None), keyed(0, b"a", order("a"))])
    assert set(ingest.writer.stored) == {"b"}
    assert ingest.sample("order_viewer_orders_deleted_total") == 1
    ingest.all([keyed(3, b"a", order("a", "Back Again"))])
    assert ingest.writer.stored["a"].order.delivery.name == "Back Again"


def test_a_batch_committed_but_reported_lost_leaves_no_stale_copy_cached() -> None:
    ingest = Ingest()
    ingest.all([keyed(0, b"a", order("a")), keyed(1, b"b", order("b"))])
    assert ingest.cache.get("a") is not None
    assert ingest.cache.get("b") is not None
    ingest.writer.lost_after_commit_for = 1
    # The retry finds the replacement and the deletion done: it reports neither.
    ingest.all([keyed(2, b"a", order("a", "Renamed")), keyed(3, b"b", None)])
    assert ingest.writer.stored["a"].order.delivery.name == "Renamed"
    assert "b" not in ingest.writer.stored
    assert ingest.cache.get("a") is None
    assert ingest.cache.get("b") is None


def test_under_dead_letter_a_tombstone_is_rejected_as_before() -> None:
    ingest = Ingest(delete_on_tombstone=False)
    ingest.all([keyed(0, b"a", order("a")), keyed(1, b"a", None)])
    assert set(ingest.writer.stored) == {"a"}
    assert [(r.message.offset, r.rejection.code) for r in ingest.dead_letters.sent] == [
        (1, "empty_value")
    ]


def test_the_last_message_of_an_order_in_a_batch_decides_between_version_and_tombstone() -> None:
    batch = prepare_batch(
        [
            keyed(0, b"a", order("a")), keyed(1, b"a", None),
            keyed(2, b"b", None), keyed(3, b"b", order("b")),
        ],
        delete_on_tombstone=True,
    )  # fmt: skip
    assert list(batch.orders) == ["b"]
    assert [(d.order_uid, d.offset) for d, _ in batch.deletions.values()] == [("a", 1)]


@pytest.mark.parametrize(
    ("key", "code", "field"),
    [
        (None, "empty_value", None),
        (b"", "invalid_format", "key"),
        (b"\xff\xfe", "invalid_format", "key"),
        (b"has space", "invalid_format", "key"),
        (b"a\n", "invalid_format", "key"),
        (b"x" * 65, "invalid_format", "key"),
        (b"a\x00b", "invalid_format", "key"),
        ("заказ".encode(), "invalid_format", "key"),
    ],
)
def test_a_tombstone_whose_key_is_no_order_uid_is_dead_lettered(
    key: bytes | None, code: str, field: str | None
) -> None:
    ingest = Ingest()
    ingest.all([keyed(0, b"a", order("a")), keyed(1, key, None)])
    assert set(ingest.writer.stored) == {"a"}
    (rejected,) = ingest.dead_letters.sent
    assert (rejected.rejection.code, rejected.rejection.field) == (code, field)


def test_an_empty_value_is_not_a_tombstone() -> None:
    ingest = Ingest()
    ingest.all([keyed(0, b"a", order("a")), keyed(1, b"a", b"")])
    assert set(ingest.writer.stored) == {"a"}
    assert [r.rejection.code for r in ingest.dead_letters.sent] == ["empty_value"]


def test_a_deletion_the_database_refuses_is_dead_lettered_alone() -> None:
    ingest = Ingest()
    ingest.all([keyed(0, b"a", order("a")), keyed(1, b"bad", order("bad"))])
    ingest.writer.refuse = {"bad"}
    ingest.all([keyed(2, b"a", None), keyed(3, b"bad", None), keyed(4, b"c", order("c"))])
    assert set(ingest.writer.stored) == {"bad", "c"}
    assert [(r.message.offset, r.rejection.code) for r in ingest.dead_letters.sent] == [
        (3, "db_rejected")
    ]


class Coherence:
    def __init__(self) -> None:
        self.cache = OrderCache(10, absent_capacity=10)
        self.metrics = Metrics(self.cache)
        self.stored: dict[str, bytes] = {}
        self.unavailable_for = 0
        # How many of the next checks fail for another reason than the database being away.
        self.broken_for = 0
        self.on_broken: Callable[[], object] = lambda: None
        self.pending: list[Callable[[], object]] = []
        self.stop = threading.Event()
        self.service = CacheCoherence(
            self.cache, self.metrics, self.versions, patience(self.stop), self.pending.append
        )

    def versions(self, order_uids: list[str]) -> dict[str, bytes]:
        if self.broken_for:
            self.broken_for -= 1
            self.on_broken()
            raise ValueError("bytea expected\nsecond line")
        if self.unavailable_for:
            self.unavailable_for -= 1
            raise DatabaseUnavailable("connection refused")
        return {uid: self.stored[uid] for uid in order_uids if uid in self.stored}

    def run_pending(self) -> None:
        while self.pending:
            self.pending.pop(0)()

    def sample(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name)


def entry(text: str) -> CachedOrder:
    return CachedOrder.of(text.encode(), sha(text))


def sha(text: str) -> bytes:
    return text.encode().ljust(32, b"\0")


def test_a_change_heard_drops_the_cached_copy_and_a_read_of_it_under_way() -> None:
    coherence = Coherence()
    coherence.service.listening()
    cache = coherence.cache
    cache.put_written({"a": entry("a1"), "b": entry("b1")})
    before_read = cache.ticket()
    coherence.service.changed(["a", "not-cached"])
    assert cache.get("a") is None
    assert cache.get("b") == entry("b1")
    assert cache.fill({"a": entry("a1")}, before_read) == 0
    assert coherence.sample("order_viewer_changes_heard_total") == 2
    assert coherence.sample("order_viewer_cache_invalidations_total") == 1


def test_a_new_order_heard_is_no_longer_answered_absent_nor_a_read_of_it_under_way() -> None:
    coherence = Coherence()
    coherence.service.listening()
    cache = coherence.cache
    cache.fill({}, cache.ticket(), ["a"])
    before_read = cache.ticket()
    coherence.service.changed(["a", "b"])  # another instance stored both
    assert not absent(cache, "a")
    cache.fill({}, before_read, ["b"])
    assert not absent(cache, "b")
    assert coherence.sample("order_viewer_cache_absent_entries") == 0


def test_while_changes_may_go_unheard_no_id_is_answered_absent_nor_remembered() -> None:
    coherence = Coherence()
    coherence.service.listening()
    cache = coherence.cache
    cache.fill({}, cache.ticket(), ["a"])
    assert absent(cache, "a")
    assert coherence.sample("order_viewer_cache_absent_hits_total") == 1
    coherence.service.lost()
    assert not absent(cache, "a")
    cache.fill({}, cache.ticket(), ["b"])
    coherence.service.listening()  # nothing cached: answers again at once
    assert not cache.suspended
    # Either may have been stored while nothing was heard: asked again, the database answers.
    assert (absent(cache, "a"), absent(cache, "b")) == (False, False)
    assert coherence.sample("order_viewer_cache_absent_hits_total") == 1


def test_after_a_lost_listener_the_cache_answers_again_only_once_its_entries_are_checked() -> None:
    coherence = Coherence()
    cache = coherence.cache
    assert cache.suspended  # as built: nothing answered before the first LISTEN
    coherence.service.listening()
    assert coherence.service.listening_now.is_set()
    assert coherence.sample("order_viewer_change_listener_connected") == 1
    assert coherence.pending == []  # nothing cached at start: nothing to check
    cache.put_written({"a": entry("a1"), "b": entry("b1"), "c": entry("c1")})
    coherence.service.lost()
    assert not coherence.service.listening_now.is_set()
    assert coherence.sample("order_viewer_change_listener_connected") == 0
    assert cache.get("a") is None
    # Unheard meanwhile: "a" replaced, "b" deleted; "c" unchanged.
    coherence.stored = {"a": sha("a2"), "c": sha("c1")}
    coherence.unavailable_for = 1
    coherence.service.listening()
    assert cache.get("c") is None  # not before the check
    assert coherence.sample("order_viewer_cache_suspended") == 1
    coherence.run_pending()
    assert coherence.sample("order_viewer_cache_suspended") == 0
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (None, None, entry("c1"))
    assert coherence.sample("order_viewer_cache_suspensions_total") == 2


def test_a_check_overtaken_by_another_loss_does_not_let_the_cache_answer() -> None:
    coherence = Coherence()
    coherence.service.listening()
    coherence.cache.put_written({"a": entry("a1")})
    coherence.stored = {"a": sha("a1")}
    coherence.service.lost()
    coherence.service.listening()
    coherence.service.lost()  # before the first check ran
    coherence.run_pending()
    assert coherence.cache.suspended
    coherence.service.listening()
    coherence.run_pending()
    assert coherence.cache.get("a") == entry("a1")


def lost_with_a_cached_order(coherence: Coherence) -> None:
    coherence.service.listening()
    coherence.cache.put_written({"a": entry("a1")})
    coherence.stored = {"a": sha("a1")}
    coherence.service.lost()
    coherence.service.listening()


def test_a_check_failing_for_another_reason_is_retried_until_it_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    coherence = Coherence()
    lost_with_a_cached_order(coherence)
    coherence.broken_for = 3
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="order_viewer.service.coherence"):
        coherence.run_pending()
    assert not coherence.cache.suspended
    assert coherence.cache.get("a") == entry("a1")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:2] == [
        "the cache check unavailable, retrying: ValueError: bytea expected",
        "the cache check recovered",
    ]
    assert len(messages) == 3  # and the check's own line


def test_a_failing_check_gives_way_to_a_new_loss_and_to_a_stop() -> None:
    coherence = Coherence()
    lost_with_a_cached_order(coherence)
    coherence.broken_for = 1_000_000
    coherence.on_broken = coherence.service.lost
    coherence.run_pending()  # returns: the next reconnection checks again
    assert coherence.cache.suspended
    assert coherence.broken_for == 1_000_000 - 1

    coherence.on_broken = lambda: None
    coherence.service.listening()
    threading.Timer(0.05, coherence.stop.set).start()
    with pytest.raises(Stopped):
        coherence.run_pending()
    assert coherence.cache.suspended


def dated(uid: str, days_ago: int) -> bytes:
    created = datetime.now(UTC) - timedelta(days=days_ago)
    return order(uid, date=created.isoformat().replace("+00:00", "Z"))


def test_retention_deletes_the_old_orders_in_bounded_batches() -> None:
    ingest = Ingest()
    messages = [keyed(n, f"old{n}".encode(), dated(f"old{n}", 40 + n)) for n in range(5)]
    messages += [keyed(10 + n, f"new{n}".encode(), dated(f"new{n}", 20)) for n in range(3)]
    ingest.all(messages)
    expirer = FakeExpirer(ingest.writer)
    expirer.unavailable_for = 2
    deleted = expire_orders(
        expirer, ingest.cache, ingest.metrics, patience(),
        retention=timedelta(days=30), batch=2,
    )  # fmt: skip
    assert deleted == 5
    assert expirer.limits == [2, 2, 2]
    assert sorted(ingest.writer.stored) == ["new0", "new1", "new2"]
    assert all(ingest.cache.get(f"old{n}") is None for n in range(5))
    assert ingest.cache.get("new0") is not None
    assert ingest.sample("order_viewer_orders_expired_total") == 5
    retries = ingest.metrics.registry.get_sample_value(
        "order_viewer_transient_failure_retries_total", {"kind": "retention"}
    )
    assert retries == 2


def test_retention_stops_waiting_for_the_database_on_stop() -> None:
    ingest = Ingest()
    expirer = FakeExpirer(ingest.writer)
    expirer.unavailable_for = 1_000_000
    stop = threading.Event()
    threading.Timer(0.05, stop.set).start()
    with pytest.raises(Stopped):
        expire_orders(
            expirer, ingest.cache, ingest.metrics, patience(stop),
            retention=timedelta(days=1), batch=10,
        )  # fmt: skip


def test_with_the_database_away_too_a_lookup_gets_what_the_suspended_cache_kept() -> None:
    cache = OrderCache(10)
    cache.put_written({"a": entry("a1")})
    cache.suspend()
    reader = FakeReader({})
    reader.unavailable = True
    lookup = OrderLookup(reader, cache)

    async def look() -> None:
        assert lookup.cached("a") is None
        assert await lookup.load("a") == entry("a1")
        with pytest.raises(DatabaseUnavailable):
            await lookup.load("b")

    asyncio.run(look())
    assert reader.queries == 2


@pytest.mark.parametrize(
    ("error", "busy"),
    [
        (PoolTimeout("couldn't get a connection after 2.00 sec"), True),
        (psycopg.errors.TooManyConnections("too many clients already"), True),
        (psycopg.errors.DiskFull("could not extend file"), True),
        (psycopg.errors.QueryCanceled("canceling statement due to statement timeout"), True),
        (psycopg.OperationalError("connection refused"), False),
        (psycopg.errors.AdminShutdown("terminating connection"), False),
        (psycopg.errors.ConnectionFailure("server closed the connection"), False),
    ],
)
def test_a_busy_database_gets_no_kept_copy_served(error: psycopg.Error, busy: bool) -> None:
    # Busy but running, others may be committing: a kept copy may be stale.
    raised = unavailable(error)
    assert isinstance(raised, DatabaseUnavailable)  # still a 503 for the API
    assert isinstance(raised, DatabaseBusy) is busy
    cache = OrderCache(10)
    cache.put_written({"a": entry("a1")})
    cache.suspend()
    reader = FakeReader({})
    reader.unavailable, reader.unavailable_as = True, type(raised)

    async def look() -> None:
        if busy:
            with pytest.raises(DatabaseBusy):
                await lookup.load("a")
        else:
            assert await lookup.load("a") == entry("a1")

    lookup = OrderLookup(reader, cache)
    asyncio.run(look())


@pytest.mark.parametrize("capacity", [100, 0])
def test_an_order_this_instance_stores_is_no_longer_answered_absent(capacity: int) -> None:
    # With a capacity of 0 the order itself is not kept (as when evicted): a lookup misses.
    ingest = Ingest(capacity=capacity)
    reader = FakeReader({})
    lookup = OrderLookup(reader, ingest.cache)

    async def look() -> None:
        assert await lookup.load("a") is None

    asyncio.run(look())
    assert lookup.cached("a") is ABSENT
    assert ingest.sample("order_viewer_cache_absent_entries") == 1
    ingest.all([keyed(1, b"a", order("a"))])
    assert isinstance(lookup.cached("a"), CachedOrder) if capacity else lookup.cached("a") is None
    assert ingest.sample("order_viewer_cache_absent_entries") == 0
    assert reader.queries == 1


@pytest.mark.parametrize("stored_by", ["this instance", "another instance"])
def test_a_lookup_racing_the_store_of_its_order_does_not_keep_it_absent(stored_by: str) -> None:
    ingest = Ingest(capacity=0)  # nothing kept of the order itself that could hide the absence
    coherence = CacheCoherence(
        ingest.cache, ingest.metrics, lambda _: {}, patience(), lambda _: None
    )
    coherence.listening()
    reader = FakeReader({})
    reader.release.clear()
    lookup = OrderLookup(reader, ingest.cache)

    async def race() -> None:
        loading = asyncio.create_task(lookup.load("a"))
        while not reader.asked:
            await asyncio.sleep(0)
        # The query has begun; the order commits before it answers, unseen by its snapshot.
        if stored_by == "this instance":
            ingest.all([keyed(1, b"a", order("a"))])
        else:
            coherence.changed(["a"])
        reader.release.set()
        assert await loading is None  # read before the commit: that answer is right then

    asyncio.run(race())
    assert lookup.cached("a") is not ABSENT
