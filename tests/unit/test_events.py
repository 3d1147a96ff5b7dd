"""The hub of the streams of orders' changes (`service.events.OrderEvents`) over a fake of the
states it reads (tests/fakes.py): what each stream is sent, its bound, the cap, the stop."""

from __future__ import annotations

import asyncio
import threading
import tracemalloc
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from order_viewer.service import events as events_module
from order_viewer.service.events import OrderEvents, StreamEnded, Subscription
from order_viewer.service.ports import CachedOrder, OrderState
from tests.fakes import FakeOrderStates


def version(offset: int) -> OrderState:
    return OrderState(CachedOrder(b'{"v":%d}' % offset, f'"{offset}"'), offset)


def run(
    scenario: Callable[[OrderEvents, FakeOrderStates], Coroutine[Any, Any, None]], cap: int = 10
) -> None:
    states = FakeOrderStates()
    events = OrderEvents(states, cap)
    events.RETRY_SECONDS = 0.01
    asyncio.run(scenario(events, states))


async def settled() -> None:
    """Let the hub's reads run."""
    for _ in range(5):
        await asyncio.sleep(0)


async def nothing_more(subscription: Subscription) -> None:
    assert await subscription.next(0.01) is None


def test_a_stream_gets_the_state_on_connect_then_each_newer_one() -> None:
    async def scenario(events: OrderEvents, states: FakeOrderStates) -> None:
        states.states["a"] = version(3)
        stream = events.subscribe("a", None)
        assert stream is not None
        assert await stream.next(1) == version(3)
        states.states["a"] = version(7)
        events.changed(["a", "unwatched"])
        assert await stream.next(1) == version(7)
        states.states["a"] = OrderState(None, 9)  # deleted by a tombstone at offset 9
        events.changed(["a"])
        assert await stream.next(1) == OrderState(None, 9)
        await nothing_more(stream)
        # Only the watched order was read: never the ids of unwatched changes.
        assert all(read == ["a"] for read in states.reads)

    run(scenario)


def test_a_stream_is_never_sent_an_older_version_than_it_has() -> None:
    async def scenario(events: OrderEvents, states: FakeOrderStates) -> None:
        states.states["a"] = version(5)
        stream = events.subscribe("a", None)
        assert stream is not None
        await settled()
        stream.offer(version(4))  # a read that answered late
        stream.offer(version(5))  # the same again
        assert await stream.next(1) == version(5)
        stream.offer(version(2))
        stream.offer(OrderState(None, 5))  # a tombstone older than the version shown
        await nothing_more(stream)

    run(scenario)


def test_last_event_id_gets_the_state_on_connect_only_if_newer() -> None:
    async def scenario(events: OrderEvents, states: FakeOrderStates) -> None:
        states.states["a"] = version(8)
        current = events.subscribe("a", 8)
        behind = events.subscribe("a", 7)
        assert current is not None
        assert behind is not None
        assert await behind.next(1) == version(8)
        await nothing_more(current)

    run(scenario)


def test_an_order_gone_without_a_tombstone_is_a_deletion_only_to_a_client_that_shows_it() -> None:
    async def scenario(events: OrderEvents, states: FakeOrderStates) -> None:
        never_seen = events.subscribe("gone", None)
        showing = events.subscribe("gone", 4)  # reconnected with the version it shows
        assert never_seen is not None
        assert showing is not None
        await settled()
        assert await showing.next(1) == OrderState(None, None)
        await nothing_more(never_seen)
        events.changed(["gone"])  # heard again: it was told already
        await settled()
        await nothing_more(showing)
        states.states["gone"] = version(12)  # stored again
        events.changed(["gone"])
        assert await showing.next(1) == version(12)

    run(scenario)


