"""The service layer over fakes of our own ports (the writer, the reader)."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Sequence

import pytest

from order_viewer.cache import OrderCache
from order_viewer.generate import SAMPLE_ORDER
from order_viewer.service import BatchOutcome, Message, OrderIngest, OrderLookup
from order_viewer.store import (
    DatabaseUnavailable,
    OrderSummary,
    PreparedOrder,
    RejectedByDatabase,
    StoredDocument,
    TransientStoreError,
    WriteResult,
)


class FakeWriter:
    """Keeps orders in a dict; can be told to fail like the database would."""

    def __init__(self) -> None:
        self.stored: dict[str, PreparedOrder] = {}
        self.batches: list[list[str]] = []
        self.refuse: set[str] = set()
        self.unavailable = False

    def write(self, batch: Sequence[PreparedOrder]) -> WriteResult:
        if self.unavailable:
            raise TransientStoreError("connection refused")
        if any(prepared.order.order_uid in self.refuse for prepared in batch):
            raise RejectedByDatabase("value too long for type")
        self.batches.append([prepared.order.order_uid for prepared in batch])
        inserted, replaced = [], []
        for prepared in batch:
            uid = prepared.order.order_uid
            old = self.stored.get(uid)
            if old is None:
                inserted.append(uid)
            elif old.sha256 != prepared.sha256 and old.offset < prepared.offset:
                replaced.append(uid)
            else:
                continue
            self.stored[uid] = prepared
        return WriteResult(tuple(inserted), tuple(replaced))


def order(uid: str, name: str = "Test Testov") -> bytes:
    document = copy.deepcopy(SAMPLE_ORDER)
    document["order_uid"] = uid
    document["delivery"]["name"] = name
    return json.dumps(document).encode()


def ingest_all(ingest: OrderIngest, messages: list[Message]) -> BatchOutcome:
    return ingest.store(ingest.prepare(messages))


def message(offset: int, value: bytes | None, partition: int = 0) -> Message:
    return Message("orders", partition, offset, b"key", value)


def test_valid_orders_are_stored_then_cached_and_invalid_ones_returned() -> None:
    writer, cache = FakeWriter(), OrderCache(100)
    outcome = ingest_all(
        OrderIngest(writer, cache),
        [message(0, order("a")), message(1, b"{nope"), message(2, order("b")), message(3, None)],
    )
    assert (outcome.inserted, outcome.replaced, outcome.unchanged) == (2, 0, 0)
    assert [(r.message.offset, r.rejection.code) for r in outcome.rejected] == [
        (1, "invalid_json"),
        (3, "empty_value"),
    ]
    assert set(writer.stored) == {"a", "b"}
    cached = cache.get("a")
    assert cached is not None
    assert json.loads(cached.body)["order_uid"] == "a"


def test_the_newest_message_of_an_order_in_a_batch_wins() -> None:
    writer, cache = FakeWriter(), OrderCache(100)
    ingest_all(
        OrderIngest(writer, cache),
        [message(0, order("a", "First")), message(1, order("a", "Second"))],
    )
    assert writer.batches == [["a"]]
    assert writer.stored["a"].order.delivery.name == "Second"
    cached = cache.get("a")
    assert cached is not None
    assert json.loads(cached.body)["delivery"]["name"] == "Second"


def test_redelivery_changes_nothing_and_a_later_version_replaces() -> None:
    writer, cache = FakeWriter(), OrderCache(100)
    ingest = OrderIngest(writer, cache)
    ingest_all(ingest, [message(0, order("a"))])
    again = ingest_all(ingest, [message(0, order("a"))])
    assert (again.inserted, again.replaced, again.unchanged) == (0, 0, 1)
    newer = ingest_all(ingest, [message(5, order("a", "Renamed"))])
    assert newer.replaced == 1
    cached = cache.get("a")
    assert cached is not None
    assert json.loads(cached.body)["delivery"]["name"] == "Renamed"


def test_an_unavailable_database_stores_and_caches_nothing() -> None:
    writer, cache = FakeWriter(), OrderCache(100)
    writer.unavailable = True
    with pytest.raises(TransientStoreError):
        ingest_all(OrderIngest(writer, cache), [message(0, order("a"))])
    assert cache.get("a") is None


def test_an_order_the_database_refuses_does_not_sink_its_batch() -> None:
    writer, cache = FakeWriter(), OrderCache(100)
    writer.refuse = {"bad"}
    outcome = ingest_all(
        OrderIngest(writer, cache),
        [message(0, order("a")), message(1, order("bad")), message(2, order("c"))],
    )
    assert set(writer.stored) == {"a", "c"}
    assert outcome.inserted == 2
    assert [(r.message.offset, r.rejection.code) for r in outcome.rejected] == [(1, "db_rejected")]
    assert cache.get("bad") is None


class FakeReader:
    def __init__(self, stored: dict[str, bytes]) -> None:
        self.stored = stored
        self.asked: list[list[str]] = []
        self.queries = 0
        self.unavailable = False
        self.release = asyncio.Event()
        self.release.set()

    async def documents(self, order_uids: list[str]) -> list[StoredDocument]:
        self.queries += 1
        self.asked.append(order_uids)
        await self.release.wait()
        if self.unavailable:
            raise DatabaseUnavailable("connection refused")
        return [
            StoredDocument(uid, self.stored[uid], b"\x01" * 32)
            for uid in order_uids
            if uid in self.stored
        ]

    async def recent(self, limit: int) -> list[OrderSummary]:
        return []


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
