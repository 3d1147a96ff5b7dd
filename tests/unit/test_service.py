"""The service layer over fakes of our own ports (tests/fakes.py)."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import threading
from collections.abc import Generator, Sequence

import pytest

from order_viewer.adapters.cache import OrderCache
from order_viewer.adapters.metrics import Metrics
from order_viewer.domain.model import PreparedOrder
from order_viewer.entrypoints.generate import SAMPLE_ORDER
from order_viewer.service.ingest import BatchOutcome, OrderIngest, WriteTimeouts, prepare_batch
from order_viewer.service.lookup import OrderLookup, warm_up
from order_viewer.service.ports import (
    ConsumedMessage,
    DatabaseUnavailable,
    Deletion,
    Handled,
    Stopped,
    StoredDocument,
    WriteResult,
    WriteTimedOut,
)
from order_viewer.service.readiness import IngestHere, Liveness, Readiness
from order_viewer.service.retry import Health, Patience
from tests.fakes import FakeDeadLetters, FakeReader, FakeWriter


def order(uid: str, name: str = "Test Testov", date: str = "2021-11-26T06:22:19Z") -> bytes:
    document = copy.deepcopy(SAMPLE_ORDER)
    document["order_uid"] = uid
    document["delivery"]["name"] = name
    document["date_created"] = date
    return json.dumps(document).encode()


def message(offset: int, value: bytes | None, partition: int = 0) -> ConsumedMessage:
    return ConsumedMessage("orders", partition, offset, b"key", value)


class Ingest:
    """An OrderIngest over fakes, and what it did."""

    def __init__(self, stop: threading.Event | None = None) -> None:
        self.writer, self.cache = FakeWriter(), OrderCache(100)
        self.events: list[str] = []
        self.dead_letters = FakeDeadLetters(self.events)
        self.stop = stop or threading.Event()
        self.health = Health("database", logging.getLogger("test.database"))
        self.patience = Patience(self.health, self.stop, 0.01)
        self.metrics = Metrics(self.cache)
        self.service = OrderIngest(
            [self.writer], self.cache, self.dead_letters, self.patience, self.metrics
        )

    def all(self, messages: list[ConsumedMessage]) -> BatchOutcome:
        """Prepare, store and settle one batch."""
        batch = prepare_batch(messages)
        outcome = self.service.store(batch)
        self.service.settle(batch, outcome, self.acknowledge)
        return outcome

    def acknowledge(self, messages: Sequence[ConsumedMessage]) -> None:
        self.events.append(f"acknowledged {[m.offset for m in messages]}")


def test_valid_orders_are_stored_then_cached_and_invalid_ones_dead_lettered() -> None:
    ingest = Ingest()
    outcome = ingest.all(
        [message(0, order("a")), message(1, b"{nope"), message(2, order("b")), message(3, None)]
    )
    assert (outcome.inserted, outcome.replaced, outcome.unchanged) == (2, 0, 0)
    assert [(r.message.offset, r.rejection.code) for r in ingest.dead_letters.sent] == [
        (1, "invalid_json"),
        (3, "empty_value"),
    ]
    assert set(ingest.writer.stored) == {"a", "b"}
    cached = ingest.cache.get("a")
    assert cached is not None
    assert json.loads(cached.body)["order_uid"] == "a"


def test_a_batch_is_acknowledged_only_after_its_dead_letters() -> None:
    ingest = Ingest()
    ingest.all([message(0, b"{nope"), message(1, order("a"))])
    assert ingest.events == ["dead-lettered [0]", "acknowledged [0, 1]"]


def test_a_stop_while_dead_lettering_acknowledges_nothing() -> None:
    ingest = Ingest()
    ingest.dead_letters.stopped = True
    batch = prepare_batch([message(0, b"{nope"), message(1, order("a"))])
    outcome = ingest.service.store(batch)
    with pytest.raises(Stopped):
        ingest.service.settle(batch, outcome, ingest.acknowledge)
    assert ingest.events == []


def test_a_batch_without_rejects_sends_no_dead_letters() -> None:
    ingest = Ingest()
    ingest.all([message(0, order("a"))])
    assert ingest.events == ["acknowledged [0]"]


def test_the_newest_message_of_an_order_in_a_batch_wins() -> None:
    ingest = Ingest()
    ingest.all([message(0, order("a", "First")), message(1, order("a", "Second"))])
    assert ingest.writer.batches == [["a"]]
    assert ingest.writer.stored["a"].order.delivery.name == "Second"
    cached = ingest.cache.get("a")
    assert cached is not None
    assert json.loads(cached.body)["delivery"]["name"] == "Second"


def test_redelivery_changes_nothing_and_a_later_version_replaces() -> None:
    ingest = Ingest()
    ingest.all([message(0, order("a"))])
    again = ingest.all([message(0, order("a"))])
    assert (again.inserted, again.replaced, again.unchanged) == (0, 0, 1)
    newer = ingest.all([message(5, order("a", "Renamed"))])
    assert newer.replaced == 1
    cached = ingest.cache.get("a")
    assert cached is not None
    assert json.loads(cached.body)["delivery"]["name"] == "Renamed"


def test_an_unavailable_database_is_waited_out_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ingest = Ingest()
    ingest.writer.unavailable_for = 3
    with caplog.at_level(logging.INFO, logger="test.database"):
        outcome = ingest.all([message(0, order("a"))])
    assert outcome.inserted == 1
    assert [r.getMessage() for r in caplog.records] == [
        "database unavailable, retrying: connection refused",
        "database recovered",
    ]
    retries = ingest.metrics.registry.get_sample_value(
        "order_viewer_transient_failure_retries_total", {"kind": "database"}
    )
    assert retries == 3
    assert ingest.cache.get("a") is not None


def test_a_stop_during_an_outage_stores_caches_and_acknowledges_nothing() -> None:
    stop = threading.Event()
    ingest = Ingest(stop)
    ingest.writer.unavailable_for = 1_000_000
    batch = prepare_batch([message(0, order("a"))])
    threading.Timer(0.05, stop.set).start()
    with pytest.raises(Stopped):
        ingest.service.store(batch)
    assert ingest.writer.stored == {}
    assert ingest.cache.get("a") is None
    assert ingest.events == []


def test_an_order_the_database_refuses_does_not_sink_its_batch() -> None:
    ingest = Ingest()
    ingest.writer.refuse = {"bad"}
    outcome = ingest.all([message(0, order("a")), message(1, order("bad")), message(2, order("c"))])
    assert set(ingest.writer.stored) == {"a", "c"}
    assert outcome.inserted == 2
    assert [(r.message.offset, r.rejection.code) for r in ingest.dead_letters.sent] == [
        (1, "db_rejected")
    ]
    assert ingest.cache.get("bad") is None


def test_each_lane_stores_through_its_own_writer_and_a_refused_order_stays_in_its_lane() -> None:
    ingest = Ingest()
    second = FakeWriter()
    second.refuse = {"bad"}
    service = OrderIngest(
        [ingest.writer, second], ingest.cache, ingest.dead_letters, ingest.patience, ingest.metrics
    )
    assert service.lanes == 2
    service.store(prepare_batch([message(0, order("a"))]), lane=0)
    batch = prepare_batch([message(0, order("b"), 1), message(1, order("bad"), 1)])
    outcome = service.store(batch, lane=1)
    assert set(ingest.writer.stored) == {"a"}
    assert set(second.stored) == {"b"}
    assert [r.message.offset for r in outcome.rejected] == [1]
    assert ingest.cache.get("b") is not None


def test_an_ingest_without_a_writer_is_refused() -> None:
    ingest = Ingest()
    with pytest.raises(ValueError, match="at least one writer"):
        OrderIngest([], ingest.cache, ingest.dead_letters, ingest.patience, ingest.metrics)


def test_warm_up_loads_the_newest_orders_until_the_cache_is_full() -> None:
    ingest = Ingest()
    days = ["2021-11-01", "2021-11-03", "2021-11-02", "2021-11-05", "2021-11-04"]
    ingest.all([message(n, order(f"o{n}", date=f"{day}T00:00:00Z")) for n, day in enumerate(days)])
    cache = OrderCache(3)
    assert warm_up(cache, ingest.writer.newest, ingest.patience, ingest.metrics) == 3
    assert [uid for uid in ("o0", "o1", "o2", "o3", "o4") if cache.get(uid)] == ["o1", "o3", "o4"]


def test_warm_up_waits_out_an_unavailable_database() -> None:
    ingest = Ingest()
    ingest.all([message(0, order("a"))])
    failures = [DatabaseUnavailable("starting up"), DatabaseUnavailable("starting up")]

    def newest(limit: int) -> Generator[list[StoredDocument], None, None]:
        if failures:
            raise failures.pop()
        yield from ingest.writer.newest(limit)

    cache = OrderCache(10)
    assert warm_up(cache, newest, ingest.patience, ingest.metrics) == 1
    assert cache.get("a") is not None
    assert not failures


def test_readiness_names_each_part_that_is_not_ready() -> None:
    consuming = threading.Event()
    reachable = True

    async def database_reachable() -> bool:
        return reachable

    listening = threading.Event()
    write_timeouts = WriteTimeouts(Metrics(OrderCache(1)))
    readiness = Readiness(
        database_reachable, listening, IngestHere(consuming, write_timeouts, Liveness())
    )
    assert asyncio.run(readiness.not_ready()) == {
        "listener": "not listening for changes",
        "cache": "warming up",
        "consumer": "not consuming",
    }
    readiness.warmed.set()
    consuming.set()
    listening.set()
    assert asyncio.run(readiness.not_ready()) == {}
    reachable = False
    assert asyncio.run(readiness.not_ready()) == {"database": "unreachable"}
    reachable = True
    listening.clear()
    assert asyncio.run(readiness.not_ready()) == {"listener": "not listening for changes"}
    listening.set()
    write_timeouts.timed_out(WriteTimedOut("canceling statement", "lock", "pid 7"))
    assert asyncio.run(readiness.not_ready()) == {"database": "writes timing out: blocked by pid 7"}
    # Unreachable says more than timing out.
    reachable = False
    assert asyncio.run(readiness.not_ready()) == {"database": "unreachable"}
    reachable = True
    write_timeouts.got_through()
    assert asyncio.run(readiness.not_ready()) == {}


def test_a_write_cut_by_its_deadline_is_counted_logged_shown_and_retried(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest = Ingest()
    ingest.writer.timeouts = [
        WriteTimedOut(
            "canceling statement due to lock timeout",
            "lock",
            "pid 4242 (idle in transaction, its transaction open for 61 s)",
        ),
        WriteTimedOut("no answer from PostgreSQL within 70 s", "unresponsive"),
    ]
    timeouts = ingest.service.write_timeouts
    # What readiness shows as each attempt begins.
    shown: list[str | None] = []
    write = ingest.writer.write

    def write_watched(
        batch: Sequence[PreparedOrder],
        deletions: Sequence[Deletion] = (),
        handled: Sequence[Handled] = (),
    ) -> WriteResult:
        shown.append(timeouts.failing)
        return write(batch, deletions, handled)

    monkeypatch.setattr(ingest.writer, "write", write_watched)
    with caplog.at_level(logging.INFO):
        outcome = ingest.all([message(0, order("a"))])
    assert outcome.inserted == 1
    assert set(ingest.writer.stored) == {"a"}
    blocked = "blocked by pid 4242 (idle in transaction, its transaction open for 61 s)"
    assert shown == [
        None,
        f"writes timing out: {blocked}",
        "writes timing out (unresponsive): no answer from PostgreSQL within 70 s",
    ]
    assert timeouts.failing is None

    def sample(name: str, **labels: str) -> float | None:
        return ingest.metrics.registry.get_sample_value(name, labels)

    timeouts_total = "order_viewer_database_write_timeouts_total"
    assert sample(timeouts_total, cause="lock") == 1
    assert sample(timeouts_total, cause="unresponsive") == 1
    assert sample(timeouts_total, cause="statement") is None
    assert sample("order_viewer_transient_failure_retries_total", kind="database") == 2
    lines = [record.getMessage() for record in caplog.records]
    assert f"writes timing out: {blocked}; the write is rolled back and retried" in lines
    assert "writes get through again" in lines


def test_liveness_names_each_part_stuck_until_it_moves_again() -> None:
    async def reachable() -> bool:
        return True

    liveness = Liveness()
    readiness = Readiness(
        reachable,
        threading.Event(),
        IngestHere(threading.Event(), WriteTimeouts(Metrics(OrderCache(1))), liveness),
    )
    assert readiness.not_live() == {}
    liveness.stuck("consumer", "nothing fetched")
    liveness.stuck("listener", "silent")
    liveness.stuck("consumer", "nothing fetched after 3 new consumers")
    assert readiness.not_live() == {
        "consumer": "nothing fetched after 3 new consumers",
        "listener": "silent",
    }
    liveness.moving("consumer")
    liveness.moving("consumer")  # moving twice, or without having been stuck, is harmless
    liveness.moving("writer")
    assert readiness.not_live() == {"listener": "silent"}


def test_a_miss_reads_the_database_once_and_fills_the_cache() -> None:
    reader, cache = FakeReader({"a": b'{"order_uid":"a"}'}), OrderCache(10)
    lookup = OrderLookup(reader, cache)

    async def scenario() -> None:
        assert lookup.cached("a") is None
        found = await lookup.load("a")
        assert found is not None
        assert found.body == b'{"order_uid":"a"}'
        assert lookup.cached("a") == found
        assert await lookup.load("unknown") is None
        assert lookup.cached("unknown") is None

    asyncio.run(scenario())
    assert reader.queries == 2


def test_concurrent_misses_for_one_id_make_one_query() -> None:
    reader, cache = FakeReader({"a": b"{}"}), OrderCache(10)
    lookup = OrderLookup(reader, cache)

    async def scenario() -> None:
        reader.release.clear()
        waiting = [asyncio.create_task(lookup.load("a")) for _ in range(50)]
        await asyncio.sleep(0.01)
        reader.release.set()
        results = await asyncio.gather(*waiting)
        assert all(result is not None and result.body == b"{}" for result in results)

    asyncio.run(scenario())
    assert reader.queries == 1


def test_an_unreachable_database_is_reported_to_every_waiter() -> None:
    reader, cache = FakeReader({}), OrderCache(10)
    reader.unavailable = True
    lookup = OrderLookup(reader, cache)

    async def scenario() -> None:
        reader.release.clear()
        waiting = [asyncio.create_task(lookup.load("a")) for _ in range(5)]
        await asyncio.sleep(0.01)
        reader.release.set()
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(result, DatabaseUnavailable) for result in results)

    asyncio.run(scenario())
    assert reader.queries == 1


def test_misses_arriving_together_share_one_query() -> None:
    reader, cache = FakeReader({"a": b"{}", "b": b"[]"}), OrderCache(10)
    lookup = OrderLookup(reader, cache)

    async def scenario() -> None:
        results = await asyncio.gather(*(lookup.load(uid) for uid in ("a", "b", "zz", "a")))
        assert [r.body if r else None for r in results] == [b"{}", b"[]", None, b"{}"]

    asyncio.run(scenario())
    assert reader.asked == [["a", "b", "zz"]]


def test_a_burst_is_split_into_bounded_queries() -> None:
    reader, cache = FakeReader({}), OrderCache(10)
    lookup = OrderLookup(reader, cache)

    async def scenario() -> None:
        await asyncio.gather(*(lookup.load(f"id{n}") for n in range(450)))

    asyncio.run(scenario())
    assert [len(ids) for ids in reader.asked] == [200, 200, 50]