def test_a_client_that_never_reads_holds_one_pending_state_however_many_changes() -> None:
    async def scenario(events: OrderEvents, states: FakeOrderStates) -> None:
        stream = events.subscribe("a", None)
        assert stream is not None
        await settled()
        tracemalloc.start()
        try:
            await settled()
            before = tracemalloc.take_snapshot()
            for offset in range(1, 5001):
                states.states["a"] = version(offset)
                events.changed(["a"])
                await settled()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        # 5,000 versions came and went: what the hub's module holds did not grow with them.
        hub = [tracemalloc.Filter(inclusive=True, filename_pattern=events_module.__file__)]
        grown = sum(
            stat.size_diff
            for stat in after.filter_traces(hub).compare_to(before.filter_traces(hub), "filename")
        )
        assert grown < 2000, f"{grown} bytes more after 5,000 changes"
        assert await stream.next(1) == version(5000)
        await nothing_more(stream)

    run(scenario)


def test_changes_heard_in_another_thread_reach_the_streams() -> None:
    async def scenario(events: OrderEvents, states: FakeOrderStates) -> None:
        stream = events.subscribe("a", None)
        assert stream is not None
        await settled()
        states.states["a"] = version(2)
        listener = threading.Thread(target=events.changed, args=(["a"],))
        listener.start()
        assert await stream.next(1) == version(2)
        await asyncio.to_thread(listener.join)

    run(scenario)


def test_streams_connecting_together_cost_one_read() -> None:
    async def scenario(events: OrderEvents, states: FakeOrderStates) -> None:
        states.states["a"] = version(1)
        streams = [events.subscribe(uid, None) for uid in ["a"] * 50 + ["b"] * 50]
        await settled()
        assert states.reads == [["a", "b"]]
        for stream in streams[:50]:
            assert stream is not None
            assert await stream.next(1) == version(1)

    run(scenario, cap=100)


def test_beyond_the_cap_no_stream_opens_until_one_closes() -> None:
    async def scenario(events: OrderEvents, _: FakeOrderStates) -> None:
        streams = [events.subscribe(f"o{n}", None) for n in range(3)]
        assert None not in streams
        assert events.subscribe("o9", None) is None
        assert events.open_streams == 3
        first = streams[0]
        assert first is not None
        events.unsubscribe(first)
        events.unsubscribe(first)  # twice (the client left, then the answer ended): once
        assert events.open_streams == 2
        assert events.subscribe("o9", None) is not None

    run(scenario, cap=3)


def test_a_read_that_fails_is_tried_again_until_the_database_answers() -> None:
    async def scenario(events: OrderEvents, states: FakeOrderStates) -> None:
        states.unavailable = True
        states.states["a"] = version(1)
        stream = events.subscribe("a", None)
        assert stream is not None
        await asyncio.sleep(0.05)
        assert len(states.reads) >= 2
        states.unavailable = False
        assert await stream.next(1) == version(1)

    run(scenario)


def test_listening_again_reads_every_watched_order_for_what_went_unheard() -> None:
    async def scenario(events: OrderEvents, states: FakeOrderStates) -> None:
        states.states.update(a=version(1), b=version(1))
        a, b = events.subscribe("a", None), events.subscribe("b", None)
        assert a is not None
        assert b is not None
        assert await a.next(1) == version(1)
        assert await b.next(1) == version(1)
        events.lost()
        states.states["b"] = version(5)  # changed while the listener was away
        events.listening()
        assert await b.next(1) == version(5)
        await nothing_more(a)

    run(scenario)


def test_close_ends_every_stream_and_opens_no_more() -> None:
    async def scenario(events: OrderEvents, _: FakeOrderStates) -> None:
        stream = events.subscribe("a", None)
        assert stream is not None
        waiting = asyncio.ensure_future(stream.next(60))
        await settled()
        events.close()
        with pytest.raises(StreamEnded):
            await asyncio.wait_for(waiting, 1)
        assert events.open_streams == 0
        assert events.subscribe("a", None) is None
        events.changed(["a"])  # a change heard after the stop changes nothing

    run(scenario)
