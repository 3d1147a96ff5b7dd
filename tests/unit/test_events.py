"""The hub of the streams of orders' changes (`service.events.OrderEvents`) over a fake of the
states it reads (tests/fakes.py): what each stream is sent, its bound, the cap, the stop."""

from __future__ import annotations

import asyncio
import threading
import tracemalloc
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from order_viewer.adapters.cache import OrderCache
from order_viewer.adapters.http import api
from order_viewer.adapters.http.api import STRICT_TRANSPORT_SECURITY, create_app
from order_viewer.service import events as events_module
from order_viewer.service.events import OrderEvents, StreamEnded, Subscription
from order_viewer.service.lookup import OrderLookup
from order_viewer.service.ports import CachedOrder, OrderState
from tests.fakes import FakeOrderStates, FakeReader
from tests.unit.test_access import NotReady


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


# ---------------------------------------------------------------- the HTTP stream over the hub


def stream_request(
    events: OrderEvents,
    path: str,
    leave: asyncio.Event,
    headers: list[tuple[bytes, bytes]],
    tls: bool = False,
) -> Coroutine[Any, Any, list[dict[str, Any]]]:
    """The messages the app sends for a GET of `path`; its client leaves when `leave` is set."""
    app = create_app(
        OrderLookup(FakeReader({}), OrderCache(10)), NotReady(), None, events=events, tls=tls
    )
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    async def run() -> list[dict[str, Any]]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8081),
        }
        await app(scope, receive, send)
        return sent

    return run()


def body_of(sent: list[dict[str, Any]]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("tls", [False, True])
def test_a_stream_sends_each_state_as_an_event_and_ends_when_its_client_leaves(tls: bool) -> None:
    async def scenario(events: OrderEvents, states: FakeOrderStates) -> None:
        states.states["a"] = version(3)
        leave = asyncio.Event()
        answer = asyncio.ensure_future(
            stream_request(events, "/order/a/events", leave, [], tls=tls)
        )
        await asyncio.sleep(0.05)
        states.states["a"] = OrderState(None, 4)
        events.changed(["a"])
        await asyncio.sleep(0.05)
        assert events.open_streams == 1
        leave.set()
        sent = await asyncio.wait_for(answer, 1)
        assert sent[0]["status"] == 200
        assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
        # Over TLS the HSTS wrapper adds its header and passes each event on as it comes.
        assert (STRICT_TRANSPORT_SECURITY in sent[0]["headers"]) is tls
        assert all(m.get("more_body", True) for m in sent[1:-1])
        assert body_of(sent) == (
            b'id: 3\nevent: version\ndata: {"v":3}\n\n'
            b'id: 4\nevent: deleted\ndata: {"order_uid": "a"}\n\n'
        )
        assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
        assert events.open_streams == 0

    run(scenario)


def test_a_stream_ends_after_its_lifetime_so_that_its_credential_is_checked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(api, "STREAM_LIFETIME_SECONDS", 0.2)
    monkeypatch.setattr(api, "HEARTBEAT_SECONDS", 0.05)

    async def scenario(events: OrderEvents, _: FakeOrderStates) -> None:
        stay = asyncio.Event()
        sent = await asyncio.wait_for(stream_request(events, "/order/a/events", stay, []), 2)
        assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
        assert body_of(sent).startswith(b": heartbeat\n\n: heartbeat\n\n")
        assert events.open_streams == 0

    run(scenario)


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/order/a%20b/events", [], 400),
        ("/order/" + "x" * 65 + "/events", [], 400),
        ("/order/a/events", [(b"last-event-id", b"-1")], 400),
        ("/order/a/events", [(b"last-event-id", b"9223372036854775808")], 400),
        ("/order/a/events", [(b"last-event-id", b"1e3")], 400),
    ],
)
def test_a_stream_of_a_bad_id_or_event_id_is_refused(
    path: str, headers: list[tuple[bytes, bytes]], status: int
) -> None:
    async def scenario(events: OrderEvents, _: FakeOrderStates) -> None:
        sent = await asyncio.wait_for(stream_request(events, path, asyncio.Event(), headers), 2)
        assert sent[0]["status"] == status
        assert events.open_streams == 0

    run(scenario)
